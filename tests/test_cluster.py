"""The test cluster of tests/cluster.py: real namespaces, sshd, ssh, pdsh and mpirun; no mocks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import NETNS_ETC, Cluster, _netns_list

# Runs on a host: connect to argv[1]:argv[2] (argv[3] s timeout); prints "ok" or the error's name.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("ok")
except OSError as exc:
    print(type(exc).__name__)
"""
# Runs on a host: accept one connection on argv[1]:argv[2], print how many bytes came.
SERVE = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(30)
print("listening", flush=True)
conn, _ = srv.accept()
n = 0
while chunk := conn.recv(1 << 16):
    n += len(chunk)
print(n, flush=True)
"""
SEND = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.sendall(b"x" * int(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(2) as c:
        yield c


def connect(cluster: Cluster, src: int, dst: int, port: int = 22, timeout: float = 1.0) -> str:
    """Connect from host ``src`` to host ``dst``; "ok" or the error's name."""
    argv = [sys.executable, "-c", CONNECT, cluster.hosts[dst].addr, str(port), str(timeout)]
    return cluster.run(cluster.hosts[src], argv).stdout.strip()


def test_hosts_have_own_names_and_addresses(cluster: Cluster) -> None:
    seen = []
    for host in cluster.hosts:
        proc = cluster.run(host, ["sh", "-c", "hostname; hostname -I"])
        assert proc.returncode == 0, proc.stderr
        name, addrs = proc.stdout.splitlines()
        assert name == host.name
        assert addrs.split() == [host.addr]
        seen.append((name, host.addr))
    assert len({n for n, _ in seen}) == len({a for _, a in seen}) == len(cluster.hosts)


def test_ssh_and_pdsh(cluster: Cluster) -> None:
    h0, h1 = cluster.hosts
    proc = cluster.ssh(h1, "hostname")
    assert (proc.returncode, proc.stdout.strip()) == (0, h1.name), proc.stderr
    # DeepSpeed's ssh check: plain ssh, found through PATH
    proc = cluster.run(h0, ["ssh", "-o", "PasswordAuthentication=no", h1.name, "hostname"])
    assert (proc.returncode, proc.stdout.strip()) == (0, h1.name), proc.stderr
    proc = cluster.run(h0, ["pdsh", "-R", "ssh", "-w", f"{h0.name},{h1.name}", "hostname"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(f"{h.name}: {h.name}" for h in (h0, h1))


def test_mpirun_over_ssh(cluster: Cluster) -> None:
    hostfile = cluster.hostfile(1)
    proc = cluster.run(cluster.hosts[0], ["mpirun", "--hostfile", str(hostfile), "-np", "2", "hostname"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(h.name for h in cluster.hosts)


def test_transfer_counts_bytes(cluster: Cluster) -> None:
    h0, h1 = cluster.hosts
    size, port = 1 << 20, 5001
    rx_before, _ = cluster.link_bytes(h1)
    _, tx_before = cluster.link_bytes(h0)
    serve = [sys.executable, "-c", SERVE, h1.addr, str(port)]
    server = cluster.popen(h1, serve, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        sent = cluster.run(h0, [sys.executable, "-c", SEND, h1.addr, str(port), str(size)], timeout=30)
        assert sent.returncode == 0, sent.stderr
        assert server.stdout.readline().strip() == str(size)
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
        server.wait()
    assert cluster.link_bytes(h1)[0] - rx_before >= size
    assert cluster.link_bytes(h0)[1] - tx_before >= size


def test_link_down_and_up(cluster: Cluster) -> None:
    assert connect(cluster, 0, 1) == "ok"
    cluster.link_down(cluster.hosts[1])
    try:
        assert connect(cluster, 0, 1) != "ok"
    finally:
        cluster.link_up(cluster.hosts[1])
    assert connect(cluster, 0, 1) == "ok"


def test_kill_and_restart_host(cluster: Cluster) -> None:
    h1 = cluster.hosts[1]
    sleeper = cluster.popen(h1, ["sleep", "1000"])
    sshd = cluster.sshd_pid(h1)
    try:
        cluster.kill_host(h1)
        assert sleeper.wait(timeout=5) == -9
        assert not Path(f"/proc/{sshd}").exists()
        assert connect(cluster, 0, 1) == "ConnectionRefusedError"
        assert cluster.ssh(h1, "hostname").returncode != 0
    finally:
        cluster.restart_host(h1)
    proc = cluster.ssh(h1, "hostname")
    assert (proc.returncode, proc.stdout.strip()) == (0, h1.name), proc.stderr


def test_subnet_is_private(cluster: Cluster) -> None:
    """The root namespace has no link, address or route of ours: it cannot reach the hosts' sshd.

    Where the machine's uplink accepts every TCP connect (a transparent proxy: this sandbox's does),
    a connect to a host's address from here "succeeds" at that proxy, so what is checked is that no
    SSH banner (our sshd sends one at once) comes back and that the route is not one of ours.
    """
    h0 = cluster.hosts[0]
    banner = b""
    try:
        with socket.create_connection((h0.addr, 22), timeout=1) as conn:
            conn.settimeout(0.5)
            banner = conn.recv(4)
    except OSError:
        pass
    assert not banner.startswith(b"SSH-")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert cluster.tag not in links  # no link of ours in the root namespace
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert f" {h0.addr}/" not in addrs
    route = subprocess.run(["ip", "-j", "route", "get", h0.addr], capture_output=True, text=True, check=True)
    assert json.loads(route.stdout)[0]["dev"] in links  # a root-namespace device, i.e. not ours
    ours = [h.netns for h in cluster.hosts] + [cluster.switch_netns]
    assert set(ours) <= set(_netns_list())


def test_stop_leaves_nothing() -> None:
    with Cluster(2, stock_debian_hosts=True) as c:
        h0, h1 = c.hosts
        hosts = c.run(h0, ["getent", "ahostsv4", h0.name]).stdout.split()
        assert hosts[0] == "127.0.1.1"  # the stock Debian line comes first
        assert c.run(h0, ["getent", "hosts", h1.name]).stdout.split() == [h1.addr, h1.name]
        namespaces = [h.netns for h in c.hosts] + [c.switch_netns]
        pids = [c.sshd_pid(h) for h in c.hosts]
        sleeper = c.popen(h1, ["sleep", "1000"])
        workdir = c.workdir
        assert all((NETNS_ETC / h.netns / "hosts").is_file() for h in c.hosts)
    assert not set(namespaces) & set(_netns_list())
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert sleeper.returncode == -9
    assert not any((NETNS_ETC / ns).exists() for ns in namespaces)
    assert not workdir.exists()
    c.stop()  # idempotent
