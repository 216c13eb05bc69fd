"""The output layer's optimizer when its weights are bfloat16 or are updated chunk by chunk.

Two things the stock torch optimizers do not do:

- **bfloat16 weights without lost updates.** A bf16 weight has 8 significant bits: an Adam step of
  lr 1e-3 on a weight of 0.1 is below half its spacing and round-to-nearest drops it every time. Here
  the moments are float32 whatever the weight's dtype, the update is formed in float32, and the sum
  w + update is written back with stochastic rounding: up with probability equal to the distance to
  the lower bf16 neighbour over the spacing, so the rounding error is zero in expectation and small
  steps add up over many updates (ELMO, Zhang et al., ICML 2025, trains its classifier this way in pure
  bf16). Memory per label and embedding dimension d: 2d bytes of weights, plus 8d of Adam moments
  (kind "adam") or none (kind "sgd").
- **row updates** (`step_rows`): the chunked loss hands over the gradient of labels [lo, hi) as soon
  as it exists, the rows are updated in place, and the head's full gradient never exists. The step
  counter of such a parameter advances once per optimizer step (in `step`), however many chunks
  updated its rows.

Adam's coupled weight decay (adds lambda * w to the gradient) like torch.optim.Adam; the state keys
(`step`, `exp_avg`, `exp_avg_sq`) are torch.optim.Adam's, so checkpoints, their re-cut to another
model-parallel split and rewiring (which zeroes state tensors shaped like the weights) treat both the
same. Deterministic for a seeded `generator`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from pipeline.config import ModelConfig, TrainConfig

OptimizerKind = Literal["adam", "sgd"]


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16 with stochastic rounding: a uniform 16-bit integer is added to the float32
    bit pattern and the low 16 bits are dropped, so |x| rounds up with probability (|x| - lower) / spacing.
    Exact for values that are bf16 already; infinities and NaNs stay as they are."""
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & ~0xFFFF
    rounded = bits.view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class HeadOptimizer(torch.optim.Optimizer):
    """Adam (or plain SGD) with float32 state, stochastic rounding into bf16 weights, and row updates."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        kind: OptimizerKind = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if kind not in ("adam", "sgd"):
            raise ValueError(f"unknown head optimizer {kind!r}; expected 'adam' or 'sgd'")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.kind, self.generator = kind, generator
        self._rows_updated: set[int] = set()

    def _state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if self.kind == "adam":
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    def _group(self, p: nn.Parameter) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("the parameter is not one of this optimizer's")

    def _update(self, p: nn.Parameter, rows: slice, grad: torch.Tensor, group: dict, step: float) -> None:
        """w[rows] -= lr * (Adam direction or gradient), formed in float32, written back in p's dtype."""
        state = self.state[p]
        w = p.data[rows]
        g = grad.float()
        if group["weight_decay"]:
            g = g + group["weight_decay"] * w.float()
        if self.kind == "adam":
            beta1, beta2 = group["betas"]
            m, v = state["exp_avg"][rows], state["exp_avg_sq"][rows]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / (1 - beta2**step)).sqrt_().add_(group["eps"])
            g = m / denom / (1 - beta1**step)
        new = w.float() - group["lr"] * g
        if p.dtype == torch.bfloat16:
            w.copy_(stochastic_round_to_bf16(new, self.generator))
        else:
            w.copy_(new)

    @torch.no_grad()
    def step_rows(self, p: nn.Parameter, lo: int, hi: int, grad_rows: torch.Tensor) -> None:
        """Update rows [lo, hi) of `p` (first dimension) from their gradient `grad_rows` [hi - lo, ...]
        now; the step counter of `p` advances at the next `step()`."""
        state = self._state(p)
        self._update(p, slice(lo, hi), grad_rows, self._group(p), float(state["step"]) + 1)
        self._rows_updated.add(id(p))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """Update every parameter that has a gradient; advance the counters of those `step_rows` updated."""
        if closure is not None:
            raise ValueError("HeadOptimizer.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None and id(p) not in self._rows_updated:
                    continue
                state = self._state(p)
                if p.grad is not None:
                    self._update(p, slice(None), p.grad, group, float(state["step"]) + 1)
                state["step"] += 1
        self._rows_updated.clear()


def build_head_optimizer(
    head: nn.Module, model: ModelConfig, train: TrainConfig, generator: torch.Generator
) -> torch.optim.Optimizer:
    """The head's optimizer for this run: torch's fused Adam for a float32 head stepped after the
    backward (one pass over each [C_local, ...] tensor, the common case), a `HeadOptimizer` for bf16
    weights, row updates (`model.head_update = "chunk"`) or `train.head_optimizer = "sgd"`; its
    stochastic rounding draws from `generator` (this rank's, kept by checkpoints)."""
    decay = head.weight_decay()
    if model.head_dtype == "float32" and model.head_update == "step" and train.head_optimizer == "adam":
        return torch.optim.Adam(head.parameters(), lr=train.lr, weight_decay=decay, fused=True)
    return HeadOptimizer(
        head.parameters(), train.lr, train.head_optimizer, weight_decay=decay, generator=generator
    )
