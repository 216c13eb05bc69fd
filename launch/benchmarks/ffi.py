"""FFI sparse layer: fwd+bwd time and memory against nn.Linear and torch CSR, 670K-label scale, threads.

Figures (medians over --repeats after one warm-up; every method runs forward and backward with
gradients for the inputs, the weights and the bias, as in training):
- comparison at each (batch, hidden, labels, fan-in): the FFI layer (torch.ops.xmc kernels; its
  autograd backward is one ffi_backward call, on CUDA one fused pass for dx and dW), the same
  weights as a dense nn.Linear (checked equal to the FFI outputs), and as a torch.sparse CSR matrix
  with autograd over its values (`torch.sparse.mm(W_csr, x^T)^T`); ratios against the FFI layer;
  bytes of weights + grads + Adam moments for each (index arrays counted with the weights).
- the FFI layer alone at the paper's scale (670,091 labels, H = 65,536, K = 32), per kernel.
- group-shared fan-in (--group-size, HASTE): fwd+bwd of the layer with labels in groups of G sharing
  one index row, for each G against G = 1 (the plain layer) and against nn.Linear at the same shape,
  in float32 and bfloat16 (the dense layer in the same dtype); achieved GFLOP/s (2*N*C*K per product,
  3 products per fwd+bwd) and the minimal bytes moved, with Q = ceil(C / G) index rows:
  forward x + W + I + b + y = e*N*H + e*C*K + 4*Q*K + e*C + e*N*C, backward dy + x + W + I + dx + dW
  + db = e*N*C + 2*e*N*H + 2*e*C*K + 4*Q*K + e*C.
- CPU: thread scaling of the FFI kernels (torch.set_num_threads also sets the kernels' threads).
- CUDA: per-kernel bandwidth from the minimal traffic, with e the element size in bytes:
  forward x + W + I + b + y = e*N*H + (e+4)*C*K + e*C + e*N*C; dx: dy + W + I + dx =
  e*N*C + (e+4)*C*K + e*N*H; dW: dy + x + I + dW = e*N*C + e*N*H + (e+4)*C*K; both (the fused
  backward): dy + x + W + I + dx + dW = e*N*C + 2*e*N*H + (2*e+4)*C*K (each read or written once);
  peak memory of each method; the paper's dense baseline nn.Linear(768, 670091).
The plain-PyTorch references are here (dense, CSR): the check that the kernels compute the same.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from pipeline.ops import FixedFanInSparse, load_ops

# Measured on a 2-core development machine (AMD EPYC, 2 threads) as a fixed point of comparison.
warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")

REFERENCE = {"dense_fwd_bwd_s": 2.3, "csr_forward_s": 0.11, "threads": 2, "shape": [256, 2048, 65536, 32]}
SCALE = {"labels": 670_091, "hidden": 65_536, "fan_in": 32}
DENSE_LIMIT_BYTES = 16 << 30  # a dense comparison layer (weights, gradient, moments) above this is not timed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 256)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="input widths H (default 2048)")
    parser.add_argument("--labels", type=int, nargs="+", default=None, help="outputs C (default 65536)")
    parser.add_argument("--fan-in", type=int, nargs="+", default=None, help="fan-ins K (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument(
        "--scale-batch", type=int, default=None, help="batch at 670K labels (default 64 on cpu, 256 on cuda)"
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to scale over"
    )
    parser.add_argument("--skip-scale", action="store_true", help="leave out the 670K-label runs")
    parser.add_argument(
        "--paper-groups",
        type=int,
        nargs="*",
        default=None,
        metavar="BATCH",
        help="only the group-size table at the paper shape (H 65,536 -> 670,091, K 32) for these batches "
        "(e.g. 128 512); the dense layer is not timed there (175 GB of float32 weights)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        nargs="+",
        default=[1, 8, 16, 32],
        help="group sizes G of the group-shared layer to compare (1: the plain layer)",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run")


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of fn over `repeats` runs after one warm-up (CUDA: events on the current stream)."""
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while fn runs (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor, params: list[torch.Tensor]):
    """One training-style pass: forward, backward with a fixed upstream gradient, gradients dropped."""

    def step() -> None:
        for p in params:
            p.grad = None
        forward().backward(grad)

    return step


