"""The training loop, top to bottom.

One step on one rank:
  1. the backbone (a DeepSpeed engine over all ranks) embeds this rank's batch;
  2. the embeddings of the model-parallel group are all-gathered; this rank's head shard scores them
     for its label range; the distributed loss over the full label set is the same on every rank of
     the group;
  3. `engine.backward` runs both graphs: DeepSpeed reduces the backbone's gradients over all ranks,
     the head's stay local; with `model.sparse_bag` the bag-of-words table is outside the engine and
     only its touched rows are averaged over all ranks (`pipeline.models.sparse_bag`);
  4. head gradients: replicated head parameters are summed over the model-parallel group, then every
     head gradient is averaged over the data-parallel replicas through Horovod (with compression);
  5. both optimizers step on the same schedule.

The embeddings' gradient is scaled by mp on its way back through the gather (see
`pipeline.parallel.model_parallel`): DeepSpeed averages over all ranks, also over the mp ranks that
computed the same group loss. What differs between heads (parameters, weight decay, rewiring) is the
head's own business (`pipeline.models.heads.base.Head`); the trainer names no head.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import ConfigError, RunConfig, TrainConfig
from pipeline.data import Batch, make_loader, read_manifest
from pipeline.data.partition import streams_misfit
from pipeline.models.build import (
    build_backbone,
    build_head,
    build_tokenizer,
    head_label_range,
    loss_kind,
    needs_label_clusters,
)
from pipeline.models.group_batch import GroupBatch, group_batch
from pipeline.models.heads.loss import head_loss
from pipeline.models.heads.prior import set_prior_bias
from pipeline.models.label_clusters import LabelOrder, balanced_order, label_centroids
from pipeline.models.neighbours import NeighbourVotes, neighbour_votes
from pipeline.models.sparse_bag import SparseBag
from pipeline.parallel.distributed import collective_device
from pipeline.parallel.gradient_exchange import GradientExchange
from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.horovod import dp_process_set
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.model_parallel import sum_replicated_grads
from pipeline.progress import progress_bar
from pipeline.train import checkpoint as ckpt
from pipeline.train.allocator import keep_freed_memory
from pipeline.train.evaluate import evaluate, popularity
from pipeline.train.faults import FaultInjector
from pipeline.train.head_optimizer import HeadOptimizer, build_head_optimizer
from pipeline.train.logbook import Logbook
from pipeline.train.metrics import XMCMetrics
from pipeline.train.preemption import Preempted, StopSignals, signal_name


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(config: RunConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed section, with the batch sizes made consistent with the data section; with
    `load_universal` the engine loads DeepSpeed's universal checkpoints (another world size)."""
    ds = dict(config.deepspeed)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    ds["train_micro_batch_size_per_gpu"] = config.data.batch_size
    gas = int(ds.get("gradient_accumulation_steps", 1))
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = config.data.batch_size * gas * world_size
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def check_head_update(config: RunConfig, world_size: int) -> None:
    """`model.head_update = "chunk"` updates the head inside the backward, which needs each chunk's
    whole gradient there: no data-parallel head replicas to average with, no gradient accumulation."""
    if config.model.head_update != "chunk":
        return
    dp = world_size // config.parallel.model_parallel
    accumulation = int(dict(config.deepspeed).get("gradient_accumulation_steps", 1))
    if dp > 1 or accumulation > 1:
        raise ConfigError(
            "model.head_update: 'chunk' updates the head inside the backward, which needs its whole gradient "
            f"there: no data-parallel head replicas (here {dp}: set parallel.model_parallel to the world "
            f"size) and no gradient accumulation (here {accumulation})"
        )


