"""The random-projection (RP) head: a slim classifier trained on randomly projected embeddings.

Yuan et al., "Accelerating Deep Learning with Millions of Classes", ECCV 2020: a fixed Gaussian
R (d x k, entries N(0, 1/k)) maps the embedding h to z = R^T h, and the slim classifier V (C x k, this
rank's label range) scores z. Output-layer compute, memory and gradient traffic drop by d / k. The full
classifier is recovered afterwards (`pipeline.models.recovery`).

R is never trained and never stored: it is regenerated from the seed, which is the one thing of it
that goes into the state_dict. Both R and the initial V come from CPU generators in float64, so every
rank, device and run gets bit-identical values, and V's rows do not depend on how the labels are split.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.parallel.block_init import block_rows, mix, uniform
from pipeline.parallel.label_range import LabelRange

PROJECTION_STREAM, SLIM_STREAM = 1, 2  # block_init streams of R and of V's initial rows


def projection_matrix(in_features: int, dim: int, seed: int) -> torch.Tensor:
    """R (in_features x dim) with entries N(0, 1/dim), a function of (in_features, dim, seed) only.

    Drawn in float64 on a CPU generator (the float32 CPU sampler takes a vectorised path whose rounding
    depends on the instruction set) and then rounded to float32.
    """
    gen = torch.Generator(device="cpu").manual_seed(mix(seed, PROJECTION_STREAM))
    r = torch.randn(in_features, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    return r.float()


def slim_init(label_range: LabelRange, dim: int, seed: int) -> torch.Tensor:
    """Initial rows of V for label_range: U(-1/sqrt(dim), 1/sqrt(dim)) like nn.Linear, drawn per block
    of global labels (`pipeline.parallel.block_init`), so any split of the labels yields the same rows."""
    bound = 1.0 / math.sqrt(dim)
    (rows,) = block_rows(label_range, seed, SLIM_STREAM, lambda gen, n: (uniform(gen, (n, dim), bound),))
    return rows


class RPHead(nn.Module):
    """Logits (h R) V^T + b for the labels of `label_range`.

    `weight` is the slim classifier V [label_range.size, dim], `bias` b [label_range.size]; both are
    sharded by label range. The buffer `seed` (int64, persistent) determines R; `projection` (R) is a
    non-persistent buffer, regenerated on construction and whenever a state_dict brings another seed.
    """

    label_order = None  # labels in id order
    label_unit = 1  # no state shared between labels
    preferred_loss = "squared_hinge"  # a linear classifier like the dense head's (README)

    def __init__(
        self,
        in_features: int,
        label_range: LabelRange,
        dim: int,
        seed: int,
        bias: bool = True,
        l2: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.dim, self.label_range, self.l2 = in_features, dim, label_range, l2
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("projection", projection_matrix(in_features, dim, seed), persistent=False)
        self._projection_seed = seed
        self.weight = nn.Parameter(slim_init(label_range, dim, seed))
        self.bias = nn.Parameter(torch.zeros(label_range.size)) if bias else None

    @classmethod
    def from_config(cls, model: ModelConfig, label_range: LabelRange, seed: int) -> RPHead:
        """The projection and V come from model.rp.seed (not the run's seed); trained with the L2
        penalty that its dual recovery assumes, model.rp.recovery_lambda."""
        rp = model.rp
        return cls(model.embed_dim, label_range, rp.dim, seed=rp.seed, l2=rp.recovery_lambda)

    @property
    def R(self) -> torch.Tensor:  # noqa: N802 (the paper's name)
        """The fixed projection R [in_features, dim]."""
        return self.projection

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h R first: N*d*k + N*k*C multiply-adds, against d*k*C + N*d*C for h (R V^T). The bias is
        # added in place after the product: on CPU, addmm with a broadcast bias (what F.linear does)
        # took 3x the time of the plain product at k = 64, C = 200,000 (see launch/benchmarks/rp.py).
        # A bfloat16 V (model.head_dtype) multiplies bf16 z with float32 accumulation.
        logits = self.linear_input(h).to(self.weight.dtype) @ self.weight.t()
        return logits if self.bias is None else logits.add_(self.bias)

    def linear_input(self, h: torch.Tensor) -> torch.Tensor:
        """z = h R, with logits = z V^T + b: lets the softmax loss fuse the product."""
        return h.to(self.projection.dtype) @ self.projection

    def loss_features(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's input: the projected embeddings z = h R [N, dim]."""
        return self.linear_input(h)

    def chunk_logits(self, features: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Logits [N, hi - lo] = z V[lo:hi]^T + b[lo:hi] from z = `loss_features(h)`, in z's dtype."""
        logits = features @ self.weight[lo:hi].to(features.dtype).t()
        return logits if self.bias is None else logits.add_(self.bias[lo:hi].to(features.dtype))

    def replicated_parameters(self) -> list[nn.Parameter]:
        return []

    def sharded_parameters(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def output_bias(self) -> nn.Parameter | None:
        return self.bias

    def weight_decay(self) -> float:
        """`l2`: Adam's coupled weight decay adds l2 * w to the gradient, the gradient of
        (l2/2)||w||^2, the penalty of the regularised problem that recovery solves."""
        return self.l2

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Nothing changes between steps."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        seed = int(self.seed)
        if seed != self._projection_seed:
            r = projection_matrix(self.in_features, self.dim, seed)
            self.projection = r.to(device=self.projection.device, dtype=self.projection.dtype)
            self._projection_seed = seed

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, dim={self.dim}, labels=[{self.label_range.start}, "
            f"{self.label_range.stop}), seed={int(self.seed)}, bias={self.bias is not None}"
        )