# ---------------------------------------------------------------- the three layers


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def memory_figures(weights: int, trainable: int) -> dict:
    """weights: bytes of everything stored (incl. indices); trainable: bytes of trained float32 values;
    grads take as much as the trained values, Adam two moments of the same size."""
    return {"weights": weights, "grads": trainable, "adam": 2 * trainable, "total": weights + 3 * trainable}


class CsrLayer:
    """The FFI connectivity as a torch.sparse CSR matrix [C, H], autograd over its values."""

    def __init__(self, layer: FixedFanInSparse) -> None:
        order = layer.indices.long().sort(dim=1)
        c, k = layer.indices.shape
        self.col = order.values.reshape(-1).contiguous()
        self.crow = torch.arange(0, c * k + 1, k, device=self.col.device)
        self.values = layer.values.detach().gather(1, order.indices).reshape(-1).clone().requires_grad_(True)
        self.bias = layer.bias.detach().clone().requires_grad_(True)
        self.shape = (c, layer.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.sparse_csr_tensor(self.crow, self.col, self.values, size=self.shape)
        return torch.sparse.mm(weight, x.t()).t() + self.bias

    def memory(self) -> dict:
        return memory_figures(
            _nbytes(self.col, self.crow, self.values, self.bias), _nbytes(self.values, self.bias)
        )


def ffi_memory(layer: FixedFanInSparse) -> dict:
    return memory_figures(_nbytes(layer.values, layer.indices, layer.bias), _nbytes(layer.values, layer.bias))


def kernel_times(layer: FixedFanInSparse, x: torch.Tensor, dy: torch.Tensor, repeats: int) -> dict:
    """Seconds of each op called directly (backward: dx and dW in one ffi_backward call), and (CUDA) GB/s
    against its minimal traffic."""
    v, i, b, dev = layer.values.detach(), layer.indices, layer.bias.detach(), x.device
    n, h = x.shape
    c, k = v.shape
    e = x.element_size()
    traffic = {
        "forward": e * n * h + (e + 4) * c * k + e * c + e * n * c,
        "backward_input": e * n * c + (e + 4) * c * k + e * n * h,
        "backward_weight": e * n * c + e * n * h + (e + 4) * c * k,
        "backward": e * n * c + 2 * e * n * h + (2 * e + 4) * c * k,
    }
    calls = {
        "forward": lambda: torch.ops.xmc.ffi_forward(x, v, i, b),
        "backward_input": lambda: torch.ops.xmc.ffi_backward_input(dy, v, i, h),
        "backward_weight": lambda: torch.ops.xmc.ffi_backward_weight(dy, x, i),
        # What autograd calls: both gradients at once (CUDA: the fused kernel).
        "backward": lambda: torch.ops.xmc.ffi_backward(dy, x, v, i, True, True),
    }
    out = {}
    for name, call in calls.items():
        seconds = timed(call, repeats, dev)
        out[name] = {"s": seconds}
        if dev.type == "cuda":
            out[name]["bytes"] = traffic[name]
            out[name]["GB_per_s"] = traffic[name] / seconds / 1e9
    return out


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


# ---------------------------------------------------------------- suites


def compare(batch: int, hidden: int, labels: int, fan_in: int, repeats: int, device: torch.device) -> dict:
    """FFI vs dense vs CSR at one shape, same weights, same inputs."""
    g = torch.Generator().manual_seed(0)
    layer = FixedFanInSparse(hidden, labels, fan_in, seed=1).to(device)
    x = torch.randn(batch, hidden, generator=g).to(device).requires_grad_(True)
    dy = torch.randn(batch, labels, generator=g).to(device)
    result = {"batch": batch, "hidden": hidden, "labels": labels, "fan_in": fan_in}

    ffi_step = fwd_bwd(lambda: layer(x), dy, [x, layer.values, layer.bias])
    ffi_fwd = timed(
        lambda: torch.ops.xmc.ffi_forward(
            x.detach(), layer.values.detach(), layer.indices, layer.bias.detach()
        ),
        repeats,
        device,
    )
    result["ffi"] = {
        "fwd_bwd_s": timed(ffi_step, repeats, device),
        "fwd_s": ffi_fwd,
        "kernels": kernel_times(layer, x.detach(), dy, repeats),
        "memory_bytes": ffi_memory(layer),
        "peak_bytes": peak_bytes(ffi_step, device),
    }
    print(
        f"[{batch}x{hidden} -> {labels}, K={fan_in}] ffi   fwd+bwd {result['ffi']['fwd_bwd_s']:.4f} s  "
        f"fwd {ffi_fwd:.4f} s  memory {_fmt_bytes(result['ffi']['memory_bytes']['total'])}",
        flush=True,
    )

    with torch.no_grad():
        y_ffi = layer(x).double()
    dense = nn.Linear(hidden, labels, device=device)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
        y_dense = dense(x).double()
    scale = y_dense.abs().max().item()
    result["max_rel_error_vs_dense"] = (y_ffi - y_dense).abs().max().item() / scale
    dense_step = fwd_bwd(lambda: dense(x), dy, [x, dense.weight, dense.bias])
    result["dense"] = {
        "fwd_bwd_s": timed(dense_step, repeats, device),
        "memory_bytes": memory_figures(_nbytes(dense.weight, dense.bias), _nbytes(dense.weight, dense.bias)),
        "peak_bytes": peak_bytes(dense_step, device),
    }
    print(
        f"    dense fwd+bwd {result['dense']['fwd_bwd_s']:.4f} s  memory "
        f"{_fmt_bytes(result['dense']['memory_bytes']['total'])}  (FFI equals it to "
        f"{result['max_rel_error_vs_dense']:.1e} relative)",
        flush=True,
    )

    csr = CsrLayer(layer)
    with torch.no_grad():
        result["max_rel_error_csr_vs_ffi"] = (csr(x).double() - y_ffi).abs().max().item() / scale
    csr_step = fwd_bwd(lambda: csr(x), dy, [x, csr.values, csr.bias])
    with torch.no_grad():
        csr_fwd = timed(lambda: csr(x), repeats, device)
    result["csr"] = {
        "fwd_bwd_s": timed(csr_step, repeats, device),
        "fwd_s": csr_fwd,
        "memory_bytes": csr.memory(),
        "peak_bytes": peak_bytes(csr_step, device),
        "how": "sparse.mm(sparse_csr_tensor(crow, col, values), x.t()).t() + bias, autograd over values",
    }
    print(
        f"    csr   fwd+bwd {result['csr']['fwd_bwd_s']:.4f} s  fwd {csr_fwd:.4f} s  memory "
        f"{_fmt_bytes(result['csr']['memory_bytes']['total'])}",
        flush=True,
    )

    f = result["ffi"]
    result["ratios"] = {
        "dense_over_ffi_fwd_bwd": result["dense"]["fwd_bwd_s"] / f["fwd_bwd_s"],
        "csr_over_ffi_fwd_bwd": result["csr"]["fwd_bwd_s"] / f["fwd_bwd_s"],
        "csr_over_ffi_fwd": csr_fwd / f["fwd_s"],
        "dense_over_ffi_memory": result["dense"]["memory_bytes"]["total"] / f["memory_bytes"]["total"],
        "csr_over_ffi_memory": result["csr"]["memory_bytes"]["total"] / f["memory_bytes"]["total"],
    }
    r = result["ratios"]
    print(
        f"    FFI is {r['dense_over_ffi_fwd_bwd']:.1f}x faster than dense, "
        f"{r['csr_over_ffi_fwd_bwd']:.1f}x than CSR (forward {r['csr_over_ffi_fwd']:.1f}x); memory "
        f"{r['dense_over_ffi_memory']:.1f}x less than dense, {r['csr_over_ffi_memory']:.2f}x less than CSR",
        flush=True,
    )
    return result


def at_scale(batch: int, repeats: int, device: torch.device) -> dict:
    """The FFI layer alone at 670K labels (and, on CUDA, the paper's dense baseline and CSR)."""
    labels, hidden, fan_in = SCALE["labels"], SCALE["hidden"], SCALE["fan_in"]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    layer = FixedFanInSparse(hidden, labels, fan_in, seed=1).to(device)
    init_s = time.perf_counter() - t0
    x = torch.randn(batch, hidden, generator=g).to(device).requires_grad_(True)
    dy = torch.randn(batch, labels, generator=g).to(device)
    step = fwd_bwd(lambda: layer(x), dy, [x, layer.values, layer.bias])
    result = {
        "batch": batch,
        "hidden": hidden,
        "labels": labels,
        "fan_in": fan_in,
        "init_s": init_s,
        "ffi": {
            "fwd_bwd_s": timed(step, repeats, device),
            "kernels": kernel_times(layer, x.detach(), dy, repeats),
            "memory_bytes": ffi_memory(layer),
            "peak_bytes": peak_bytes(step, device),
        },
    }
    print(
        f"[{batch}x{hidden} -> {labels}, K={fan_in}] ffi fwd+bwd {result['ffi']['fwd_bwd_s']:.4f} s  memory "
        f"{_fmt_bytes(result['ffi']['memory_bytes']['total'])}  (layer built in {init_s:.1f} s)",
        flush=True,
    )
    if device.type == "cuda":
        csr = CsrLayer(layer)
        csr_step = fwd_bwd(lambda: csr(x), dy, [x, csr.values, csr.bias])
        try:
            result["csr"] = {
                "fwd_bwd_s": timed(csr_step, repeats, device),
                "memory_bytes": csr.memory(),
                "peak_bytes": peak_bytes(csr_step, device),
            }
        except torch.OutOfMemoryError as e:  # torch's CSR backward builds a dense C x H gradient
            torch.cuda.empty_cache()
            with torch.no_grad():
                fwd_s = timed(lambda: csr(x), repeats, device)
            result["csr"] = {"fwd_s": fwd_s, "fwd_bwd_s": None, "backward": f"out of memory: {e}"[:200]}
        del csr, csr_step
        embed = 768
        dense = nn.Linear(embed, labels, device=device)
        e = torch.randn(batch, embed, device=device, requires_grad=True)
        dense_step = fwd_bwd(lambda: dense(e), dy, [e, dense.weight, dense.bias])
        result["dense_768"] = {
            "fwd_bwd_s": timed(dense_step, repeats, device),
            "memory_bytes": memory_figures(
                _nbytes(dense.weight, dense.bias), _nbytes(dense.weight, dense.bias)
            ),
            "peak_bytes": peak_bytes(dense_step, device),
        }
        print(
            f"    csr fwd+bwd {result['csr']['fwd_bwd_s'] or float('nan'):.4f} s; "
            f"dense nn.Linear(768, {labels}) fwd+bwd "
            f"{result['dense_768']['fwd_bwd_s']:.4f} s, memory "
            f"{_fmt_bytes(result['dense_768']['memory_bytes']['total'])}",
            flush=True,
        )
    return result


def _layer_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor]):
    """fwd_bwd of layer(x) with the gradients of x and params."""
    return fwd_bwd(lambda: layer(x), dy, [x, *params])


