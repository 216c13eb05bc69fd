"""Jobs on several hosts: two network-namespace hosts (own address, hostname, sshd; `tests/cluster.py`),
2 ranks each, started as a user types it on the first host.

- `deepspeed --hostfile H --master_addr HOST0` (pdsh over ssh), `--launcher openmpi`, and
  `mpirun --hostfile H` (ssh as the launch agent): the self-check finds the ranks on distinct hosts
  and addresses, and the job's traffic crosses the hosts' links (their byte counters).
- A short training on real shards (the tiny Debian set) gives the losses of the same 4-rank job on
  one host. Tolerance rel 1e-5: the math is the same, but on one host DeepSpeed reduces the backbone's
  gradients through its shared-memory all-reduce and across hosts through Gloo's ring, which add the
  4 ranks' float32 values in another order (about 1e-7 relative per step, grown over 8 Adam steps).
- The model-parallel head and Horovod's top-k exchange across hosts: under deepspeed the ranks are
  contiguous per host, so mp = 2 lies inside each host and the data-parallel exchange crosses them;
  under `mpirun --map-by node` the ranks alternate between hosts, so mp = 2 spans both.
- A lost host (every process killed) and a cut link each end the job within 60 s on every rank with a
  message naming the lost host; no process is left; the newest checkpoint is intact and, once the host
  is back, `--resume auto` continues from it.
- A non-shared output folder stops at start-up naming the hosts. With the stock Debian
  `127.0.1.1 <name>` hosts line mpirun works and deepspeed stops at once naming the hosts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.checkpoint import latest_checkpoint
from tests.cluster import Cluster
from tests.launchers import ROOT
from tests.tiny_debian import build_tiny_debian

TRAIN = ROOT / "launch" / "train.py"
STEPS = 8


@pytest.fixture(scope="module")
def cluster():
    with Cluster(2) as c:
        yield c


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The tiny Debian set as WebDataset shards (train/, test/)."""
    root = tmp_path_factory.mktemp("debian")
    build_tiny_debian(root / "raw")
    for split in ("train", "test"):
        cmd = [sys.executable, str(ROOT / "launch" / "prepare_data.py"), "xmc", "--no-progress"]
        cmd += ["--input", str(root / "raw" / f"{split}.txt"), "--out", str(root / split)]
        cmd += ["--shard-size", "800"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return root


def config_args(out: Path, shards: Path, *sets: str, steps: int = STEPS) -> list[str]:
    overrides = [
        f"data.train={shards / 'train'}",
        f"data.test={shards / 'test'}",
        "data.batch_size=32",
        "data.num_workers=0",
        "model.head=dense",
        "model.loss=bce",
        "model.hidden_dims=[64]",
        "model.embed_dim=32",
        "parallel.model_parallel=2",
        "parallel.compression=topk",
        "parallel.topk_fraction=0.05",
        f"train.steps={steps}",
        "train.lr=0.01",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=4",
        f"train.output_dir={out}",
    ]
    args = ["--config", str(ROOT / "configs" / "demo.json")]
    for s in [*overrides, *sets]:
        args += ["--set", s]
    return args


def deepspeed_cmd(cluster: Cluster, *extra: str) -> list[str]:
    hostfile = cluster.hostfile(2)
    return ["deepspeed", "--hostfile", str(hostfile), "--master_addr", cluster.hosts[0].name, *extra]


def mpirun_cmd(cluster: Cluster, *extra: str) -> list[str]:
    hostfile = cluster.hostfile(2)
    # 4 ranks on this machine's cores: waits in MPI yield (README, "mpirun speed")
    yields = ["--mca", "mpi_yield_when_idle", "1"]
    mpirun = ["mpirun", "--hostfile", str(hostfile), "-np", "4", "--bind-to", "none", *yields]
    return [*mpirun, *extra, sys.executable]


def run_job(cluster: Cluster, cmd: list[str], args: list[str], timeout: float = 400):
    start = time.monotonic()
    proc = cluster.run(cluster.hosts[0], [*cmd, str(TRAIN), *args], cwd=ROOT, timeout=timeout)
    return proc, time.monotonic() - start


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def reports(out: Path) -> list[dict]:
    return [json.loads((out / "selfcheck" / f"rank{r}.json").read_text()) for r in range(4)]


def assert_placed(out: Path, cluster: Cluster, hosts_by_rank: list[int]) -> None:
    """Each rank's self-check report names the host and address the launcher put it on."""
    for rank, (rep, h) in enumerate(zip(reports(out), hosts_by_rank, strict=True)):
        host = cluster.hosts[h]
        assert (rep["rank"], rep["host"], rep["addr"]) == (rank, host.name, host.addr), rep
        assert rep["gloo_iface"] == host.iface, rep
        assert rep["horovod_allreduce_fp16"] == [2.0, -3.0, 1024.0]


@pytest.fixture(scope="module")
def one_host_losses(tmp_path_factory, shards) -> dict[int, float]:
    """The same job, 4 ranks on this machine (no cluster)."""
    from tests.launchers import run_launched

    out = tmp_path_factory.mktemp("onehost") / "run"
    proc, _ = run_launched("deepspeed", 4, TRAIN, config_args(out, shards), cwd=ROOT, timeout=400)
    ok(proc)
    return losses(out)


def test_deepspeed_pdsh_across_hosts_trains_like_one_host(cluster, shards, one_host_losses, tmp_path):
    out = tmp_path / "run"
    before = [cluster.link_bytes(h) for h in cluster.hosts]
    proc, elapsed = run_job(cluster, deepspeed_cmd(cluster), config_args(out, shards))
    ok(proc)
    assert "self-check ok: 4 ranks (2 dp x 2 mp) via deepspeed" in proc.stdout
    assert_placed(out, cluster, [0, 0, 1, 1])
    for host, (rx0, tx0) in zip(cluster.hosts, before, strict=True):
        rx, tx = cluster.link_bytes(host)
        assert rx - rx0 > 100_000 and tx - tx0 > 100_000, (host, rx - rx0, tx - tx0)
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(one_host_losses, rel=1e-5)
    print(f"deepspeed (pdsh) 2 hosts x 2 ranks, {STEPS} steps: {elapsed:.1f} s")


def test_mpirun_map_by_node_spans_model_parallel_across_hosts(cluster, shards, one_host_losses, tmp_path):
    out = tmp_path / "run"
    proc, elapsed = run_job(cluster, mpirun_cmd(cluster, "--map-by", "node"), config_args(out, shards))
    ok(proc)
    assert "self-check ok: 4 ranks (2 dp x 2 mp) via mpi" in proc.stdout
    assert_placed(out, cluster, [0, 1, 0, 1])  # mp groups {0, 1} and {2, 3} each span both hosts
    assert losses(out) == pytest.approx(one_host_losses, rel=1e-5)
    print(f"mpirun --map-by node 2 hosts x 2 ranks, {STEPS} steps: {elapsed:.1f} s")


def test_deepspeed_openmpi_launcher_self_check(cluster, shards, tmp_path):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(cluster, "--launcher", "openmpi", "--launcher_args", "--bind-to none")
    proc, elapsed = run_job(cluster, cmd, [*config_args(out, shards), "--check"])
    ok(proc)
    assert "self-check ok: 4 ranks (2 dp x 2 mp) via mpi" in proc.stdout
    assert_placed(out, cluster, [0, 0, 1, 1])
    print(f"deepspeed --launcher openmpi self-check: {elapsed:.1f} s")


def test_non_shared_output_folder_stops_at_start_up(cluster, shards, tmp_path):
    """Host 1 gets its own, empty folder at the output path (as a node-local disk would)."""
    out = tmp_path / "run"
    out.mkdir()
    local = tmp_path / "host1-local"
    local.mkdir()
    mount = cluster.run(cluster.hosts[1], ["mount", "--bind", str(local), str(out)])
    assert mount.returncode == 0, mount.stderr
    try:
        proc, elapsed = run_job(cluster, deepspeed_cmd(cluster), config_args(out, shards), timeout=180)
    finally:
        cluster.run(cluster.hosts[1], ["umount", str(out)])
    assert proc.returncode != 0
    h1 = cluster.hosts[1]
    message = f"train.output_dir={out} is not one shared folder: rank 2, 3 on host {h1.name} ({h1.addr})"
    assert message in proc.stderr, proc.stderr[-4000:]
    assert not (out / "checkpoints").exists() and not list(local.iterdir())
    print(f"non-shared output folder: stopped after {elapsed:.1f} s")


def start_long_run(cluster: Cluster, cmd: list[str], out: Path, shards: Path, *sets: str) -> subprocess.Popen:
    sets = ("train.checkpoint_every=2", "train.keep_checkpoints=2", *sets)
    args = config_args(out, shards, *sets, steps=100000)
    return cluster.popen(
        cluster.hosts[0],
        [*cmd, str(TRAIN), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, name: str = "step00000004") -> None:
    deadline = time.monotonic() + 300
    while (latest_checkpoint(out / "checkpoints") or Path("step0")).name < name:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.5)


def train_processes(cluster: Cluster) -> list[str]:
    """Command lines of training processes still alive on any host."""
    found = []
    for host in cluster.hosts:
        listing = cluster.run(host, ["ps", "-eo", "pid,args"]).stdout if host_alive(cluster, host) else ""
        found += [line for line in listing.splitlines() if str(TRAIN) in line and "ps -eo" not in line]
    return found


def host_alive(cluster: Cluster, host) -> bool:
    try:
        return cluster.run(host, ["true"], timeout=10).returncode == 0
    except Exception:
        return False


def assert_intact(out: Path) -> Path:
    import torch

    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["step"] == int(newest.name.removeprefix("step")) and meta["world_size"] == 4
    torch.load(newest / "backbone.pt", weights_only=True)
    for rank in range(4):
        shard = torch.load(newest / "head" / f"rank{rank:05d}.pt", weights_only=False)
        assert shard["position"]["step"] == meta["step"]
    return newest


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_lost_host_ends_the_job_and_resume_continues(cluster, shards, tmp_path, launcher):
    """Every process of host 1 (its sshd too) is killed mid-run; then the host comes back and (under
    deepspeed) the same 4-rank job resumes from the newest checkpoint."""
    out = tmp_path / "run"
    cmd = deepspeed_cmd(cluster) if launcher == "deepspeed" else mpirun_cmd(cluster)
    proc = start_long_run(cluster, cmd, out, shards)
    try:
        wait_for_checkpoint(proc, out)
        cluster.kill_host(cluster.hosts[1])
        lost_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        ended = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert ended < 60, f"the job took {ended:.0f} s to end after host 1 was lost"
    h1 = cluster.hosts[1]
    assert f"on host {h1.name} ({h1.addr})" in output or h1.name in output, output[-4000:]
    assert train_processes(cluster) == []
    newest = assert_intact(out)
    cluster.restart_host(h1)
    if launcher == "deepspeed":  # the resume itself does not depend on the launcher
        args = config_args(out, shards, steps=int(newest.name.removeprefix("step")) + 2)
        proc, _ = run_job(cluster, cmd, [*args, "--resume", "auto"])
        ok(proc)
        assert f"resumed from {newest}" in proc.stdout
    print(f"{launcher}: host 1 killed, job ended after {ended:.1f} s; newest intact: {newest.name}")


def test_cut_link_ends_the_job_on_both_hosts(cluster, shards, tmp_path):
    """Host 1's link goes down mid-run: nothing closes, so the peer heartbeats (parallel.peer_timeout_s,
    20 s here) end the ranks on both sides, naming the other side."""
    out = tmp_path / "run"
    proc = start_long_run(cluster, deepspeed_cmd(cluster), out, shards, "parallel.peer_timeout_s=20")
    h1 = cluster.hosts[1]
    try:
        wait_for_checkpoint(proc, out)
        cluster.link_down(h1)
        cut_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        ended = time.monotonic() - cut_at
        deadline = time.monotonic() + 30  # host 1's own ranks notice too (their store is gone)
        while train_processes(cluster) and time.monotonic() < deadline:
            time.sleep(1)
        left = train_processes(cluster)
    finally:
        cluster.link_up(h1)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert ended < 60, f"the job took {ended:.0f} s to end after host 1's link went down"
    # rank 2's and 3's beats stop a moment apart: a rank may name one of them or both
    named = rf"lost rank (2|3|2, 3) on host {h1.name} \({re.escape(h1.addr)}\): no heartbeat"
    lost = re.search(named, output)
    assert lost, output[-4000:]
    assert left == [], left
    assert_intact(out)
    print(f"link of host 1 cut: job ended after {ended:.1f} s")


def test_stock_debian_hosts_line(shards, tmp_path):
    """With '127.0.1.1 <own name>' in every host's /etc/hosts: mpirun without MASTER_ADDR starts (rank 0
    picks its address on the route to the other host, torch's Gloo its interface); deepspeed, whose
    Horovod runs over Gloo and cannot connect across hosts then, stops at once naming the hosts."""
    with Cluster(2, stock_debian_hosts=True) as stock:
        out = tmp_path / "mpirun"
        args = [*config_args(out, shards), "--check"]
        proc, elapsed = run_job(stock, mpirun_cmd(stock), args, timeout=120)
        ok(proc)
        assert_placed(out, stock, [0, 0, 1, 1])
        print(f"stock /etc/hosts, mpirun: self-check after {elapsed:.1f} s")
        out = tmp_path / "deepspeed"
        args = [*config_args(out, shards), "--check"]
        proc, elapsed = run_job(stock, deepspeed_cmd(stock), args, timeout=120)
        assert proc.returncode != 0
        h0, h1 = stock.hosts
        named = f"host(s) {h0.name} (127.0.1.1), {h1.name} (127.0.1.1) resolve their own name to a loopback"
        assert named in proc.stdout + proc.stderr, proc.stderr[-3000:]
        assert elapsed < 60
        print(f"stock /etc/hosts, deepspeed: stopped after {elapsed:.1f} s")
