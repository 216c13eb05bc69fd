"""Inference bundles: one self-contained folder per trained model, the one module that knows its layout.

    import scipy.sparse as sp
    from pipeline.train.bundle import load_bundle, predict_topk
    model = load_bundle("model/")  # the whole label range, in this process, on the CPU
    X = sp.load_npz("features.npz")  # CSR [N, num_features]; or dense [N, d], or a list of raw texts
    ids, scores = predict_topk(model, X, k=5)  # label ids int64 [N, 5], scores float32 [N, 5]

Layout of a bundle (`launch/export.py --checkpoint RUN --out model/`):
    bundle.json    written last: format version, step, num_labels, head and backbone kind, the source
                   checkpoint, the checkpoint's meta.json, and every other file's size and sha256
    config.json    the run's resolved config (pipeline.config)
    backbone.pt    the backbone's full weights, copied from the checkpoint (a sparse bag's table
                   included as `bag.weight`)
    head.pt        the head's state_dict over the whole label range: the label shards of the writer's
                   model-parallel group 0 concatenated; no optimizer state
    train/         the training set's manifest.json, label_frequencies.npy and, when the set has a
                   vocabulary, label_names.txt, written by pipeline.data.manifest (no shards: the
                   manifest says what the model was trained on, the feature space and label priors)
    neighbours.pt  when model.neighbours.k > 0: the training set's unit-length embeddings and labels
                   (pipeline.models.neighbours), whose votes predict_topk and predict.py add
    encoder/       transformer backbones only: the model folder's tokenizer and architecture files
                   (config.json, tokenizer.json, vocab, ...), without its pretrained weights

The tokenizer travels in the bundle because it is part of the model: the trained weights are only
meaningful for the token ids it produces, and the folder that `model.encoder.path` names (a local path
or `pkg:NAME`) is another machine's or another package version's. Its files weigh about a megabyte;
the encoder's pretrained weights are left out, because backbone.pt holds the trained ones and the
architecture is built from `encoder/config.json`.

A bundle is written under a temporary sibling name and renamed when complete, so a failed export never
leaves a partial one. `load_bundle` checks every file against bundle.json before it reads any.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ModelConfig, RunConfig, load_config, save_config
from pipeline.data import LABEL_NAMES, Batch, make_loader, read_label_names, read_manifest, write_label_names
from pipeline.data.manifest import write_manifest
from pipeline.data.tokenizer import TextTokenizer, TokenizerError
from pipeline.hf_folder import ModelFolderError, resolve_model_folder
from pipeline.models.build import build_backbone, build_head, build_tokenizer, head_label_range
from pipeline.models.neighbours import NeighbourIndex, NeighbourVotes, build_index
from pipeline.models.text_encoder import TransformerBackbone
from pipeline.parallel.grid import Layout, ProcessGrid
from pipeline.parallel.label_range import LabelRange
from pipeline.train import checkpoint as ckpt
from pipeline.train.evaluate import Member, predict

FORMAT = "xmc-bundle"
FORMAT_VERSION = 1
BUNDLE = "bundle.json"
CONFIG = "config.json"
BACKBONE = "backbone.pt"
HEAD = "head.pt"
TRAIN = "train"
ENCODER = "encoder"
NEIGHBOURS = "neighbours.pt"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf"}
"""Files of a Hugging Face folder that hold weights: not copied into `encoder/`."""


class BundleError(RuntimeError):
    """A bundle that cannot be written or read (the message names the path)."""


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether `path` is a bundle folder (it holds bundle.json)."""
    return (Path(path) / BUNDLE).is_file()


# ----- writing ------------------------------------------------------------------------------------


