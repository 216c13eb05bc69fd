"""Bring Horovod up next to torch.distributed, with the same ranks, under either launcher.

Under `mpirun` Horovod uses its MPI controller (or, with HOROVOD_CONTROLLER=gloo, Gloo as below).
Under the `deepspeed` launcher there is no MPI and no `horovodrun`, so we do what `horovodrun --gloo`
would do: rank 0 starts Horovod's HTTP rendezvous server with a host plan built from
torch.distributed's ranks, and every rank sets the HOROVOD_* variables of its slot before
`hvd.init()`. Ranks must be contiguous per host, which both launchers guarantee by default; we check
rank and size agree afterwards. The rendezvous address is rank 0's own address on the cluster
network (`local_route`), not MASTER_ADDR's name: under Debian's stock /etc/hosts rank 0's host
resolves its own name to 127.0.1.1, where nothing listens.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import torch.distributed as dist

from pipeline.parallel.distributed import RendezvousError, local_route
from pipeline.parallel.grid import Layout
from pipeline.parallel.network import resolve

_rendezvous_server = None  # rank 0 keeps Horovod's rendezvous server alive for the whole run
_dp_process_set = None  # Horovod's process set of this rank's data-parallel group


def _host_plan(hosts: list[str]) -> str:
    """'host:slots,...' in rank order; raises if a host's ranks are not contiguous."""
    order: list[str] = []
    for h in hosts:
        if not order or order[-1] != h:
            if h in order:
                raise RuntimeError(
                    f"ranks of host {h} are not contiguous ({hosts}); Horovod needs them to be"
                )
            order.append(h)
    return ",".join(f"{h}:{hosts.count(h)}" for h in order)


def _gloo_iface(single_host: bool) -> str:
    """Horovod's Gloo interface: HOROVOD_GLOO_IFACE if given, else 'lo' on a single host, else the one
    torch's Gloo uses (GLOO_SOCKET_IFNAME, chosen by `init_distributed` from the route to the other
    hosts; its first entry when it lists several)."""
    if "HOROVOD_GLOO_IFACE" in os.environ:
        return os.environ["HOROVOD_GLOO_IFACE"]
    return "lo" if single_host else os.environ["GLOO_SOCKET_IFNAME"].split(",")[0]


def _refuse_loopback_names(names: list[tuple[str, str]]) -> None:
    """Stop on every rank when the job spans hosts and some host resolves its own name to a loopback
    address (Debian's stock `127.0.1.1 <hostname>` line). Horovod's Gloo transport was seen to connect
    to 127.0.1.1 then and abort the job (`gloo::IoException ... connect [127.0.1.1]`), although its
    interface was set; torch's Gloo and mpirun's Horovod (MPI) are not affected."""
    if len({host for host, _ in names}) == 1:
        return
    bad = sorted({f"{host} ({addr})" for host, addr in names if ipaddress.ip_address(addr).is_loopback})
    if bad:
        raise RendezvousError(
            f"host(s) {', '.join(bad)} resolve their own name to a loopback address (/etc/hosts, e.g. "
            "Debian's '127.0.1.1 <hostname>' line); Horovod over Gloo, which the deepspeed launcher "
            "uses, cannot connect across hosts then. Map each host name to its cluster address in "
            "/etc/hosts, or launch with mpirun (Horovod over MPI)"
        )


def _gloo_rendezvous() -> None:
    global _rendezvous_server
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    rank, size = dist.get_rank(), dist.get_world_size()
    me = socket.gethostname()
    names: list[tuple[str, str] | None] = [None] * size
    dist.all_gather_object(names, (me, resolve(me)))
    hosts = [host for host, _ in names]
    _refuse_loopback_names(names)
    plan = get_host_assignments(parse_hosts(_host_plan(hosts)), size)
    single_host = len(set(hosts)) == 1
    server = [None, None]  # rank 0's (address, port)
    if rank == 0:
        from horovod.runner.http.http_server import RendezvousServer

        _rendezvous_server = RendezvousServer()
        port = _rendezvous_server.start()
        _rendezvous_server.init(plan)
        server = ["127.0.0.1" if single_host else local_route().local_addr, port]
    dist.broadcast_object_list(server, src=0)
    addr, port = server
    slot = plan[rank]
    os.environ.update(
        HOROVOD_GLOO_RENDEZVOUS_ADDR=addr,
        HOROVOD_GLOO_RENDEZVOUS_PORT=str(port),
        HOROVOD_CONTROLLER="gloo",
        HOROVOD_CPU_OPERATIONS="gloo",
        HOROVOD_GLOO_IFACE=_gloo_iface(single_host),
        HOROVOD_HOSTNAME=slot.hostname,
        HOROVOD_RANK=str(slot.rank),
        HOROVOD_SIZE=str(slot.size),
        HOROVOD_LOCAL_RANK=str(slot.local_rank),
        HOROVOD_LOCAL_SIZE=str(slot.local_size),
        HOROVOD_CROSS_RANK=str(slot.cross_rank),
        HOROVOD_CROSS_SIZE=str(slot.cross_size),
    )


def init_horovod(launcher: str, layout: Layout) -> str:
    """Initialise Horovod for this launcher; returns the controller in use ('mpi' or 'gloo').

    The data-parallel groups of the grid are registered as Horovod process sets (statically, so
    every rank declares the same sets in the same order); `dp_process_set()` returns this rank's.
    """
    global _dp_process_set
    import horovod.torch as hvd

    if launcher != "mpi" or os.environ.get("HOROVOD_CONTROLLER") == "gloo":
        _gloo_rendezvous()
    if layout.dp == layout.world_size:  # mp == 1: the data-parallel group is the whole world
        hvd.init()
        _dp_process_set = hvd.global_process_set
    else:
        sets = [hvd.ProcessSet(layout.dp_group_ranks(p)) for p in range(layout.mp)]
        hvd.init(process_sets=sets)
        _dp_process_set = sets[layout.mp_rank(hvd.rank())]
    if (hvd.rank(), hvd.size()) != (dist.get_rank(), dist.get_world_size()):
        raise RuntimeError(
            f"Horovod rank/size {hvd.rank()}/{hvd.size()} disagree with torch.distributed "
            f"{dist.get_rank()}/{dist.get_world_size()}"
        )
    return "mpi" if hvd.mpi_enabled() else "gloo"


def dp_process_set():
    """Horovod process set of this rank's data-parallel group (after `init_horovod`)."""
    if _dp_process_set is None:
        raise RuntimeError("init_horovod() has not run")
    return _dp_process_set


def horovod_iface() -> str:
    """The interface Horovod's traffic uses: the Gloo one we chose, or under MPI what OpenMPI was told
    (`OMPI_MCA_btl_tcp_if_include`) or 'mpi-default' (OpenMPI's TCP transport: every non-loopback one)."""
    if "HOROVOD_GLOO_IFACE" in os.environ:
        return os.environ["HOROVOD_GLOO_IFACE"]
    return os.environ.get("OMPI_MCA_btl_tcp_if_include", "mpi-default")


def shutdown_horovod() -> None:
    """Shut down once every rank is done: Horovod's shutdown is global and would cut off a rank
    whose last collective is still in flight."""
    global _rendezvous_server, _dp_process_set
    _dp_process_set = None
    import horovod.torch as hvd

    dist.barrier()
    hvd.shutdown()
    if _rendezvous_server is not None:
        _rendezvous_server.stop()
        _rendezvous_server = None