def backbone_param_groups(
    backbone: nn.Module, train: TrainConfig, total: int
) -> tuple[list[dict[str, Any]], list[Callable[[int], float]]]:
    """The backbone's parameter groups and one learning-rate factor per group (for LambdaLR).

    A transformer backbone's encoder trains at `train.encoder_lr` (its rate is 0 for the first
    `train.freeze_encoder_steps` steps, then it warms up and decays over the remaining steps); every
    other backbone parameter at `train.backbone_lr` (default: `train.lr`). A pretrained encoder needs
    a rate ~100x below a freshly initialised classifier's (Renee, Amazon-670K: 4e-5 against 1e-2)."""
    rate = train.backbone_lr or train.lr
    encoder = list(backbone.encoder_parameters()) if hasattr(backbone, "encoder_parameters") else []
    taken = {id(p) for p in encoder}
    rest = [p for p in backbone.parameters() if id(p) not in taken]
    groups, factors = [], []
    if rest:
        groups.append({"params": rest, "lr": rate})
        factors.append(lambda step: lr_factor(step, train.warmup_steps, total))
    if encoder:
        freeze = train.freeze_encoder_steps
        groups.append({"params": encoder, "lr": train.encoder_lr or rate})
        factors.append(
            lambda step: (
                0.0 if step < freeze else lr_factor(step - freeze, train.warmup_steps, max(1, total - freeze))
            )
        )
    return groups, factors


def backbone_optimizer(groups: list[dict[str, Any]], ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam for the backbone, fused (one pass over each flat ZeRO partition: on CPU the default
    per-tensor Adam took ~17% of a bag-of-words training step); DeepSpeed's CPU Adam when ZeRO offloads
    the optimizer (DeepSpeed refuses a plain torch optimizer there: it would run the offloaded step
    slowly)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups)
    return torch.optim.Adam(groups, fused=True)


@dataclass
class Position:
    """Where training stands: optimizer steps done; the data position, as the epoch and the samples
    consumed of each of its `streams` data streams (empty: none yet), which carries over to any world
    size and batch size; and the seconds spent in optimizer steps so far (not in evaluation or
    checkpoints; kept across resumes)."""

    streams: int
    step: int = 0
    epoch: int = 0
    samples: list[int] = field(default_factory=list)
    train_seconds: float = 0.0