def _load_torch(path: Path, mmap: bool = False) -> Any:
    """A torch file of the checkpoint (memory-mapped with `mmap`), or BundleError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except Exception as e:  # a cut or overwritten file: zip, pickle or storage errors
        raise BundleError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


ONE_PROCESS = ProcessGrid(Layout(1, 1), 0, None, None)
"""A grid of one process that holds every label (no torch.distributed needed)."""


def merged_head_state(checkpoint: Path, config: RunConfig, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The head's state_dict over all `meta["num_labels"]` labels: the checkpoint's shards re-cut for
    one process (`checkpoint.load_rank_state`). Checked by loading it into a head."""
    full = LabelRange(0, meta["num_labels"], meta["num_labels"])
    head = build_head(config.model, full, seed=config.train.seed)
    try:
        state = ckpt.load_rank_state(checkpoint, ONE_PROCESS, head)["head"]
    except ckpt.CheckpointError:
        raise
    except Exception as e:  # a cut or overwritten file: zip, pickle or storage errors
        raise BundleError(f"{checkpoint / 'head'}: cannot be read ({type(e).__name__}: {e})") from None
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise BundleError(
            f"{checkpoint / 'head'}: the shards do not make a {config.model.head} head: {e}"
        ) from e
    return state


def _copy_encoder_files(model: ModelConfig, folder: Path) -> None:
    """The top-level files of the encoder's model folder but its weights, into `folder`; checked by
    tokenizing a text with them."""
    source = resolve_model_folder(model.encoder.path)
    folder.mkdir()
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix not in WEIGHT_SUFFIXES:
            shutil.copyfile(f, folder / f.name)
    try:
        TextTokenizer(folder, model.encoder.max_length)(["a text"])
    except (TokenizerError, ModelFolderError) as e:
        raise BundleError(f"{source}: its tokenizer does not load from the copied files: {e}") from e


def _training_index(checkpoint: Path, config: RunConfig) -> NeighbourIndex:
    """The neighbour index of the checkpoint's model over its training shards, in this process."""
    model = ckpt.load_for_inference(checkpoint, ONE_PROCESS)
    batch_size = config.data.batch_size
    batches = make_loader(config.data.train, batch_size, 0, 1, shuffle=False, tokenizer=model.tokenizer)
    return build_index(model.backbone, batches, ONE_PROCESS, batch_size)


def _write_into(folder: Path, checkpoint: Path, config: RunConfig, meta: dict[str, Any]) -> None:
    manifest = read_manifest(config.data.train)
    if manifest.num_labels != meta["num_labels"]:
        raise BundleError(
            f"{manifest.path}: {manifest.num_labels} labels, "
            f"the checkpoint {checkpoint} has {meta['num_labels']}"
        )
    names = read_label_names(manifest)
    ckpt.verify_files(checkpoint, [BACKBONE, *ckpt.head_files_read(meta, ONE_PROCESS)])
    _load_torch(checkpoint / BACKBONE, mmap=True)  # damaged: fails here, also without recorded sizes
    head = merged_head_state(checkpoint, config, meta)

    folder.mkdir(parents=True)
    torch.save(head, folder / HEAD)
    shutil.copyfile(checkpoint / BACKBONE, folder / BACKBONE)
    save_config(config, folder / CONFIG)
    (folder / TRAIN).mkdir()
    if names is not None:
        write_label_names(folder / TRAIN, names)
    write_manifest(folder / TRAIN, replace(manifest, label_names_file=None if names is None else LABEL_NAMES))
    if config.model.backbone == "transformer":
        _copy_encoder_files(config.model, folder / ENCODER)
    if config.model.neighbours.k > 0:
        _training_index(checkpoint, config).save(folder / NEIGHBOURS)

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": meta["step"],
        "num_labels": meta["num_labels"],
        "head": config.model.head,
        "backbone": config.model.backbone,
        "source": str(checkpoint.resolve()),
        "meta": {k: v for k, v in meta.items() if k != "files"},  # the checkpoint's files stay there
        "files": {str(p.relative_to(folder)): ckpt.file_record(p) for p in files},
    }
    (folder / BUNDLE).write_text(json.dumps(doc, indent=1) + "\n")


