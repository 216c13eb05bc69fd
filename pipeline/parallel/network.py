"""Which local address and network interface reach another host: the one answer that the MPI
rendezvous, torch's Gloo (`GLOO_SOCKET_IFNAME`) and Horovod's Gloo (`HOROVOD_GLOO_IFACE`) all need.

Found from the kernel's routing table, not from the host name: a UDP `connect` picks the route and
the source address without sending anything, and the interface is the one holding that address. The
host name is no guide: Debian's stock `/etc/hosts` maps it to 127.0.1.1, a loopback address other
hosts cannot reach.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil


class NetworkError(RuntimeError):
    """An address that cannot be resolved or reached, named."""


@dataclass(frozen=True)
class Route:
    """How this host reaches `target`: from address `local_addr` on interface `iface`."""

    target: str
    local_addr: str
    iface: str

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.local_addr).is_loopback


def resolve(host: str) -> str:
    """IPv4 address of a host name or address (raises NetworkError naming it)."""
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise NetworkError(f"cannot resolve {host!r}: {e}") from None


def route_to(host: str) -> Route:
    """The local address and interface the kernel uses to reach `host` (a name or an address)."""
    addr = resolve(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 1))  # UDP: selects the route, sends nothing
        except OSError as e:
            raise NetworkError(f"no route from {socket.gethostname()} to {host} ({addr}): {e}") from None
        local = s.getsockname()[0]
    return Route(addr, local, interface_of(local))


def interface_of(addr: str) -> str:
    """Name of the local interface holding IPv4 `addr`."""
    want = ipaddress.ip_address(addr)
    if want.is_loopback:
        return "lo"
    for iface, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and ipaddress.ip_address(a.address) == want for a in addrs):
            return iface
    raise NetworkError(f"no network interface of {socket.gethostname()} holds {addr}")


def external_addrs() -> list[str]:
    """This host's IPv4 addresses outside the loopback range, by interface name."""
    found = []
    for _, addrs in sorted(psutil.net_if_addrs().items()):
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                found.append(a.address)
    return found


def probe_tcp(addr: str, port: int, timeout_s: float) -> str | None:
    """Connect once to addr:port; None on success, else the reason (refused, timed out, ...)."""
    try:
        with socket.create_connection((addr, port), timeout=timeout_s):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__
