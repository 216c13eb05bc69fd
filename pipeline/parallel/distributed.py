"""Start torch.distributed the same way under every launcher.

- `deepspeed` (and torchrun): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set for us.
- `mpirun`: OpenMPI sets OMPI_COMM_WORLD_*; rank 0 picks the rendezvous address and a free port and
  broadcasts them over MPI (mpi4py), then we fill in the same variables and continue as above.
- plain `python launch/train.py`: a world of one, on loopback.

The backend is gloo on CPU and nccl when CUDA is available.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from pipeline.parallel.network import (
    Route,
    external_addrs,
    interface_of,
    probe_tcp,
    resolve,
    route_to,
)

Launcher = Literal["deepspeed", "mpi", "single"]


@dataclass(frozen=True)
class Peer:
    """Where one rank runs: its host name, its address toward the rendezvous host and the interface
    its Gloo traffic uses."""

    rank: int
    host: str
    addr: str
    iface: str


@dataclass(frozen=True)
class LaunchInfo:
    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    peers: tuple[Peer, ...]  # by rank

    @property
    def hosts(self) -> list[str]:
        """Distinct host names in rank order."""
        return list(dict.fromkeys(p.host for p in self.peers))


def detect_launcher() -> Launcher:
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMIX_RANK" in os.environ:
        return "mpi"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "deepspeed"
    return "single"


def env_rank() -> str:
    """This process's rank from the launcher's variables, before or after start-up ('?' if unknown)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if key in os.environ:
            return os.environ[key]
    return "0" if detect_launcher() == "single" else "?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RendezvousError(RuntimeError):
    """The ranks cannot meet: an address that is loopback across hosts, or that some rank cannot
    reach; the message names the address and the ranks."""


def _toward_other_host(table: list[tuple[str, list[str]]]) -> str:
    """Rank 0's address on the route to the first rank on another host (MPI rendezvous)."""
    for host, addrs in table:
        if host == table[0][0]:
            continue
        for addr in addrs:
            route = route_to(addr)
            if not route.loopback:
                return route.local_addr
        raise RendezvousError(
            f"rank 0 on {table[0][0]} finds no route to {host} (its addresses: {addrs or 'none'}); "
            "set MASTER_ADDR to an address of rank 0's host that every host reaches"
        )
    raise AssertionError("a single host")


def _mpi_rendezvous(probe_timeout_s: float = 10.0) -> None:
    """Rank 0 picks the address and port of torch's store and broadcasts them over MPI.

    On several hosts the address is never a loopback one: it is MASTER_ADDR when given, else rank 0's
    address on its route to another host. Before anyone waits on it, every rank on another host
    connects once to a probe socket rank 0 opened there; a rank that cannot (wrong address, firewall,
    a cut link) makes every rank fail at once, naming the address and the ranks, instead of a silent
    wait for torch's store timeout.

    Before MPI starts: waits in MPI calls yield the core (`mpi_yield_when_idle`, unless set). OpenMPI
    otherwise busy-polls in every blocking call, Horovod's background thread's included; with more
    ranks than free cores those threads took the cores the other ranks compute on (2 hosts x 2 ranks
    on 2 cores: 3-4x fewer samples/s than the same job under deepspeed, on par once they yield)."""
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    table = comm.allgather((socket.gethostname(), external_addrs()))
    hosts = [host for host, _ in table]
    multi_host = len(set(hosts)) > 1
    probe = None
    if comm.rank == 0:
        if "MASTER_ADDR" in os.environ:
            addr = os.environ["MASTER_ADDR"]
        else:
            addr = _toward_other_host(table) if multi_host else "127.0.0.1"
        port = os.environ.get("MASTER_PORT") or str(_free_port())
        if multi_host:
            probe = socket.create_server(("", 0))
        sent = (addr, port, probe.getsockname()[1] if probe else 0)
    else:
        sent = None
    addr, port, probe_port = comm.bcast(sent, root=0)
    if multi_host:
        reason = None
        if hosts[comm.rank] != hosts[0]:
            target = resolve(addr)
            if ipaddress.ip_address(target).is_loopback:
                reason = f"{addr} is {target}, a loopback address, on this host"
            else:
                reason = probe_tcp(target, probe_port, probe_timeout_s)
        reasons = comm.allgather(reason)
        if probe is not None:
            probe.close()
        failed = [f"rank {r} on {hosts[r]}: {why}" for r, why in enumerate(reasons) if why]
        if failed:
            raise RendezvousError(
                f"rendezvous address {addr} (rank 0 on {hosts[0]}) is not reachable from "
                + "; ".join(failed)
                + ". Set MASTER_ADDR (mpirun -x MASTER_ADDR=...) to an address of that host the others reach"
            )
    local_rank = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK") or str(
        hosts[: comm.rank].count(hosts[comm.rank])
    )
    os.environ.update(
        RANK=str(comm.rank),
        WORLD_SIZE=str(comm.size),
        LOCAL_RANK=local_rank,
        LOCAL_WORLD_SIZE=str(hosts.count(hosts[comm.rank])),
        MASTER_ADDR=addr,
        MASTER_PORT=port,
    )