def write_bundle(checkpoint_path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Export a run folder's newest complete checkpoint (or one checkpoint folder) as a bundle at `out`.

    Written under a temporary sibling of `out` and renamed when complete; on any error the temporary
    folder is removed and `out` is left as it was. An existing non-empty `out` is refused unless
    `force`, which replaces it. Raises BundleError, CheckpointError, DataError or ConfigError, each
    naming the path at fault. Returns `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BundleError(f"{out}: exists and is not empty (--force replaces it)")
    checkpoint, run_dir = ckpt.resolve_checkpoint(checkpoint_path)
    config = load_config(run_dir / CONFIG)
    meta = ckpt.read_meta(checkpoint)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_into(tmp, checkpoint, config, meta)
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


# ----- reading ------------------------------------------------------------------------------------


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """bundle.json of a bundle folder, its format checked; BundleError naming the file."""
    doc_file = Path(path) / BUNDLE
    try:
        doc = json.loads(doc_file.read_text())
    except FileNotFoundError:
        raise BundleError(f"{doc_file}: missing (not a bundle of launch/export.py)") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{doc_file}: cannot be read ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{doc_file}: not a bundle of launch/export.py")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{doc_file}: format_version {doc.get('format_version')} (this code reads {FORMAT_VERSION})"
        )
    return doc


def verify_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """bundle.json, after checking every file it lists (size and sha256); BundleError naming the first
    missing or damaged file."""
    path = Path(path)
    doc = read_bundle(path)
    for name, want in doc["files"].items():
        if problem := ckpt.file_problem(path, name, want, record=BUNDLE):
            raise BundleError(problem)
    return doc


def _transformer_backbone(model: ModelConfig) -> nn.Module:
    """The trained encoder's architecture from `model.encoder.path`'s config.json, without reading
    pretrained weights (backbone.pt replaces them): the module `load_encoder` builds, pooler dropped."""
    from transformers import AutoConfig, AutoModel

    arch = AutoConfig.from_pretrained(resolve_model_folder(model.encoder.path), local_files_only=True)
    encoder = AutoModel.from_config(arch)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return TransformerBackbone(encoder, model.encoder.pooling, model.embed_dim)


def load_bundle(
    path: str | os.PathLike, grid: ProcessGrid | None = None, device: torch.device | str = "cpu"
) -> ckpt.InferenceModel:
    """The model of a bundle, files verified: the full backbone and the head cut to `grid`'s
    model-parallel label range (`head_label_range`), both on `device` in eval mode. With `grid=None` the
    head covers every label, in this one process (torch.distributed is not needed)."""
    path = Path(path)
    doc = verify_bundle(path)
    overrides = (
        [f"model.encoder.path={(path / ENCODER).resolve()}"] if doc["backbone"] == "transformer" else []
    )
    config = load_config(path / CONFIG, overrides)
    manifest = read_manifest(path / TRAIN)
    mp, mp_rank = (1, 0) if grid is None else (grid.mp, grid.mp_rank)
    label_range = head_label_range(config.model, doc["num_labels"], mp, mp_rank)
    if config.model.backbone == "transformer" and config.model.encoder.from_scratch is None:
        backbone = _transformer_backbone(config.model)
    else:
        backbone = build_backbone(config.model, manifest.feature_kind, manifest.num_features)
    backbone.load_state_dict(torch.load(path / BACKBONE, map_location="cpu", weights_only=True))
    head = build_head(config.model, label_range, seed=config.train.seed)
    full = torch.load(path / HEAD, map_location="cpu", weights_only=True)
    state, _ = ckpt.reshard_head_state([{"head": full, "optimizer": {}}], head, label_range)
    head.load_state_dict(state)
    backbone.to(device).eval()
    head.to(device).eval()
    tokenizer = build_tokenizer(config.model)
    n = config.model.neighbours
    votes = None
    if n.k > 0 and (path / NEIGHBOURS).is_file():
        votes = NeighbourVotes(NeighbourIndex.load(path / NEIGHBOURS), n.k, n.weight, n.power)
    return ckpt.InferenceModel(
        config, doc["meta"], manifest, backbone, head, label_range, path, {"head": state}, tokenizer, votes
    )


# ----- prediction in one process ------------------------------------------------------------------


def _batches(model: ckpt.InferenceModel, inputs: Any, batch_size: int) -> Iterator[Batch]:
    """Batches of at most `batch_size` rows of `inputs` (see predict_topk), without labels."""
    kind = model.manifest.feature_kind
    texts = (
        isinstance(inputs, Sequence)
        and not isinstance(inputs, str | bytes)
        and (not inputs or isinstance(inputs[0], str))
    )
    if (kind == "text") != texts:
        raise ValueError(
            f"this model reads {kind} inputs; got "
            + ("a list of texts" if texts else f"a {type(inputs).__name__}")
        )
    if texts:
        n = len(inputs)
    else:
        if not hasattr(inputs, "indptr"):
            inputs = np.asarray(inputs, dtype=np.float32)
        if inputs.ndim != 2 or inputs.shape[1] != model.manifest.num_features:
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)}: expected [N, {model.manifest.num_features}] features"
            )
        n = inputs.shape[0]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        rows = stop - start
        batch = Batch(
            sample_ids=torch.arange(start, stop, dtype=torch.int64),
            valid=torch.ones(rows, dtype=torch.bool),
            label_indptr=torch.zeros(rows + 1, dtype=torch.int64),
            label_indices=torch.zeros(0, dtype=torch.int64),
        )
        if texts:
            batch.texts = list(inputs[start:stop])
            batch.input_ids, batch.attention_mask = model.tokenizer(batch.texts)
        elif kind == "dense":
            part = inputs[start:stop]
            batch.dense = torch.as_tensor(part.toarray() if hasattr(part, "toarray") else part)
        else:
            part = _csr_rows(inputs, start, stop)
            batch.feature_indices, batch.feature_offsets, batch.feature_weights = part
        yield batch


def _csr_rows(x: Any, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature ids int64 [nnz], row offsets int64 [rows], values float32 [nnz]) of rows start..stop
    of a CSR matrix (anything with indptr, indices, data) or of a dense one's nonzeros."""
    if hasattr(x, "indptr"):
        indptr = np.asarray(x.indptr[start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        indices, data = np.asarray(x.indices[lo:hi]), np.asarray(x.data[lo:hi])
        offsets = indptr[:-1] - lo
    else:
        part = x[start:stop]
        rows, indices = np.nonzero(part)
        data = part[rows, indices]
        offsets = np.searchsorted(rows, np.arange(stop - start))
    return (
        torch.from_numpy(indices.astype(np.int64)),
        torch.from_numpy(offsets.astype(np.int64)),
        torch.from_numpy(data.astype(np.float32)),
    )


def predict_topk(
    model: ckpt.InferenceModel, inputs: Any, k: int = 5, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels of every row of `inputs` with a model holding the whole label range
    (`load_bundle(path)`), in this process: (label ids int64 [N, k], scores float32 [N, k]), best
    first, ties by smaller id; ids are -1 (score -inf) where k exceeds the number of labels.

    `inputs`: for a bag-of-words model a CSR matrix [N, num_features] (scipy.sparse or anything with
    indptr, indices, data) or a dense one, whose nonzeros are the features; for a dense-features
    model an array [N, num_features]; for a transformer a list of N raw texts, tokenized by the
    bundle's tokenizer. Batches of `batch_size` rows (default: the run's), as `launch/predict.py`
    scores them."""
    if model.label_range.size != model.label_range.num_labels:
        raise ValueError(
            f"the model holds labels [{model.label_range.start}, {model.label_range.stop}) of "
            f"{model.label_range.num_labels}: predict_topk needs all (load_bundle(path) without a grid)"
        )
    batch_size = batch_size or model.config.data.batch_size
    member = Member(model.backbone, model.head, model.neighbours)
    out = predict(
        [member], _batches(model, inputs, batch_size), ONE_PROCESS, model.label_range, batch_size, k
    )
    ids, scores = [], []
    for _, top_scores, top_ids in out:
        ids.append(top_ids.numpy())
        scores.append(top_scores.float().numpy())
    if not ids:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ids), np.concatenate(scores)
