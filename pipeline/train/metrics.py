"""XMC metrics over a whole test set: P@k, nDCG@k, PSP@k, PSnDCG@k, R@k.

Conventions follow the Extreme Classification Repository's evaluation code (pyxclib's xc_metrics),
for a sample with label set y (duplicates count once), predictions p_1..p_k in rank order, hit_j =
[p_j in y], discount d_j = 1 / log2(j + 1), inverse propensity w_l = 1 / prop_l:

- P@k = sum_{j<=k} hit_j / k.
- R@k = sum_{j<=k} hit_j / |y|.
- nDCG@k = sum_{j<=k} hit_j d_j / sum_{j<=min(k,|y|)} d_j.
- PSP@k = sum over samples of sum_{j<=k} hit_j w_{p_j} / sum over samples of the best achievable value,
  the sum of the min(k, |y|) largest w_l over l in y (the 1/k cancels): a ratio of totals, not a mean
  of per-sample ratios.
- PSnDCG@k = likewise the total of sum_{j<=k} hit_j w_{p_j} d_j / IDCG over the total of the same with
  the sample's true labels sorted by decreasing w, IDCG being nDCG's normaliser.

P, R and nDCG are means over all valid samples; a sample with no labels counts with 0 everywhere (and
adds 0 to both totals of the PS metrics). Padding samples (valid=False) are ignored. Prediction ids -1
(fewer labels than k) never hit. Sums are float64; `compute(group)` all-reduces sums and counts (group
None: the default group, as in torch.distributed), so the result equals a single-process pass over the
union of the ranks' samples.

Propensities (Jain et al. 2016): prop_l = 1 / (1 + C (N_l + B)^(-A)), C = (ln N - 1)(B + 1)^A, N_l the
training frequency of label l and N the number of training samples; A = 0.55, B = 1.5 by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from pipeline.parallel.distributed import collective_device

NAMES = ("P", "nDCG", "PSP", "PSnDCG", "R")
# Rows of the accumulator: per-sample means, then the PS numerators and denominators.
_ROWS = ("P", "nDCG", "R", "PSP_num", "PSP_den", "PSnDCG_num", "PSnDCG_den")


def propensities(
    label_frequencies: torch.Tensor, num_train: int, A: float = 0.55, B: float = 1.5
) -> torch.Tensor:
    """Jain et al. 2016 propensity of every label from its training frequency (float64)."""
    freq = torch.as_tensor(label_frequencies, dtype=torch.float64)
    C = (math.log(num_train) - 1) * (B + 1) ** A
    return 1 / (1 + C * (freq + B).pow(-A))


class XMCMetrics:
    """Accumulates the metrics of top-k predictions batch by batch; `compute` gives the totals."""

    def __init__(
        self,
        num_labels: int,
        label_frequencies: torch.Tensor,
        num_train: int,
        ks: Sequence[int] = (1, 3, 5),
        A: float = 0.55,
        B: float = 1.5,
    ) -> None:
        self.num_labels, self.ks, self.num_train, self.A, self.B = num_labels, tuple(ks), num_train, A, B
        self.label_frequencies = torch.as_tensor(label_frequencies)
        self.inv_prop = 1 / propensities(self.label_frequencies, num_train, A, B)
        if self.inv_prop.numel() != num_labels:
            raise ValueError(f"{self.inv_prop.numel()} label frequencies for {num_labels} labels")
        self.discount = 1 / torch.log2(torch.arange(max(self.ks), dtype=torch.float64) + 2)
        self.sums = torch.zeros(len(_ROWS), len(self.ks), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(
        self,
        topk_ids: torch.Tensor,
        label_indptr: torch.Tensor,
        label_indices: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """topk_ids [N, >= max(ks)] global ids in rank order (-1 = none); truths as CSR over the N rows.
        Inputs may live on any device; the accumulation runs on the CPU."""
        topk_ids, label_indptr, label_indices = (t.cpu() for t in (topk_ids, label_indptr, label_indices))
        n, kmax = topk_ids.shape[0], max(self.ks)
        if topk_ids.shape[1] < kmax:
            raise ValueError(f"{topk_ids.shape[1]} predictions per sample, need {kmax}")
        pred = topk_ids[:, :kmax].long()
        rows = torch.repeat_interleave(torch.arange(n), torch.diff(label_indptr).long())
        truth = torch.unique(rows * self.num_labels + label_indices.long())  # sorted (row, label) keys
        t_row, t_label = truth // self.num_labels, truth % self.num_labels
        num_true = torch.bincount(t_row, minlength=n).to(torch.float64)

        keys = torch.arange(n)[:, None] * self.num_labels + pred
        hit = (torch.isin(keys, truth) & (pred >= 0)).to(torch.float64)
        ps_hit = hit * self.inv_prop[pred.clamp(min=0)]
        best = self._best_ps(t_row, self.inv_prop[t_label], n, kmax)

        cum_d = self.discount.cumsum(0)
        valid = torch.ones(n, dtype=torch.bool) if valid is None else valid.bool().cpu()
        for i, k in enumerate(self.ks):
            idcg = cum_d[(num_true.clamp(1, k) - 1).long()]
            d = self.discount[:k]
            per_sample = torch.stack(
                [
                    hit[:, :k].sum(1) / k,
                    (hit[:, :k] * d).sum(1) / idcg,
                    hit[:, :k].sum(1) / num_true.clamp(min=1),
                    ps_hit[:, :k].sum(1),
                    best[:, :k].sum(1),
                    (ps_hit[:, :k] * d).sum(1) / idcg,
                    (best[:, :k] * d).sum(1) / idcg,
                ]
            )
            self.sums[:, i] += (per_sample * valid).sum(1)
        self.count += valid.sum()

    @staticmethod
    def _best_ps(t_row: torch.Tensor, weight: torch.Tensor, n: int, kmax: int) -> torch.Tensor:
        """[n, kmax]: each sample's true-label weights in decreasing order, zero-padded."""
        order = weight.argsort(descending=True, stable=True)
        order = order[t_row[order].argsort(stable=True)]  # by row, then by decreasing weight
        row, w = t_row[order], weight[order]
        starts = torch.zeros(n + 1, dtype=torch.long)
        starts[1:] = torch.bincount(row, minlength=n).cumsum(0)
        pos = torch.arange(row.numel()) - starts[row]
        best = torch.zeros(n, kmax, dtype=torch.float64)
        keep = pos < kmax
        best[row[keep], pos[keep]] = w[keep]
        return best

    def fresh(self) -> XMCMetrics:
        """An empty accumulator with the same settings."""
        return XMCMetrics(self.num_labels, self.label_frequencies, self.num_train, self.ks, self.A, self.B)

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Metrics over every sample the ranks of `group` saw; every rank of it must call this.

        group None means the default (world) group, as in torch.distributed, or this process alone
        when torch.distributed is not initialised. Every metric is a ratio of totals, so a sample
        seen by several ranks the same number of times each (e.g. every rank of a model-parallel
        group counting the group's batch) changes nothing; the usual choice is ranks with disjoint
        samples. The state itself is left unreduced.
        """
        totals = torch.cat([self.sums.flatten(), self.count.view(1)])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            totals = totals.to(collective_device(group))
            dist.all_reduce(totals, group=group)
            totals = totals.cpu()
        sums, count = totals[:-1].view_as(self.sums), totals[-1]
        s = dict(zip(_ROWS, sums, strict=True))
        mean = 1 / count if count > 0 else 0.0
        ratio = {
            "PSP": torch.where(s["PSP_den"] > 0, s["PSP_num"] / s["PSP_den"], 0),
            "PSnDCG": torch.where(s["PSnDCG_den"] > 0, s["PSnDCG_num"] / s["PSnDCG_den"], 0),
        }
        values = {"P": s["P"] * mean, "nDCG": s["nDCG"] * mean, "R": s["R"] * mean, **ratio}
        return {f"{name}@{k}": float(values[name][i]) for name in NAMES for i, k in enumerate(self.ks)}


def popularity_baseline(
    metrics: XMCMetrics, batches: Iterable, group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Metrics of predicting the most frequent training labels (ties: smaller id) for every sample.

    The floor any model must beat. `metrics` gives the settings (it is not modified); `batches` yield
    objects with label_indptr, label_indices and optionally valid; `group` as in `XMCMetrics.compute`.
    """
    acc, kmax = metrics.fresh(), max(metrics.ks)
    top = acc.label_frequencies.argsort(descending=True, stable=True)[:kmax]
    top = torch.nn.functional.pad(top, (0, kmax - top.numel()), value=-1)
    for batch in batches:
        n = batch.label_indptr.numel() - 1
        acc.update(top.expand(n, -1), batch.label_indptr, batch.label_indices, getattr(batch, "valid", None))
    return acc.compute(group)