def _spans_hosts() -> bool:
    """Whether the launched world has ranks on other hosts, from the launcher's variables (before any
    collective): WORLD_SIZE larger than the ranks started on this host."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return local is not None and int(local) < int(os.environ["WORLD_SIZE"])


def _choose_gloo_iface() -> Route:
    """Point torch's Gloo at the interface that reaches MASTER_ADDR (GLOO_SOCKET_IFNAME, unless the
    user set it). Left alone, Gloo binds to the address of this host's name, 127.0.1.1 under a stock
    Debian /etc/hosts, and ranks on other hosts then wait on an address they cannot reach. On rank 0's
    host MASTER_ADDR may itself resolve to 127.0.1.1; the host's only external address is taken then,
    and with several the job stops asking for the address or GLOO_SOCKET_IFNAME."""
    addr = os.environ["MASTER_ADDR"]
    route = route_to(addr)
    external = external_addrs()
    if route.loopback and _spans_hosts() and len(external) == 1:
        # This is rank 0's host and its name maps to 127.0.1.1 here; the other hosts resolve it to
        # its real address. With one external address, that is the one they reach.
        route = Route(route.target, external[0], interface_of(external[0]))
    if route.loopback and _spans_hosts():
        raise RendezvousError(
            f"MASTER_ADDR={addr} is {route.target} on {socket.gethostname()}, a loopback address, but "
            f"the job has ranks on other hosts (WORLD_SIZE {os.environ['WORLD_SIZE']}): they cannot reach "
            f"it. Give the address other hosts use (deepspeed --master_addr), or fix /etc/hosts (Debian's "
            f"'127.0.1.1 {socket.gethostname()}' line)"
        )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", route.iface)
    global _route
    _route = route
    return route


_route: Route | None = None  # this rank's route to MASTER_ADDR, set by init_distributed


def local_route() -> Route:
    """This rank's route to the rendezvous host (after `init_distributed`): the address other hosts
    reach it at, and its interface."""
    if _route is None:
        raise RuntimeError("init_distributed() has not run")
    return _route


def _wait_for_store(addr: str, port: int, deadline_s: float) -> None:
    """On ranks other than 0 under a launcher that gives the address (deepspeed, torchrun): fail fast
    when torch's store at addr:port cannot be reached. A refused connection (rank 0 not listening yet)
    is retried until `deadline_s`; no route, a time-out or a loopback target on another host fail at
    once. torch's own client would retry silently until the process-group timeout."""
    deadline = time.monotonic() + deadline_s
    while True:
        reason = probe_tcp(addr, port, 5.0)
        if reason is None:
            return
        refused = "refused" in reason.lower()
        if not refused or time.monotonic() > deadline:
            raise RendezvousError(
                f"rank {os.environ['RANK']} on {socket.gethostname()} cannot reach the rendezvous "
                f"store at {addr}:{port} (MASTER_ADDR:MASTER_PORT): {reason}"
                + (f" for {deadline_s:.0f} s: is rank 0 up?" if refused else "")
            )
        time.sleep(0.5)


def _unlink_deepspeed_shm() -> None:
    """DeepSpeed's CPU shared-memory allreduce (0.19) creates one /dev/shm segment per local rank
    (~67 MB) and never unlinks it: every job leaves them behind until /dev/shm is full. Each rank maps
    its peers' segments inside init_distributed, so after a barrier every rank removes its own name;
    the memory stays mapped until the process exits, and nothing is left even after a SIGKILL."""
    dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where this rank's tensors for collectives of `group` live: its GPU under nccl (which takes no
    CPU tensors), else the CPU. The trainer, predict and recover keep the head, the labels and every
    reduced number there."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 300.0, store_wait_s: float = 60.0) -> LaunchInfo:
    """Initialise the default process group (through DeepSpeed, so its engines share it) and learn
    where every rank runs (`LaunchInfo.peers`). `timeout_s`: of every collective; `store_wait_s`: how
    long a rank on another host waits for rank 0's store to listen before failing."""
    launcher = detect_launcher()
    if launcher == "mpi":
        _mpi_rendezvous()
    elif launcher == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    route = _choose_gloo_iface()
    if os.environ["RANK"] != "0" and _spans_hosts():
        _wait_for_store(route.target, int(os.environ["MASTER_PORT"]), store_wait_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    _unlink_deepspeed_shm()
    me = Peer(dist.get_rank(), socket.gethostname(), route.local_addr, os.environ["GLOO_SOCKET_IFNAME"])
    peers: list[Peer | None] = [None] * dist.get_world_size()
    dist.all_gather_object(peers, me)
    local_size = sum(p.host == me.host for p in peers)
    return LaunchInfo(
        launcher, me.rank, dist.get_world_size(), int(os.environ["LOCAL_RANK"]), local_size, tuple(peers)
    )
