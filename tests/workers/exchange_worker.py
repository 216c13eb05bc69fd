"""Run by a real launcher (deepspeed or mpirun): checks GradientExchange against exact references.

Every rank's gradients are a deterministic function of (parameter, rank, step), so each rank can
compute what every replica sent and hence the exact expected result. Failures raise (the job exits
non-zero); on success each rank writes its byte counts to OUT/rank{r}.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.parallel.distributed import init_distributed  # noqa: E402
from pipeline.parallel.gradient_exchange import GradientExchange  # noqa: E402
from pipeline.parallel.grid import build_grid  # noqa: E402
from pipeline.parallel.horovod import dp_process_set, init_horovod, shutdown_horovod  # noqa: E402

SHAPES = {"weight": (300, 16), "bias": (300,)}


def fake_grad(name: str, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + len(name))
    return torch.randn(SHAPES[name], generator=g) * (1 + rank)


def make_params() -> nn.ParameterDict:
    return nn.ParameterDict({n: nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()})


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3g}")


def check_dense_modes(replicas: list[int], rank: int) -> dict[str, int]:
    sizes = {}
    for mode, rtol, atol in [("none", 1e-6, 1e-7), ("fp16", 2e-3, 2e-3), ("bf16", 1.6e-2, 1e-2)]:
        params = make_params()
        xchg = GradientExchange(params.named_parameters(), dp_process_set(), compression=mode)
        for name, p in params.items():
            p.grad = fake_grad(name, rank, 1)
        xchg.after_backward()
        for name, p in params.items():
            want = torch.stack([fake_grad(name, r, 1) for r in replicas]).mean(0)
            close(p.grad, want, rtol, atol, f"{mode} average of {name}")
            if mode == "none" and len(replicas) == 2:
                assert torch.equal(p.grad, want), "none must equal the exact average"
        sizes[mode] = xchg.step_bytes
    return sizes


def simulate_topk(name: str, rank: int, steps: int, fraction: float) -> list[torch.Tensor]:
    """What `rank` sends at each step, computed here independently of the exchange."""
    residual, sent = torch.zeros(SHAPES[name]).reshape(-1), []
    for step in range(1, steps + 1):
        acc = fake_grad(name, rank, step).reshape(-1) + residual
        k = max(1, math.ceil(fraction * acc.numel()))
        idx = acc.abs().topk(k).indices
        out = torch.zeros_like(acc)
        out[idx] = acc[idx]
        residual = acc - out
        sent.append(out)
    return sent


def check_topk(replicas: list[int], rank: int, fraction: float = 0.01, steps: int = 4) -> int:
    params = make_params()
    xchg = GradientExchange(
        params.named_parameters(), dp_process_set(), compression="topk", topk_fraction=fraction
    )
    total = {n: torch.zeros(s) for n, s in SHAPES.items()}
    expected = {n: [simulate_topk(n, r, steps, fraction) for r in replicas] for n in SHAPES}
    for step in range(1, steps + 1):
        for name, p in params.items():
            p.grad = fake_grad(name, rank, step)
            total[name] += p.grad
        before = {n: xchg.residuals[n].clone() for n in SHAPES}
        xchg.after_backward()
        for name, p in params.items():
            want = torch.stack([sent[step - 1] for sent in expected[name]]).mean(0).view_as(p.grad)
            close(p.grad, want, 1e-6, 1e-7, f"topk average of {name} at step {step}")
            mine = expected[name][replicas.index(rank)][step - 1].view(SHAPES[name])
            accumulated = fake_grad(name, rank, step) + before[name]
            assert torch.equal(mine + xchg.residuals[name], accumulated), "sent + residual != accumulated"
    for name in SHAPES:  # everything ever sent plus what is still held back is all the gradient there was
        sent_total = sum(expected[name][replicas.index(rank)]).view(SHAPES[name])
        close(sent_total + xchg.residuals[name], total[name], 1e-5, 1e-5, f"topk conservation of {name}")
    return xchg.step_bytes


def check_local_sgd(replicas: list[int], rank: int, sync_every: int = 3) -> None:
    params = make_params()
    xchg = GradientExchange(params.named_parameters(), dp_process_set(), sync_every=sync_every)
    optimizer = torch.optim.SGD(params.parameters(), lr=0.1)
    local = {r: {n: torch.zeros(s) for n, s in SHAPES.items()} for r in replicas}  # every replica, simulated
    for step in range(1, 2 * sync_every + 1):
        for name, p in params.items():
            p.grad = fake_grad(name, rank, step)
        xchg.after_backward()
        for name, p in params.items():
            assert torch.equal(p.grad, fake_grad(name, rank, step)), "local SGD must not touch gradients"
        optimizer.step()
        xchg.after_step(step)
        for r in replicas:
            for name in SHAPES:
                local[r][name] = local[r][name] - 0.1 * fake_grad(name, r, step)
        if step % sync_every == 0:
            for name in SHAPES:
                avg = torch.stack([local[r][name] for r in replicas]).mean(0)
                for r in replicas:
                    local[r][name] = avg.clone()
        for name, p in params.items():
            close(p.data, local[rank][name], 1e-5, 1e-6, f"local SGD parameter {name} at step {step}")


def main() -> None:
    out, mp = (a for a in sys.argv[1:] if not a.startswith("--local_rank"))  # deepspeed adds --local_rank
    out, mp = Path(out), int(mp)
    launch = init_distributed()
    grid = build_grid(mp)
    init_horovod(launch.launcher, grid.layout)
    replicas = grid.layout.dp_group_ranks(grid.mp_rank)
    sizes = check_dense_modes(replicas, grid.rank)
    sizes["topk"] = check_topk(replicas, grid.rank)
    check_local_sgd(replicas, grid.rank)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{grid.rank}.json").write_text(json.dumps({"bytes": sizes, "replicas": replicas}))
    shutdown_horovod()


if __name__ == "__main__":
    main()
