#!/usr/bin/env python3
"""GPU checks of the FFI CUDA kernels: `python3 launch/gpu/check_cuda.py [--skip-train] [--skip-perf]
[--skip-group | --group-only]`.

1. correctness: torch.ops.xmc on CUDA against a float64 gather/scatter reference and against the CPU
   ops, values and both gradients, float32 (1e-5 of the largest magnitude) and bfloat16 (1e-2),
   each dx mode (XMC_FFI_DX=atomic|csc, read by the launcher at every call), the combined
   ffi_backward (both gradients: the fused kernel in atomic mode; one gradient: the separate kernels),
   odd shapes (N = 1, K = 1, K = H, odd C and H, several batch tiles, a tiny L2 budget that forces
   many tiles); the autograd module end to end; rewiring on GPU tensors.
2. a 670K-label training step: embedding 768 -> dropout -> Linear(768, 65536) + ReLU ->
   FixedFanInSparse(65536, 670091, 32) -> squared hinge, Adam, batch 128: loss finite and falling
   over 20 steps on one batch, peak memory (target <= 2 GB; paper 1.74 GB), step time.
3. kernel timings at 670K labels, H 65,536, K 32/64, batch 128/512, both dx modes: seconds, GB/s of
   the minimal traffic against the card's peak; the fused backward (dx + dW in one pass) next to the
   separate dx (atomic) + dW calls, also with tiles as wide as the separate kernels' (L2 budget
   doubled); fwd+bwd (forward + fused backward + bias sum, the autograd path) against dense
   nn.Linear(768, 670091).

4. the group-shared layer (HASTE; torch.ops.xmc.ffi_group_forward / ffi_group_backward): correctness
   against the float64 dense reference ffi_group_to_dense (tests/reference.py) and the CPU ops,
   float32 (1e-5) and bfloat16 (1e-2), G = 1 (the plain kernels and, XMC_FFI_GROUP_PLAIN=0, the group
   kernels), 8, 16, 32 and odd G, partial last groups, G > C, groups wider than a block, several batch
   tiles and K-chunks, bf16 on tensor cores and (XMC_FFI_GROUP_MMA=0) SIMT, one gradient or both; the
   autograd module; timings at 670K labels, H 65,536, K 32, batch 128/512, G = 1, 8, 16, 32, float32
   and bfloat16: forward, backward, fwd+bwd, FLOP/s (2*N*C*K per product) and bytes against the card's
   peaks, next to the dense F.linear of the same FLOPs (K inputs) and the paper's dense(768) layer.

One line per case; the last line is one JSON object; exit status 1 on any failure. Imports only
torch, pipeline.ops / pipeline.models.heads.ffi and the float64 references of tests/reference.py
(the GPU machines lack the training stack).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # GPU machines run it from a checkout

from launch.benchmarks.ffi import timed  # noqa: E402
from pipeline.models.heads.ffi import FFIHead  # noqa: E402
from pipeline.ops import FixedFanInSparse, draw_fan_in_indices, load_ops, rewire  # noqa: E402
from pipeline.parallel.label_range import LabelRange  # noqa: E402
from tests.reference import (  # noqa: E402
    ffi_backward_input_chunked,
    ffi_backward_weight_chunked,
    ffi_forward_chunked,
    ffi_group_to_dense,
    rel_err_to_scale,
)

MODES = ("atomic", "csc")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Published peak memory bandwidth (bytes/s) by card name, when the driver does not give clock and bus.
PEAK_BW = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
# Published dense peaks (FLOP/s): float32 on the SIMT cores, bfloat16 on tensor cores (no sparsity).
PEAK_FLOPS = {
    "H200": (67e12, 989e12),
    "H100 NVL": (60e12, 835e12),
    "H100 PCIe": (51e12, 756e12),
    "H100": (67e12, 989e12),
    "A100": (19.5e12, 312e12),
}

failures: list[str] = []


def report(ok: bool, line: str) -> None:
    print(("ok    " if ok else "FAIL  ") + line, flush=True)
    if not ok:
        failures.append(line)


def set_mode(mode: str) -> None:
    os.environ["XMC_FFI_DX"] = mode


# ---------------------------------------------------------------- 1. correctness


def random_indices(c: int, h: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return draw_fan_in_indices(c, h, k, gen).to(torch.int32)


def check_case(n: int, h: int, c: int, k: int, bias: bool, dtype: torch.dtype, budget_mb: str | None) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(n * 1_000_003 + h * 1009 + c * 31 + k)
    x = torch.randn(n, h, generator=gen).to(dtype)
    w = torch.randn(c, k, generator=gen).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if bias else None
    dy = torch.randn(n, c, generator=gen).to(dtype)
    idx = random_indices(c, h, k, gen)
    xg, wg, bg, dyg, ig = (t.to(dev) if t is not None else None for t in (x, w, b, dy, idx))
    tol = TOL[dtype]
    name = f"N={n} H={h} C={c} K={k} bias={int(bias)} {str(dtype)[6:]}" + (
        f" l2_budget={budget_mb}MB" if budget_mb else ""
    )
    if budget_mb:
        os.environ["XMC_FFI_L2_BUDGET_MB"] = budget_mb
    try:
        ref_y = ffi_forward_chunked(xg, wg, ig, bg)
        ref_dw = ffi_backward_weight_chunked(dyg, xg, ig)
        ref_dx = ffi_backward_input_chunked(dyg, wg, ig, h)
        cpu = {
            "y": torch.ops.xmc.ffi_forward(x, w, idx, b),
            "dW": torch.ops.xmc.ffi_backward_weight(dy, x, idx),
            "dx": torch.ops.xmc.ffi_backward_input(dy, w, idx, h),
        }
        cpu_dx, cpu_dw = torch.ops.xmc.ffi_backward(dy, x, w, idx, True, True)
        outs = {
            "y": torch.ops.xmc.ffi_forward(xg, wg, ig, bg),
            "dW": torch.ops.xmc.ffi_backward_weight(dyg, xg, ig),
        }
        refs = {"y": ref_y, "dW": ref_dw, "dx": ref_dx}
        for mode in MODES:
            set_mode(mode)
            outs[f"dx[{mode}]"] = torch.ops.xmc.ffi_backward_input(dyg, wg, ig, h)
            # Both gradients in one call: the fused kernel in atomic mode (forced for bf16 too, whose
            # default is the separate kernels), csc dx + dW in csc mode.
            os.environ["XMC_FFI_FUSED"] = "1"
            outs[f"dx[bwd {mode}]"], outs[f"dW[bwd {mode}]"] = torch.ops.xmc.ffi_backward(
                dyg, xg, wg, ig, True, True
            )
            os.environ.pop("XMC_FFI_FUSED")
        set_mode("atomic")
        outs["dx[bwd auto]"], outs["dW[bwd auto]"] = torch.ops.xmc.ffi_backward(dyg, xg, wg, ig, True, True)
        only_dx, none_w = torch.ops.xmc.ffi_backward(dyg, xg, wg, ig, True, False)
        none_x, only_dw = torch.ops.xmc.ffi_backward(dyg, xg, wg, ig, False, True)
        outs["dx[bwd x only]"], outs["dW[bwd W only]"] = only_dx, only_dw
        torch.cuda.synchronize()
        for key, got in outs.items():
            base = key.split("[")[0]
            e_ref = rel_err_to_scale(got, refs[base])
            e_cpu = rel_err_to_scale(got.cpu(), cpu[base])
            ok = got.dtype == dtype and e_ref <= tol and e_cpu <= 2 * tol
            report(ok, f"{name} {key:<15} vs float64 {e_ref:.2e}  vs CPU op {e_cpu:.2e}")
        e_cpu_bwd = max(rel_err_to_scale(cpu_dx, ref_dx.cpu()), rel_err_to_scale(cpu_dw, ref_dw.cpu()))
        report(
            none_w is None and none_x is None and e_cpu_bwd <= tol,
            f"{name} ffi_backward: gradients not asked for are None; CPU op vs float64 {e_cpu_bwd:.2e}",
        )
    except Exception as exc:  # a kernel error must fail the case, not end the run
        report(False, f"{name}: {type(exc).__name__}: {exc}")
    finally:
        os.environ.pop("XMC_FFI_L2_BUDGET_MB", None)
        set_mode("atomic")


def check_module() -> None:
    """FixedFanInSparse on CUDA through autograd: gradients of x, values and bias."""
    dev = torch.device("cuda")
    for mode in MODES:
        set_mode(mode)
        layer = FixedFanInSparse(300, 1001, 16, seed=3).to(dev)
        x = torch.randn(67, 300, device=dev, requires_grad=True)
        dy = torch.randn(67, 1001, device=dev)
        layer(x).backward(dy)
        ref_dx = ffi_backward_input_chunked(dy, layer.values.detach(), layer.indices, 300)
        ref_dw = ffi_backward_weight_chunked(dy, x.detach(), layer.indices)
        errs = [
            rel_err_to_scale(x.grad, ref_dx),
            rel_err_to_scale(layer.values.grad, ref_dw),
            rel_err_to_scale(layer.bias.grad, dy.sum(0)),
        ]
        report(all(e <= 1e-5 for e in errs), f"module autograd [{mode}] dx/dW/db errors {errs}")
    set_mode("atomic")


def check_rewiring() -> None:
    """rewire() on CUDA tensors: fan-in kept, distinct indices, exactly the rewired entries reset."""
    dev = torch.device("cuda")
    try:
        layer = FixedFanInSparse(512, 4099, 32, seed=5).to(dev)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        x = torch.randn(64, 512, device=dev)
        layer(x).square().mean().backward()
        opt.step()
        before_i, before_v = layer.indices.clone(), layer.values.detach().clone()
        state = opt.state[layer.values]
        before_m = [state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
        gen = torch.Generator(device=dev).manual_seed(11)
        count = rewire(layer, 0.25, gen, optimizer=opt)
        changed = layer.indices != before_i
        per_row = changed.sum(1)
        sorted_i = layer.indices.sort(1).values
        distinct = bool((sorted_i[:, 1:] != sorted_i[:, :-1]).all())
        in_range = bool(((layer.indices >= 0) & (layer.indices < 512)).all())
        values_ok = bool((layer.values.detach()[changed] == 0).all()) and torch.equal(
            layer.values.detach()[~changed], before_v[~changed]
        )
        moments_ok = all(
            bool((state[m][changed] == 0).all()) and torch.equal(state[m][~changed], old[~changed])
            for m, old in zip(("exp_avg", "exp_avg_sq"), before_m, strict=True)
        )
        ok = (
            count == 4099 * 8
            and bool((per_row == 8).all())
            and layer.indices.shape == (4099, 32)
            and layer.indices.device.type == "cuda"
            and distinct
            and in_range
            and values_ok
            and moments_ok
        )
        report(
            ok,
            f"rewire on cuda: count={count} per-row changed {per_row.min().item()}..{per_row.max().item()} "
            f"distinct={distinct} in_range={in_range} values={values_ok} moments={moments_ok}",
        )
        # The kernels see the new wiring (the CSC index is rebuilt every call).
        y = layer(x)
        for mode in MODES:
            set_mode(mode)
            dx = torch.ops.xmc.ffi_backward_input(y.detach(), layer.values.detach(), layer.indices, 512)
            e = rel_err_to_scale(
                dx, ffi_backward_input_chunked(y.detach(), layer.values.detach(), layer.indices, 512)
            )
            report(e <= 1e-5, f"after rewiring: dx[{mode}] vs float64 {e:.2e}")
        e = rel_err_to_scale(
            y, ffi_forward_chunked(x, layer.values.detach(), layer.indices, layer.bias.detach())
        )
        report(e <= 1e-5, f"after rewiring: forward vs float64 {e:.2e}")
    except Exception as exc:
        report(False, f"rewire on cuda: {type(exc).__name__}: {exc}")
    finally:
        set_mode("atomic")


CASES = [
    # N, H, C, K, bias, L2 budget override (MB) to force many batch tiles
    (1, 37, 45, 7, True, None),
    (5, 37, 45, 37, True, None),  # K = H
    (70, 64, 41, 1, False, None),  # K = 1
    (3, 65, 1, 65, True, None),  # C = 1, K = H
    (130, 41, 77, 33, True, None),
    (130, 41, 77, 33, True, "0.001"),
    (128, 1001, 3001, 32, True, None),
    (257, 513, 1999, 64, False, None),
    (200, 31, 260, 5, True, "0.02"),
    (512, 65536, 8191, 32, True, None),  # the real H: tiles sized by the card's L2
    (128, 65536, 20001, 64, True, None),
]


# ---------------------------------------------------------------- 2. training step at 670K labels


class SquaredHinge(torch.autograd.Function):
    """mean over samples of sum over labels of max(0, 1 - s*y)^2, s = +1 on the sample's positives,
    -1 elsewhere; positives given as label lists [N, P] (no dense target matrix). The gradient is
    written over the saved logits: one [N, C] buffer instead of three (the logits are dead by then)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        total = (logits + 1.0).clamp_(min=0.0).square_().sum()  # every label as a negative ...
        yp = logits.gather(1, positives)  # ... then the positives corrected
        total = total - torch.relu(yp + 1.0).square().sum() + torch.relu(1.0 - yp).square().sum()
        ctx.save_for_backward(logits, positives)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, positives = ctx.saved_tensors
        scale = grad_out / logits.shape[0]
        yp = logits.gather(1, positives)
        grad = logits.add_(1.0).clamp_(min=0.0).mul_(2.0 * scale)  # in place: d/dy (1 + y)^2
        grad.scatter_(1, positives, -2.0 * torch.relu(1.0 - yp) * scale)
        return grad, None