class Trainer:
    """Builds the model for this rank of the grid and runs training, evaluation and checkpoints."""

    def __init__(
        self,
        config: RunConfig,
        grid: ProcessGrid,
        faults: FaultInjector | None = None,
        stop: StopSignals | None = None,
        resume: Path | None = None,
    ) -> None:
        """With `resume`, the trainer continues from that checkpoint (see `restore`)."""
        import deepspeed

        self.config, self.grid = config, grid
        self.faults = faults or FaultInjector()
        self.stop = stop or StopSignals(grid.rank)  # installed by the caller; never set when not
        self.stop_agreed = 0  # a stop signal's number (some rank got it): this step is the last
        self.out = Path(config.train.output_dir)
        self.train_manifest = read_manifest(config.data.train)
        read_manifest(config.data.test)  # fail now, not after training, if the test set is missing
        m = self.train_manifest
        self.num_labels = m.num_labels
        self.label_range: LabelRange = head_label_range(config.model, m.num_labels, grid.mp, grid.mp_rank)
        self.rank0 = grid.rank == 0
        self.position = Position(streams=config.data.streams or grid.world_size)
        self.check_streams("data.streams")

        if not torch.cuda.is_available():
            keep_freed_memory()
        torch.manual_seed(config.train.seed)  # identical backbone and replicated head parts everywhere
        backbone = build_backbone(config.model, m.feature_kind, m.num_features)
        # The bag's table leaves the engine (same initial values): row-sparse exchange and lazy Adam.
        sparse = config.model.sparse_bag and config.model.backbone == "bow"
        self.bag: SparseBag | None = SparseBag.take_from(backbone) if sparse else None
        self.head = build_head(config.model, self.label_range, seed=config.train.seed)
        self.loss = loss_kind(config.model)
        if resume is None and needs_label_clusters(config.model):
            self.head.set_label_order(self.cluster_labels())
        if config.model.prior_bias:
            set_prior_bias(self.head, m.label_frequencies, m.num_samples, self.loss)
        other_world = resume is not None and ckpt.read_meta(resume)["world_size"] != grid.world_size
        ds_config = deepspeed_config(config, grid.world_size, load_universal=other_world)
        self.samples_per_step = ds_config["train_batch_size"]  # batch x accumulation x world
        check_head_update(config, grid.world_size)
        self.total_steps = total_steps(config.train, m.num_samples, self.samples_per_step)
        total, warmup = self.total_steps, config.train.warmup_steps
        schedule = lambda step: lr_factor(step, warmup, total)  # noqa: E731
        self.schedule = schedule
        groups, factors = backbone_param_groups(backbone, config.train, total)
        backbone_opt = backbone_optimizer(groups, ds_config)
        self.engine, _, _, _ = deepspeed.initialize(
            model=backbone,
            optimizer=backbone_opt,
            lr_scheduler=torch.optim.lr_scheduler.LambdaLR(backbone_opt, factors),
            config=ds_config,
        )
        self.tokenizer = build_tokenizer(config.model)
        # The head, the labels and every reduced number live where this rank's collectives run: its
        # GPU under nccl (next to the DeepSpeed backbone), else the CPU.
        self.device = collective_device()
        self.head.to(self.device)
        if self.bag is not None:  # at the other backbone parameters' peak rate and warm-up/cosine factor
            self.bag.to(self.device)
            self.bag_lr = config.train.backbone_lr or config.train.lr
        # This rank's draws for the head: rewiring and the stochastic rounding of bf16 weights.
        self.rewire_generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + grid.rank)
        self.head_optimizer = build_head_optimizer(
            self.head, config.model, config.train, self.rewire_generator
        )
        self.head_scheduler = torch.optim.lr_scheduler.LambdaLR(self.head_optimizer, schedule)
        p = config.parallel
        self.exchange = GradientExchange(
            self.head.named_parameters(), dp_process_set(), p.compression, p.topk_fraction, p.sync_every
        )
        self.logbook = Logbook(self.out, enabled=self.rank0)
        if resume is not None:
            self.restore(resume)

    # ----- data -----------------------------------------------------------------------------------

    def check_streams(self, origin: str) -> None:
        """The data streams fit this world: it divides them, and the global batch takes from each."""
        misfit = streams_misfit(self.position.streams, self.grid.world_size, self.config.data.batch_size)
        if misfit:
            raise ConfigError(
                f"{origin}: {misfit} (data.batch_size={self.config.data.batch_size}); a run that may "
                "change its world size needs data.streams set, at its start, to a multiple of every world "
                "size it may run on"
            )

    def loader(self, source: str, epoch: int, train: bool, position: list[int] | None = None):
        """This rank's batches of `source`: the training order (shuffled, in the run's data streams,
        from `position`) or, for evaluation, the set in order in one contiguous range per rank."""
        d = self.config.data
        return make_loader(
            source,
            d.batch_size,
            self.grid.rank,
            self.grid.world_size,
            epoch=epoch,
            seed=self.config.train.seed,
            num_workers=d.num_workers,
            shuffle=train,
            shuffle_buffer=d.shuffle_buffer,
            streams=self.position.streams if train else None,
            position=position,
            bad_samples=d.bad_samples,
            expected=(self.train_manifest.num_features, self.num_labels),
            tokenizer=self.tokenizer,
        )

    def cluster_labels(self) -> LabelOrder:
        """The clustered label order of a group-shared FFI head (`pipeline.models.label_clusters`):
        rank 0 makes one pass over the training set in file order, every rank receives the order."""
        order = torch.empty(self.num_labels, dtype=torch.int64)
        if self.rank0:
            d, m = self.config.data, self.train_manifest
            batches = make_loader(
                d.train,
                1024,
                0,
                1,
                shuffle=False,
                num_workers=0,
                bad_samples=d.bad_samples,
                expected=(m.num_features, self.num_labels),
            )
            centroids = label_centroids(batches, self.num_labels, m.num_features, self.config.train.seed)
            order = balanced_order(centroids, self.config.model.ffi.group_size, self.config.train.seed).order
        order = order.to(collective_device())
        dist.broadcast(order, src=0)
        return LabelOrder(order.cpu())

    def train_batches(self):
        """Batches forever, epoch after epoch, starting at the saved data position."""
        while True:
            p = self.position
            loader = self.loader(self.config.data.train, p.epoch, True, p.samples or None)
            for handed_out, batch in enumerate(loader, 1):
                p.samples = loader.position_after(handed_out)  # a checkpoint after this step skips it
                yield batch
            p.epoch += 1
            p.samples = []

    # ----- model ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def seeded(self, *key: int) -> Iterator[None]:
        """Random draws (dropout) from a seed that is a function of (train.seed, step, *key) alone, then
        the RNG as it was: a resumed run draws the same masks as an uninterrupted one, whatever else
        used the global RNG in between (a DataLoader starting its workers draws from it)."""
        gpus = [self.device.index] if self.device.type == "cuda" else []  # dropout there draws from its RNG
        with torch.random.fork_rng(devices=gpus):
            torch.manual_seed(hash((self.config.train.seed, self.position.step, *key)) & 0xFFFFFFFF)
            yield

    def group_batch(self, batch: Batch, micro: int) -> GroupBatch:
        """This rank's batch embedded (backbone dropout seeded per rank and micro-step) and gathered over
        the model-parallel group."""
        g = self.grid
        with self.seeded(micro, g.rank, -1):
            return group_batch(self.engine, batch, g, self.config.data.batch_size, grad_scale=g.mp)

    def group_loss(self, group: GroupBatch, micro: int) -> torch.Tensor:
        """The head's loss over the group's gathered batch (`head_loss`: a softmax or squared hinge over
        a linear head is fused on CPU). Dropout inside the head draws from a seed shared by the
        model-parallel group, so its replicated layers see the same masks everywhere."""
        g = self.grid
        m = self.config.model
        update = self.update_rows if m.head_update == "chunk" else None
        with self.seeded(micro, g.dp_rank):
            return head_loss(
                self.head,
                group,
                self.loss,
                self.label_range,
                g.mp_group,
                chunk=m.loss_chunk,
                update=update,
                fused=m.fused_loss,
            )

    def update_rows(self, lo: int, hi: int, grads: list[torch.Tensor]) -> None:
        """`model.head_update = "chunk"`: the rows [lo, hi) of the head's sharded parameters step as soon
        as the chunked loss has their gradients (in `sharded_parameters()` order)."""
        assert isinstance(self.head_optimizer, HeadOptimizer)
        for p, grad in zip(self.head.sharded_parameters(), grads, strict=True):
            self.head_optimizer.step_rows(p, lo, hi, grad)

    # ----- one step -------------------------------------------------------------------------------

    def train_step(self, batches) -> tuple[float, bool]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns (loss, applied).

        A non-finite loss on any rank drops the whole step on every rank (gradients zeroed, nothing
        applied), so the ranks never disagree about which collectives come next. The same all-reduce
        carries the stop request (a signal on any rank): `stop_agreed` then holds its number on every rank."""
        g, losses = self.grid, []
        gas = self.engine.gradient_accumulation_steps()
        for micro in range(gas):
            group = self.group_batch(next(batches), micro)
            loss = self.group_loss(group, micro)
            if self.faults.at_step(self.position.step):
                loss = loss * float("nan")
            stop = torch.tensor(float(self.stop.received), device=loss.device)
            flags = torch.stack([torch.isfinite(loss).logical_not().float(), stop]).to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank skips (or stops) together, or none
            bad, stop = flags.tolist()
            self.stop_agreed = max(self.stop_agreed, int(stop))
            if bad:
                self.engine.optimizer.zero_grad()
                self.head_optimizer.zero_grad(set_to_none=True)
                if self.bag is not None:
                    self.bag.zero_grad()
                self.engine.micro_steps += gas - micro  # DeepSpeed counts micro-steps to find boundaries
                return float("nan"), False
            self.engine.backward(loss)
            losses.append(loss.item())
            if micro < gas - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts it
        sum_replicated_grads(self.head.replicated_parameters(), g.mp_group)
        self.exchange.after_backward()
        self.engine.step()
        if self.bag is not None:
            self.bag.step(self.bag_lr * self.schedule(self.position.step))
        self.head_optimizer.step()
        self.head_scheduler.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        self.position.step += 1
        self.exchange.after_step(self.position.step)
        self.head.after_step(self.position.step, self.head_optimizer, self.rewire_generator)
        return sum(losses) / gas, True

    # ----- evaluation -----------------------------------------------------------------------------

    def evaluate(
        self, source: str | None = None, neighbours: NeighbourVotes | None = None
    ) -> dict[str, float]:
        """Full metric set over a shard set (the test set by default)."""
        batches = self.loader(source or self.config.data.test, 0, train=False)
        return evaluate(
            self.engine.module,
            self.head,
            batches,
            self.grid,
            self.label_range,
            self.config.data.batch_size,
            self.new_metrics(),
            neighbours,
        )

    def neighbour_votes(self) -> NeighbourVotes | None:
        """The training set's votes of `model.neighbours` for the model as it is now (None: k = 0)."""
        batches = self.loader(self.config.data.train, 0, train=False)
        cfg = self.config
        return neighbour_votes(
            cfg.model.neighbours, self.engine.module, batches, self.grid, cfg.data.batch_size
        )

    def new_metrics(self) -> XMCMetrics:
        m = self.train_manifest
        return XMCMetrics(self.num_labels, m.label_frequencies, m.num_samples)

    def baseline(self) -> dict[str, float]:
        """Metrics of predicting the most frequent training labels for everyone, on the test set."""
        batches = self.loader(self.config.data.test, 0, train=False)
        return popularity(batches, self.new_metrics(), self.train_manifest.label_frequencies)

    # ----- checkpoints ----------------------------------------------------------------------------

    def save(self) -> Path:
        shard = ckpt.head_shard(
            self.head,
            self.head_optimizer,
            position=vars(self.position).copy(),
            scheduler=self.head_scheduler.state_dict(),
            residuals=self.exchange.residuals,
            rewire_generator=self.rewire_generator.get_state(),
            label_range=vars(self.label_range).copy(),
        )
        return ckpt.write_checkpoint(
            ckpt.checkpoint_root(self.out),
            self.position.step,
            self.grid,
            ckpt.engine_backbone(self.engine, self.bag),
            shard,
            {"num_labels": self.num_labels, "head": self.config.model.head},
            keep=self.config.train.keep_checkpoints,
        )

    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path`, written by any grid. The same world size: everything is
        restored exactly. Another model-parallel size: the head is re-cut; per-rank state (RNG
        streams, exchange residuals, the rewiring generator) starts afresh. Another world size (a
        trainer built with `resume=path`): the backbone and its optimizer state go through
        DeepSpeed's universal checkpoint, re-partitioned for this data-parallel size. The data
        position (samples consumed per data stream) continues the same sample order on any world
        size that divides the run's streams; with the same global batch, the same batches."""
        meta = ckpt.read_meta(path)
        other_world = meta["world_size"] != self.grid.world_size
        if other_world and not self.engine.load_universal_checkpoint():
            raise ckpt.CheckpointError(
                f"{path} was written by {meta['world_size']} ranks, this run has {self.grid.world_size}: "
                "build the trainer with resume=path to load it at another world size"
            )
        if meta["num_labels"] != self.num_labels or meta["head"] != self.config.model.head:
            raise ckpt.CheckpointError(
                f"{path} holds a {meta['head']} head over {meta['num_labels']} labels, the config asks for "
                f"a {self.config.model.head} head over {self.num_labels}"
            )
        ckpt.load_backbone_engine(self.engine, path, self.bag, self.grid if other_world else None)
        state = ckpt.load_rank_state(path, self.grid, self.head)
        ckpt.restore_head(self.head, self.head_optimizer, state)
        if state["own"]:
            ckpt.set_rng_state(state["rng"])
            for name, residual in state["residuals"].items():  # absent after a head change (recovery)
                if name in self.exchange.residuals:
                    self.exchange.residuals[name].copy_(residual)
            self.rewire_generator.set_state(state["rewire_generator"])
        self.head_scheduler.load_state_dict(state["scheduler"])
        # a scheduler's state_dict restores its counter, not the optimizer's current learning rate
        for scheduler, optimizer in (
            (self.head_scheduler, self.head_optimizer),
            (self.engine.lr_scheduler, self.engine.optimizer),
        ):
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        saved = state["position"]
        if "streams" not in saved:
            raise ckpt.CheckpointError(
                f"{path} counts its data position in batches (an older version): resume it with that version"
            )
        wanted = self.config.data.streams
        if wanted is not None and wanted != saved["streams"]:
            raise ConfigError(
                f"data.streams={wanted}, but {path} was written with {saved['streams']} data streams: the "
                "position in the data order does not carry over to another number of streams"
            )
        self.position = Position(**saved)
        self.check_streams(f"resuming {path}")

    # ----- the run --------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to `total_steps` from the current position; returns the final test metrics. After a
        stop signal (see `pipeline.train.preemption`) it writes a checkpoint of the step just finished
        and raises Preempted instead."""
        cfg, total = self.config.train, self.total_steps
        batches = self.train_batches()
        bar = progress_bar(total, "train", enabled=self.rank0, initial=self.position.step)
        bad_in_a_row, window, window_s = 0, [], 0.0
        saved: tuple[int, Path] | None = None  # (step, path) of the last periodic checkpoint
        while True:
            if self.stop_agreed:  # after the step's log line and periodic checkpoint
                self.position.train_seconds += window_s
                done = saved is not None and saved[0] == self.position.step
                path = saved[1] if done else self.save()
                raise Preempted(signal_name(self.stop_agreed), self.position.step, path)
            if self.position.step >= total:
                break
            started = time.perf_counter()
            loss, applied = self.train_step(batches)
            window_s += time.perf_counter() - started
            if not applied:
                bad_in_a_row += 1
                warnings.warn(f"step {self.position.step}: non-finite loss, step skipped", stacklevel=1)
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{bad_in_a_row} non-finite losses in a row at step {self.position.step} "
                        f"(train.max_bad_steps={cfg.max_bad_steps}); last checkpoint left as it was"
                    )
                continue
            bad_in_a_row = 0
            window.append(loss)
            step = self.position.step
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                mean = torch.tensor([sum(window) / len(window)], device=self.device)
                dist.all_reduce(mean)
                self.position.train_seconds += window_s
                record = {
                    "loss": mean.item() / self.grid.world_size,
                    "lr": self.head_scheduler.get_last_lr()[0],
                    "samples_per_s": len(window) * self.samples_per_step / window_s,
                    "exchange_bytes": self.exchange.step_bytes,
                    "train_s": self.position.train_seconds,
                }
                self.logbook.log("train", step, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                window, window_s = [], 0.0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                self.logbook.log(
                    "eval", step, self.evaluate() | {"train_s": self.position.train_seconds + window_s}
                )
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                saved = (step, self.save())
        bar.close()
        final = self.evaluate(neighbours=self.neighbour_votes())
        record = final | {
            "train_s": self.position.train_seconds,
            "neighbours": self.config.model.neighbours.k,
        }
        self.logbook.log("eval", self.position.step, record)
        self.save()
        return final


def total_steps(train: TrainConfig, num_samples: int, samples_per_step: int) -> int:
    """`train.steps`, or with `train.epochs` > 0 the steps of that many passes over the training set."""
    if train.epochs > 0:
        return max(1, math.ceil(train.epochs * num_samples / samples_per_step))
    return train.steps