def group_traffic(batch: int, hidden: int, labels: int, fan_in: int, group_size: int, element: int) -> int:
    """Minimal bytes of one fwd+bwd of the group-shared layer (each tensor read or written once)."""
    n, h, c, k, e = batch, hidden, labels, fan_in, element
    index = 4 * -(-c // group_size) * k
    forward = e * n * h + e * c * k + index + e * c + e * n * c
    backward = e * n * c + 2 * e * n * h + 2 * e * c * k + index + e * c
    return forward + backward


def group_sizes_table(
    batch: int,
    hidden: int,
    labels: int,
    fan_in: int,
    group_sizes: list[int],
    repeats: int,
    device: torch.device,
    dense_fp32_s: float | None = None,
) -> dict:
    """fwd+bwd of the group-shared layer for each G (G = 1: the plain layer on its own kernels) against
    G = 1 and against nn.Linear at the same shape, float32 and bfloat16, with GFLOP/s and GB/s."""
    g = torch.Generator().manual_seed(0)
    flops = 3 * 2 * batch * labels * fan_in
    sizes = sorted(set(group_sizes) | {1})
    out: dict = {"shape": [batch, hidden, labels, fan_in], "flops": flops, "per_dtype": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        x = torch.randn(batch, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        dy = torch.randn(batch, labels, generator=g).to(device=device, dtype=dtype)
        dense_bytes = hidden * labels * x.element_size() * 4  # weights, gradient, two Adam moments
        if dtype == torch.float32 and dense_fp32_s is not None:
            dense_s = dense_fp32_s  # measured by compare() at this shape in this run
        elif dense_bytes > DENSE_LIMIT_BYTES:
            dense_s = None  # the paper shape: 175 GB of float32 dense weights
        else:
            dense = nn.Linear(hidden, labels, device=device, dtype=dtype)
            dense_s = timed(_layer_step(dense, x, dy, [dense.weight, dense.bias]), repeats, device)
        rows = {}
        for size in sizes:
            layer = FixedFanInSparse(
                hidden, labels, fan_in, seed=1, group_size=size, device=device, dtype=dtype
            )
            seconds = timed(_layer_step(layer, x, dy, [layer.values, layer.bias]), repeats, device)
            traffic = group_traffic(batch, hidden, labels, fan_in, size, x.element_size())
            rows[str(size)] = {
                "fwd_bwd_s": seconds,
                "gflop_per_s": flops / seconds / 1e9,
                "min_bytes": traffic,
                "GB_per_s": traffic / seconds / 1e9,
                "index_bytes": layer.indices.numel() * 4,
            }
        base = rows["1"]["fwd_bwd_s"]
        dense_text = "not timed (too large)" if dense_s is None else f"{dense_s:.4f} s"
        print(
            f"[{batch}x{hidden} -> {labels}, K={fan_in}] {name}: dense nn.Linear fwd+bwd {dense_text}",
            flush=True,
        )
        for size in sizes:
            r = rows[str(size)]
            r["g1_over_this"] = base / r["fwd_bwd_s"]
            r["dense_over_this"] = None if dense_s is None else dense_s / r["fwd_bwd_s"]
            vs_dense = "" if dense_s is None else f"{r['dense_over_this']:6.1f}x dense  "
            print(
                f"    G={size:<4d} fwd+bwd {r['fwd_bwd_s']:.4f} s  {r['g1_over_this']:5.2f}x G=1  "
                f"{vs_dense}{r['gflop_per_s']:6.1f} GFLOP/s  "
                f"min traffic {r['min_bytes'] / 2**20:,.1f} MiB ({r['GB_per_s']:.1f} GB/s)",
                flush=True,
            )
        out["per_dtype"][name] = {"dense_fwd_bwd_s": dense_s, "group_sizes": rows}
    return out


def thread_scaling(
    batch: int, hidden: int, labels: int, fan_in: int, threads: list[int], repeats: int
) -> dict:
    """FFI fwd+bwd and per-kernel seconds at each CPU thread count, and the dense layer's fwd+bwd at the
    same count (3 repeats): the ratio per thread count is less exposed to other load on the machine."""
    g = torch.Generator().manual_seed(0)
    layer = FixedFanInSparse(hidden, labels, fan_in, seed=1)
    x = torch.randn(batch, hidden, generator=g).requires_grad_(True)
    dy = torch.randn(batch, labels, generator=g)
    step = fwd_bwd(lambda: layer(x), dy, [x, layer.values, layer.bias])
    dense = nn.Linear(hidden, labels)
    dense_step = fwd_bwd(lambda: dense(x), dy, [x, dense.weight, dense.bias])
    previous = torch.get_num_threads()
    out = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            out[str(t)] = {
                "fwd_bwd_s": timed(step, repeats, x.device),
                "kernels": kernel_times(layer, x.detach(), dy, repeats),
                "dense_fwd_bwd_s": timed(dense_step, 3, x.device),
            }
            o = out[str(t)]
            o["dense_over_ffi"] = o["dense_fwd_bwd_s"] / o["fwd_bwd_s"]
            k = o["kernels"]
            print(
                f"threads {t}: ffi fwd+bwd {o['fwd_bwd_s']:.4f} s (fwd {k['forward']['s']:.4f}, "
                f"dx {k['backward_input']['s']:.4f}, dW {k['backward_weight']['s']:.4f}, "
                f"dx+dW in one call {k['backward']['s']:.4f}); dense "
                f"{o['dense_fwd_bwd_s']:.4f} s, {o['dense_over_ffi']:.1f}x the FFI time",
                flush=True,
            )
    finally:
        torch.set_num_threads(previous)
    first, last = out[str(threads[0])]["fwd_bwd_s"], out[str(threads[-1])]["fwd_bwd_s"]
    return {"shape": [batch, hidden, labels, fan_in], "per_threads": out, "speedup": first / last}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    load_ops()
    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    batches = args.batch or [64 if quick else 256]
    hiddens = args.hidden or [1024 if quick else 2048]
    labels = args.labels or [8192 if quick else 65536]
    fan_ins = args.fan_in or [32]
    threads = torch.get_num_threads()
    print(f"device {device}, {threads} threads, repeats {repeats}", flush=True)
    figures: dict = {"device": str(device), "threads": threads, "repeats": repeats, "reference": REFERENCE}
    if device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)
    if args.paper_groups is not None:
        figures["paper_groups"] = [
            group_sizes_table(
                b, SCALE["hidden"], SCALE["labels"], SCALE["fan_in"], args.group_size, repeats, device
            )
            for b in args.paper_groups or [128, 512]
        ]
        return figures
    figures["compare"] = [
        compare(b, h, c, k, repeats, device)
        for b, h, c, k in itertools.product(batches, hiddens, labels, fan_ins)
    ]
    figures["groups"] = [
        group_sizes_table(
            c["batch"],
            c["hidden"],
            c["labels"],
            c["fan_in"],
            args.group_size,
            repeats,
            device,
            dense_fp32_s=c["dense"]["fwd_bwd_s"],
        )
        for c in figures["compare"]
    ]
    if not args.skip_scale and not quick:
        scale_batch = args.scale_batch or (64 if device.type == "cpu" else 256)
        figures["scale"] = at_scale(scale_batch, max(2, repeats // 2), device)
    if device.type == "cpu":
        figures["thread_scaling"] = thread_scaling(
            batches[0], hiddens[0], labels[0], fan_ins[0], args.threads, repeats
        )
    first = figures["compare"][0]
    if [first["batch"], first["hidden"], first["labels"], first["fan_in"]] == REFERENCE["shape"]:
        g16 = figures["groups"][0]["per_dtype"]["float32"]["group_sizes"].get("16")
        figures["targets"] = {
            "ffi_10x_faster_than_dense": first["ratios"]["dense_over_ffi_fwd_bwd"] >= 10,
            "group16_5x_faster_than_g1": None if g16 is None else g16["g1_over_this"] >= 5,
            "ffi_forward_at_least_as_fast_as_csr": first["ratios"]["csr_over_ffi_fwd"] >= 1,
            "dense_vs_reference": first["dense"]["fwd_bwd_s"] / REFERENCE["dense_fwd_bwd_s"],
            "csr_forward_vs_reference": first["csr"]["fwd_s"] / REFERENCE["csr_forward_s"],
        }
        print(f"targets: {figures['targets']}", flush=True)
    return figures