def train_check(steps: int = 20, batch: int = 128) -> dict:
    dev = torch.device("cuda")
    labels, hidden, fan_in, embed = 670_091, 65_536, 32, 768
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    head = FFIHead(embed, LabelRange(0, labels, labels), hidden, fan_in, dropout=0.2, seed=0).to(dev)
    build_s = time.perf_counter() - t0
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    emb = torch.randn(batch, embed, device=dev, generator=gen)
    positives = draw_fan_in_indices(batch, labels, 5, gen)  # 5 distinct labels per sample
    losses, times = [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = SquaredHinge.apply(head(emb), positives)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # synchronises
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(dev)
    finite = all(math.isfinite(v) for v in losses)
    falling = finite and losses[-1] < losses[0] and losses[-1] <= min(losses[: steps // 2])
    result = {
        "batch": batch,
        "steps": steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": [round(v, 4) for v in losses],
        "step_s_median": statistics.median(times[2:]),
        "peak_bytes": peak,
        "peak_GiB": peak / 2**30,
        "peak_le_2GB": peak <= 2 * 10**9,
        "head_build_s": build_s,
    }
    report(
        finite and falling, f"670K training step: loss {losses[0]:.4g} -> {losses[-1]:.4g} over {steps} steps"
    )
    report(peak <= 2 * 10**9, f"670K training step: peak memory {peak / 2**30:.3f} GiB (target <= 2 GB)")
    print(
        f"      step time median {result['step_s_median'] * 1e3:.2f} ms, head built in {build_s:.1f} s",
        flush=True,
    )
    del head, opt, emb
    torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- 3. timings at scale


def peak_bandwidth() -> tuple[float, str]:
    """Bytes/s of the card: from memory clock and bus width when torch exposes them, else by name."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8, "clock x bus width (double data rate)"
    for key, value in PEAK_BW.items():  # most specific names first
        if key in props.name:
            return value, f"published figure for {key}"
    return math.nan, "unknown card"


def l2_budget_mb() -> float:
    """The launcher's default L2 budget for one tile's slabs (45% of the card's L2), in MiB; 0 if unknown."""
    return 0.45 * getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) / 2**20


def cuda_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds over repeats after one warm-up, CUDA events on the current stream."""
    return timed(fn, repeats, torch.device("cuda"))


def perf_check(peak_bw: float) -> list[dict]:
    dev = torch.device("cuda")
    labels, hidden = 670_091, 65_536
    results = []
    gen = torch.Generator(device=dev).manual_seed(1)
    for k in (32, 64):
        idx = draw_fan_in_indices(labels, hidden, k, gen).to(torch.int32)
        for dtype in (torch.float32, torch.bfloat16):
            w = (torch.rand(labels, k, device=dev, generator=gen) - 0.5).to(dtype)
            b = torch.zeros(labels, device=dev, dtype=dtype)
            for n in (128, 512):
                if dtype == torch.bfloat16 and (n, k) != (128, 32):
                    continue  # bf16 once, at the paper's shape
                x = torch.randn(n, hidden, device=dev, generator=gen).to(dtype)
                dy = torch.randn(n, labels, device=dev, generator=gen).to(dtype)
                e = x.element_size()
                traffic = {  # each operand read or written once: the memory-bound floor
                    "forward": e * n * hidden + (e + 4) * labels * k + e * labels + e * n * labels,
                    "dx": e * n * labels + (e + 4) * labels * k + e * n * hidden,
                    "dW": e * n * labels + e * n * hidden + (e + 4) * labels * k,
                    # dy + x + W + I read once, dx + dW written once
                    "bwd_fused": e * n * labels + 2 * e * n * hidden + (2 * e + 4) * labels * k,
                }
                row = {"N": n, "H": hidden, "C": labels, "K": k, "dtype": str(dtype)[6:]}
                row["forward_s"] = cuda_time(
                    lambda x=x, w=w, b=b, i=idx: torch.ops.xmc.ffi_forward(x, w, i, b)
                )
                row["dW_s"] = cuda_time(lambda x=x, dy=dy, i=idx: torch.ops.xmc.ffi_backward_weight(dy, x, i))
                for mode in MODES:
                    set_mode(mode)
                    row[f"dx_{mode}_s"] = cuda_time(
                        lambda dy=dy, w=w, i=idx: torch.ops.xmc.ffi_backward_input(dy, w, i, hidden)
                    )
                set_mode("atomic")
                row["dx_best"] = min(MODES, key=lambda m: row[f"dx_{m}_s"])
                # The same gathers by torch's own kernel: embedding_bag over the rows of x^T (sum of the
                # K weighted rows of each output; no transposes of x or y counted).
                xt = x.t().contiguous()
                offsets = torch.arange(0, labels * k, k, device=dev, dtype=torch.int32)
                flat_idx, flat_w = idx.view(-1), w.view(-1)

                def bag(xt=xt, i=flat_idx, o=offsets, pw=flat_w):
                    return nn.functional.embedding_bag(i, xt, o, mode="sum", per_sample_weights=pw)

                row["embedding_bag_fwd_s"] = cuda_time(bag)
                del xt
                gathered = e * n * labels * k  # bytes of x rows the forward gathers (through L2)
                row["forward_gather_Bps"] = gathered / row["forward_s"]
                row["embedding_bag_gather_Bps"] = gathered / row["embedding_bag_fwd_s"]
                row["bias_grad_s"] = cuda_time(lambda dy=dy: dy.sum(0))
                row["bwd_separate_s"] = cuda_time(
                    lambda x=x, dy=dy, w=w, i=idx: (
                        torch.ops.xmc.ffi_backward_input(dy, w, i, hidden),
                        torch.ops.xmc.ffi_backward_weight(dy, x, i),
                    )
                )

                def backward(x=x, dy=dy, w=w, i=idx):
                    return torch.ops.xmc.ffi_backward(dy, x, w, i, True, True)

                row["bwd_s"] = cuda_time(backward)  # the default: fused for float32 only
                os.environ["XMC_FFI_FUSED"] = "1"
                row["bwd_fused_s"] = cuda_time(backward)
                # L2 budget doubled: tiles twice as wide; tells whether the default width pays.
                row["bwd_fused_wide_s"] = math.nan
                if l2_budget_mb() > 0:
                    os.environ["XMC_FFI_L2_BUDGET_MB"] = f"{2 * l2_budget_mb():.3f}"
                    try:
                        row["bwd_fused_wide_s"] = cuda_time(backward)
                    finally:
                        os.environ.pop("XMC_FFI_L2_BUDGET_MB", None)
                os.environ.pop("XMC_FFI_FUSED")
                row["fused_over_separate"] = row["bwd_fused_s"] / row["bwd_separate_s"]
                dx_s = row[f"dx_{row['dx_best']}_s"]
                row["fwd_bwd_separate_s"] = row["forward_s"] + row["dW_s"] + dx_s + row["bias_grad_s"]
                # The autograd path: forward, one ffi_backward call, the bias column sum.
                row["fwd_bwd_s"] = row["forward_s"] + row["bwd_s"] + row["bias_grad_s"]
                for name, key in (
                    ("forward", "forward_s"),
                    ("dW", "dW_s"),
                    ("dx", f"dx_{row['dx_best']}_s"),
                    ("bwd_fused", "bwd_fused_s"),
                ):
                    row[f"{name}_GB_per_s"] = traffic[name] / row[key] / 1e9
                    row[f"{name}_frac_peak"] = traffic[name] / row[key] / peak_bw
                # The paper's dense baseline at the same batch and dtype: nn.Linear(768, C) fwd+bwd.
                dense = nn.Linear(768, labels, device=dev, dtype=dtype)
                emb = torch.randn(n, 768, device=dev, dtype=dtype, requires_grad=True)

                def dense_step(dense=dense, emb=emb, dy=dy):
                    dense.weight.grad = dense.bias.grad = emb.grad = None
                    dense(emb).backward(dy)

                row["dense768_fwd_bwd_s"] = cuda_time(dense_step)
                row["dense_over_ffi"] = row["dense768_fwd_bwd_s"] / row["fwd_bwd_s"]
                del dense, emb
                print(
                    f"perf N={n} K={k} {row['dtype']}: fwd {row['forward_s'] * 1e3:.3f} ms "
                    f"({row['forward_frac_peak']:.0%} peak), dx atomic {row['dx_atomic_s'] * 1e3:.3f} ms, "
                    f"dx csc {row['dx_csc_s'] * 1e3:.3f} ms, dW {row['dW_s'] * 1e3:.3f} ms "
                    f"({row['dW_frac_peak']:.0%}); fwd+bwd {row['fwd_bwd_s'] * 1e3:.3f} ms vs dense(768) "
                    f"{row['dense768_fwd_bwd_s'] * 1e3:.3f} ms = {row['dense_over_ffi']:.2f}x",
                    flush=True,
                )
                print(
                    f"perf N={n} K={k} {row['dtype']}: gathers {gathered / 1e9:.1f} GB: ffi forward "
                    f"{row['forward_gather_Bps'] / 1e12:.2f} TB/s, torch embedding_bag (same gathers) "
                    f"{row['embedding_bag_fwd_s'] * 1e3:.3f} ms = "
                    f"{row['embedding_bag_gather_Bps'] / 1e12:.2f} TB/s",
                    flush=True,
                )
                print(
                    f"perf N={n} K={k} {row['dtype']}: backward fused {row['bwd_fused_s'] * 1e3:.3f} ms "
                    f"({row['bwd_fused_frac_peak']:.0%} peak), separate dx+dW "
                    f"{row['bwd_separate_s'] * 1e3:.3f} ms, fused/separate {row['fused_over_separate']:.3f}; "
                    f"fused with the L2 budget doubled "
                    f"{row['bwd_fused_wide_s'] * 1e3:.3f} ms",
                    flush=True,
                )
                results.append(row)
                del x, dy
                torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- 4. group-shared fan-in

# N, H, C, K, G, bias: partial last groups, G > C, groups wider than a block's 64 labels, G not a
# multiple of 8, several batch tiles (64 / 128 rows) and K-chunks (16 / 32), the real H.
GROUP_CASES = [
    (1, 37, 45, 7, 1, True),
    (70, 41, 77, 33, 1, False),
    (5, 37, 45, 19, 8, True),  # 45 = 5 groups of 8 + 5
    (130, 41, 77, 33, 8, True),
    (67, 64, 50, 16, 16, True),  # 50 = 3 groups of 16 + 2
    (200, 101, 160, 40, 16, False),
    (129, 1001, 3001, 32, 32, False),
    (9, 53, 20, 5, 32, True),  # G > C: one partial group
    (33, 29, 70, 9, 12, True),
    (3, 300, 600, 4, 160, True),  # 160 labels per group: slices of 64
    (257, 513, 1999, 64, 16, True),
    (512, 65536, 8191, 32, 16, True),
]


def set_env(env: dict[str, str]) -> None:
    for key in ("XMC_FFI_GROUP_PLAIN", "XMC_FFI_GROUP_MMA"):
        os.environ.pop(key, None)
    os.environ.update(env)


def group_variants(g: int, c: int, dtype: torch.dtype) -> list[dict[str, str]]:
    """The launcher's paths for this case: the default, plus the group kernels at G = 1 and SIMT where
    bf16 would take the tensor cores (G % 16 == 0 or one group)."""
    variants: list[dict[str, str]] = [{}]
    if g == 1:
        variants.append({"XMC_FFI_GROUP_PLAIN": "0"})
    if dtype == torch.bfloat16 and (g % 16 == 0 or g >= c):
        variants.append({"XMC_FFI_GROUP_MMA": "0"})
    return variants


def group_reference(
    x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, b: torch.Tensor | None, dy: torch.Tensor, g: int
) -> dict[str, torch.Tensor]:
    """y, dx, dW in float64 through the dense weight D [C, H] (small shapes)."""
    dense = ffi_group_to_dense(w.double(), idx, g, x.shape[1])
    xd, dyd = x.double(), dy.double()
    rows = idx.long()[torch.arange(w.shape[0], device=idx.device) // g]
    return {
        "y": xd @ dense.t() + (b.double() if b is not None else 0),
        "dx": dyd @ dense,
        "dW": (dyd.t() @ xd).gather(1, rows),
    }


def check_group_case(n: int, h: int, c: int, k: int, g: int, bias: bool, dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(n * 1_000_003 + h * 1009 + c * 31 + k * 7 + g)
    q = -(-c // g)
    x = torch.randn(n, h, generator=gen).to(dtype)
    w = torch.randn(c, k, generator=gen).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if bias else None
    dy = torch.randn(n, c, generator=gen).to(dtype)
    idx = random_indices(q, h, k, gen)
    xg, wg, bg, dyg, ig = (t.to(dev) if t is not None else None for t in (x, w, b, dy, idx))
    tol = TOL[dtype]
    base = f"group N={n} H={h} C={c} K={k} G={g} bias={int(bias)} {str(dtype)[6:]}"
    try:
        refs = group_reference(xg, wg, ig, bg, dyg, g)
        cpu_dx, cpu_dw = torch.ops.xmc.ffi_group_backward(dy, x, w, idx, g, True, True)
        cpu = {"y": torch.ops.xmc.ffi_group_forward(x, w, idx, b, g), "dx": cpu_dx, "dW": cpu_dw}
    except Exception as exc:
        report(False, f"{base}: reference / CPU op: {type(exc).__name__}: {exc}")
        return
    for env in group_variants(g, c, dtype):
        name = base + "".join(f" {key[8:]}={value}" for key, value in env.items())
        try:
            set_env(env)
            outs = {"y": torch.ops.xmc.ffi_group_forward(xg, wg, ig, bg, g)}
            outs["dx"], outs["dW"] = torch.ops.xmc.ffi_group_backward(dyg, xg, wg, ig, g, True, True)
            outs["dx[x only]"], none_w = torch.ops.xmc.ffi_group_backward(dyg, xg, wg, ig, g, True, False)
            none_x, outs["dW[W only]"] = torch.ops.xmc.ffi_group_backward(dyg, xg, wg, ig, g, False, True)
            torch.cuda.synchronize()
            for key, got in outs.items():
                kind = key.split("[")[0]
                e_ref = rel_err_to_scale(got, refs[kind])
                e_cpu = rel_err_to_scale(got.cpu(), cpu[kind])
                ok = got.dtype == dtype and e_ref <= tol and e_cpu <= 2 * tol
                report(ok, f"{name} {key:<11} vs float64 {e_ref:.2e}  vs CPU op {e_cpu:.2e}")
            report(none_w is None and none_x is None, f"{name} gradients not asked for are None")
        except Exception as exc:
            report(False, f"{name}: {type(exc).__name__}: {exc}")
        finally:
            set_env({})


def check_group_module() -> None:
    """FixedFanInSparse(group_size=16) on CUDA through autograd: gradients of x, values and bias."""
    dev = torch.device("cuda")
    try:
        layer = FixedFanInSparse(300, 1001, 16, seed=3, group_size=16).to(dev)
        x = torch.randn(67, 300, device=dev, requires_grad=True)
        dy = torch.randn(67, 1001, device=dev)
        layer(x).backward(dy)
        refs = group_reference(x.detach(), layer.values.detach(), layer.indices, None, dy, 16)
        errs = [
            rel_err_to_scale(x.grad, refs["dx"]),
            rel_err_to_scale(layer.values.grad, refs["dW"]),
            rel_err_to_scale(layer.bias.grad, dy.sum(0)),
        ]
        report(all(e <= 1e-5 for e in errs), f"group module autograd (G=16) dx/dW/db errors {errs}")
    except Exception as exc:
        report(False, f"group module autograd: {type(exc).__name__}: {exc}")


def peak_flops(dtype: torch.dtype, tensor_cores: bool) -> float:
    """Published dense FLOP/s of this card for the path: bf16 tensor cores, else float32 SIMT."""
    name = torch.cuda.get_device_properties(0).name
    for key, (fp32, bf16) in PEAK_FLOPS.items():  # most specific names first
        if key in name:
            return bf16 if dtype == torch.bfloat16 and tensor_cores else fp32
    return math.nan


def group_perf_check(
    peak_bw: float,
    batches: tuple[int, ...] = (128, 512),
    labels: int = 670_091,
    hidden: int = 65_536,
    k: int = 32,
) -> list[dict]:
    """fwd / bwd / fwd+bwd of the group layer at 670K labels, H 65,536, K 32, against dense F.linear."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(2)
    indices = {
        g: draw_fan_in_indices(-(-labels // g), hidden, k, gen).to(torch.int32) for g in (1, 8, 16, 32)
    }
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        e = torch.tensor([], dtype=dtype).element_size()
        w = ((torch.rand(labels, k, device=dev, generator=gen) - 0.5) / math.sqrt(k)).to(dtype)
        b = torch.zeros(labels, device=dev, dtype=dtype)
        for n in batches:
            x = torch.randn(n, hidden, device=dev, generator=gen).to(dtype)
            dy = torch.randn(n, labels, device=dev, generator=gen).to(dtype)
            product = 2.0 * n * labels * k  # FLOPs of one product (forward, dx or dW)
            bias_s = cuda_time(lambda dy=dy: dy.sum(0))

            # Dense layers through autograd (forward, backward for input, weight and bias): the same
            # FLOPs with K inputs (no gathers: the compute-speed bound), and the paper's dense(768).
            def dense_time(d_in: int, dy=dy, n=n, dtype=dtype) -> float:
                layer_w = torch.randn(labels, d_in, device=dev, dtype=dtype, requires_grad=True)
                layer_b = torch.zeros(labels, device=dev, dtype=dtype, requires_grad=True)
                inp = torch.randn(n, d_in, device=dev, dtype=dtype, requires_grad=True)

                def step() -> None:
                    layer_w.grad = layer_b.grad = inp.grad = None
                    nn.functional.linear(inp, layer_w, layer_b).backward(dy)

                return cuda_time(step)  # the layer's memory goes with this frame

            dense_k_s, dense768_s = dense_time(k), dense_time(768)
            torch.cuda.empty_cache()
            for g, idx in indices.items():
                q = idx.shape[0]
                mma = dtype == torch.bfloat16 and g % 16 == 0
                row = {"N": n, "H": hidden, "C": labels, "K": k, "G": g, "dtype": str(dtype)[6:]}
                row["path"] = "plain" if g == 1 else ("mma" if mma else "simt")

                def fwd(x=x, w=w, idx=idx, b=b, g=g):
                    return torch.ops.xmc.ffi_group_forward(x, w, idx, b, g)

                def bwd(x=x, w=w, idx=idx, dy=dy, g=g):
                    return torch.ops.xmc.ffi_group_backward(dy, x, w, idx, g, True, True)

                row["forward_s"], row["backward_s"] = cuda_time(fwd), cuda_time(bwd)
                row["fwd_bwd_s"] = row["forward_s"] + row["backward_s"] + bias_s
                # The other path for comparison: group kernels at G = 1, SIMT for bf16 tensor-core G.
                other = {}
                if g == 1:
                    other = {"XMC_FFI_GROUP_PLAIN": "0"}
                elif mma:
                    other = {"XMC_FFI_GROUP_MMA": "0"}
                row["other_path"], row["other_fwd_bwd_s"] = None, math.nan
                if other:
                    set_env(other)
                    try:
                        row["other_path"] = "group" if g == 1 else "simt"
                        row["other_fwd_bwd_s"] = cuda_time(fwd) + cuda_time(bwd) + bias_s
                    finally:
                        set_env({})
                traffic = {  # each operand read or written once
                    "forward": e * n * hidden + e * labels * k + 4 * q * k + e * labels + e * n * labels,
                    "backward": e * n * labels + 2 * e * n * hidden + 2 * e * labels * k + 4 * q * k,
                }
                peak = peak_flops(dtype, mma)
                for part, flops in (("forward", product), ("backward", 2 * product)):
                    row[f"{part}_TFLOPs"] = flops / row[f"{part}_s"] / 1e12
                    row[f"{part}_frac_peak_flops"] = flops / row[f"{part}_s"] / peak
                    row[f"{part}_GB_per_s"] = traffic[part] / row[f"{part}_s"] / 1e9
                    row[f"{part}_frac_peak_bw"] = traffic[part] / row[f"{part}_s"] / peak_bw
                row["fwd_bwd_TFLOPs"] = 3 * product / row["fwd_bwd_s"] / 1e12
                row["dense_k_fwd_bwd_s"], row["dense768_fwd_bwd_s"] = dense_k_s, dense768_s
                row["dense_k_over_group"] = dense_k_s / row["fwd_bwd_s"]
                row["dense768_over_group"] = dense768_s / row["fwd_bwd_s"]
                print(
                    f"group perf N={n} G={g} {row['dtype']} [{row['path']}]: "
                    f"fwd {row['forward_s'] * 1e3:.3f} ms ({row['forward_TFLOPs']:.1f} TFLOP/s = "
                    f"{row['forward_frac_peak_flops']:.0%} of peak, {row['forward_GB_per_s']:.0f} GB/s = "
                    f"{row['forward_frac_peak_bw']:.0%} bw), bwd {row['backward_s'] * 1e3:.3f} ms "
                    f"({row['backward_TFLOPs']:.1f} TFLOP/s = {row['backward_frac_peak_flops']:.0%}, "
                    f"{row['backward_frac_peak_bw']:.0%} bw); fwd+bwd {row['fwd_bwd_s'] * 1e3:.3f} ms"
                    + (
                        f" ({row['other_path']}: {row['other_fwd_bwd_s'] * 1e3:.3f} ms)"
                        if row["other_path"]
                        else ""
                    )
                    + f"; dense F.linear K={k} {dense_k_s * 1e3:.3f} ms ({row['dense_k_over_group']:.2f}x), "
                    f"dense(768) {dense768_s * 1e3:.3f} ms ({row['dense768_over_group']:.2f}x)",
                    flush=True,
                )
                results.append(row)
            del x, dy
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-train", action="store_true", help="leave out the 670K training step")
    parser.add_argument("--skip-perf", action="store_true", help="leave out the timings at scale")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--skip-group", action="store_true", help="leave out the group-shared layer")
    which.add_argument(
        "--group-only", action="store_true", help="only the group-shared layer (correctness, timings)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU visible: nothing to check here", flush=True)
        return 2
    t0 = time.perf_counter()
    load_ops()
    build_s = time.perf_counter() - t0
    props = torch.cuda.get_device_properties(0)
    peak_bw, bw_source = peak_bandwidth()
    l2_mib = getattr(props, "L2_cache_size", 0) / 2**20
    print(
        f"{props.name}: {props.multi_processor_count} SMs, L2 {l2_mib:.0f} MiB, "
        f"peak bandwidth {peak_bw / 1e12:.2f} TB/s ({bw_source}); torch {torch.__version__}; "
        f"ops loaded in {build_s:.1f} s",
        flush=True,
    )
    summary: dict = {"gpu": props.name, "peak_bandwidth_Bps": peak_bw, "bandwidth_source": bw_source}
    if not args.group_only:
        for n, h, c, k, bias, budget in CASES:
            for dtype in (torch.float32, torch.bfloat16):
                check_case(n, h, c, k, bias, dtype, budget)
        check_module()
        check_rewiring()
        if not args.skip_train:
            try:
                summary["train"] = train_check()
            except Exception as exc:
                report(False, f"670K training step: {type(exc).__name__}: {exc}")
        if not args.skip_perf:
            try:
                summary["perf"] = perf_check(peak_bw)
            except Exception as exc:
                report(False, f"timings at scale: {type(exc).__name__}: {exc}")
    if not args.skip_group:
        for n, h, c, k, g, bias in GROUP_CASES:
            for dtype in (torch.float32, torch.bfloat16):
                check_group_case(n, h, c, k, g, bias, dtype)
        check_group_module()
        if not args.skip_perf:
            try:
                summary["group_perf"] = group_perf_check(peak_bw)
            except Exception as exc:
                report(False, f"group timings at scale: {type(exc).__name__}: {exc}")
    summary["failures"] = failures
    summary["ok"] = not failures
    summary["seconds"] = time.perf_counter() - t0
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
