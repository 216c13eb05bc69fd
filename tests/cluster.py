"""A test cluster of N hosts on one machine: network namespaces on a private bridge, one sshd each.

Each host is a network namespace (``xmc<pid><c>h<i>``) with its own veth link (``eth0`` inside) onto a
bridge that lives in a separate "switch" namespace (``xmc<pid><c>sw``), an address on a private
``10.213.<k>.0/24`` subnet that exists only inside those namespaces, its own hostname (a UTS namespace
made by ``unshare --uts``), its own ``/etc/hosts`` (``/etc/netns/<ns>/hosts``, bind-mounted over
``/etc/hosts`` by ``ip netns exec``) and its own sshd listening on its address. Nothing is created in
the root namespace: the test process itself cannot reach the subnet; it reaches a host only by
entering its namespaces (:meth:`Cluster.run`, :meth:`Cluster.popen`), and from there ``ssh``, ``pdsh
-R ssh`` and ``mpirun`` (rsh agent ``ssh``) reach the others. The filesystem is shared, as on a cluster
with a shared home: every host sees the checkout at the same path.

Keys and configs are throw-away files in :attr:`Cluster.workdir`; root's ``~/.ssh`` is not touched.
The client side is a wrapper ``<workdir>/bin/ssh`` (``/usr/bin/ssh -F <workdir>/ssh_config``); it is
first in ``PATH`` of :meth:`Cluster.env` and of every ssh session (sshd ``SetEnv PATH=...``), so plain
``ssh HOST``, pdsh's ssh module (it runs ``ssh`` through ``PATH``; pdsh's default rcmd on Debian is
rsh, hence ``PDSH_RCMD_TYPE=ssh`` in :meth:`Cluster.env`) and OpenMPI's rsh agent all use the
cluster's keys.

Needs root and: iproute2 (``ip``), util-linux (``nsenter``, ``unshare``), openssh-server (``sshd``),
openssh-client (``ssh``, ``ssh-keygen``), pdsh. Try it by hand::

    python -m tests.cluster up --hosts 2     # prints hosts, env, example lines; Ctrl-C tears down
    python -m tests.cluster down             # removes leftovers of clusters whose owner is dead
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "xmc"
"""Every namespace this module makes is named ``xmc<owner pid><cluster letter>(h<i>|sw)``."""
NETNS_ETC = Path("/etc/netns")
SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
REQUIRED = {  # command -> Debian package
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "pdsh": "pdsh",
}
MAX_HOSTS = 99
_NS_RE = re.compile(rf"^{PREFIX}(\d+)([a-z])(?:h\d+|sw)$")
_WORKDIR_RE = re.compile(rf"^{PREFIX}-cluster-(\d+)([a-z])-")
_tags_lock = threading.Lock()
_tags_in_use: set[str] = set()


class ClusterError(RuntimeError):
    """The cluster could not be set up, or a host did not behave."""


@dataclass(frozen=True)
class Host:
    """One host of a :class:`Cluster`."""

    name: str
    """Hostname inside its UTS namespace (also its namespace name), unique per cluster, e.g. ``xmc123ah0``."""
    addr: str
    """Its IPv4 address on the cluster's private subnet."""
    netns: str
    """Its network namespace (``ip netns`` name)."""
    iface: str
    """Its interface inside the namespace (``eth0``)."""


def _sh(argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a setup command in the root namespace; raise :class:`ClusterError` with its stderr on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _netns_list() -> list[str]:
    proc = _sh(["ip", "-j", "netns", "list"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(proc.stdout)]


def _netns_pids(netns: str) -> list[int]:
    proc = _sh(["ip", "netns", "pids", netns], check=False)
    if proc.returncode != 0:
        return []
    return [int(tok) for tok in proc.stdout.split()]


def _kill_netns(netns: str, timeout: float = 5.0, reap: Any = None) -> None:
    """SIGKILL every process whose network namespace is ``netns`` until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in _netns_pids(netns) if pid != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if reap is not None:
            reap()
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {pids} in netns {netns} survive SIGKILL")
        time.sleep(0.02)


def _remove_netns(netns: str, reap: Any = None) -> None:
    _kill_netns(netns, reap=reap)
    _sh(["ip", "netns", "del", netns], check=False)  # deletes its links too (and so their veth peers)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def _rmdir_netns_etc() -> None:
    try:
        NETNS_ETC.rmdir()  # only when empty: other clusters' (or other tools') entries stay
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed owner may not be reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A ``10.213.<k>.0/24`` that overlaps no route or address of the root namespace."""
    used: list[ipaddress.IPv4Network] = []
    routes = _sh(["ip", "-j", "-4", "route", "show", "table", "all"], check=False).stdout.strip()
    for route in json.loads(routes or "[]"):
        if route.get("dst", "default") != "default":
            used.append(ipaddress.IPv4Network(route["dst"], strict=False))
    links = _sh(["ip", "-j", "-4", "addr", "show"], check=False).stdout.strip()
    for link in json.loads(links or "[]"):
        for info in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for step in range(256):
        net = ipaddress.IPv4Network(f"10.213.{(seed + step) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise ClusterError("no free 10.213.<k>.0/24 subnet")


def _listening(pid: int, addr: str, port: int = 22) -> bool:
    """Whether process ``pid``'s network namespace has a TCP socket listening on ``addr:port``."""
    want = f"{bytes(reversed(ipaddress.IPv4Address(addr).packed)).hex().upper()}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == want and line.split()[3] == "0A" for line in lines)


class Cluster:
    """N hosts on this machine; a context manager (``start()`` on enter, ``stop()`` on exit, always).

    ``stock_debian_hosts=True`` adds Debian's ``127.0.1.1 <hostname>`` line to every host's
    ``/etc/hosts`` (before the cluster's entries, as on a stock install), so that a host's own name
    resolves to a loopback address first.
    """

    def __init__(self, n_hosts: int = 2, stock_debian_hosts: bool = False) -> None:
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"n_hosts must be in 1..{MAX_HOSTS}, got {n_hosts}")
        self.n_hosts = n_hosts
        self.stock_debian_hosts = stock_debian_hosts
        self.hosts: list[Host] = []
        self.workdir: Path = Path()
        self.tag = ""
        self.switch_netns = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self._sshd: dict[str, subprocess.Popen] = {}
        self._procs: list[subprocess.Popen] = []
        self._started = False
        self._stopped = False

    # -- life cycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Make the namespaces, links, configs and keys; start every sshd and wait until it listens."""
        if self._started:
            raise ClusterError("cluster already started")
        self._started = True
        if os.geteuid() != 0:
            raise ClusterError("a Cluster needs root (network namespaces, sshd)")
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        for cmd, pkg in REQUIRED.items():
            if shutil.which(cmd, path=search) is None:
                raise ClusterError(f"required command {cmd!r} not found (apt-get install {pkg})")
        for path in (SSHD, SSH):
            if not os.access(path, os.X_OK):
                raise ClusterError(f"{path} missing (apt-get install openssh-server openssh-client)")

        with _tags_lock:
            free = [c for c in "abcdefghijklmnopqrstuvwxyz" if f"{os.getpid()}{c}" not in _tags_in_use]
            letter = free[0] if free else ""
            if not letter:
                raise ClusterError("at most 26 clusters at a time per process")
            _tags_in_use.add(f"{os.getpid()}{letter}")
        self.tag = f"{PREFIX}{os.getpid()}{letter}"
        atexit.register(self.stop)
        # leftovers of an earlier (dead) process that had our pid
        for ns in _netns_list():
            if ns.startswith(self.tag) and _NS_RE.match(ns):
                _remove_netns(ns)

        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-cluster-{os.getpid()}{letter}-"))
        self.subnet = _free_subnet(os.getpid() * 26 + ord(letter))
        addrs = list(self.subnet.hosts())
        self.hosts = [
            Host(name=f"{self.tag}h{i}", addr=str(addrs[i]), netns=f"{self.tag}h{i}", iface="eth0")
            for i in range(self.n_hosts)
        ]
        self.switch_netns = f"{self.tag}sw"
        self._write_keys_and_configs()
        self._make_network()
        for host in self.hosts:
            self._write_etc(host)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for host in self.hosts:
            self._start_sshd(host)
        for host in self.hosts:
            self._wait_sshd(host)
        # one real login through the wrapper, from the first host to the last: keys, routing, PATH
        check = self.ssh(self.hosts[-1], "hostname", timeout=20)
        if check.returncode != 0 or check.stdout.strip() != self.hosts[-1].name:
            raise ClusterError(
                f"ssh {self.hosts[0].name} -> {self.hosts[-1].name} failed ({check.returncode}): "
                f"{check.stdout.strip()} {check.stderr.strip()}"
            )

    def stop(self) -> None:
        """Kill every process in every namespace made here, delete them (and so their links), the
        ``/etc/netns`` entries and the work directory. Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        errors: list[str] = []
        for ns in [h.netns for h in self.hosts] + ([self.switch_netns] if self.switch_netns else []):
            try:
                _remove_netns(ns, reap=self._reap)
            except Exception as exc:  # go on: remove all we can
                errors.append(str(exc))
        for proc in [*self._sshd.values(), *self._procs]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} did not exit")
        self._sshd.clear()
        self._procs.clear()
        _rmdir_netns_etc()
        if self.workdir.name:
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _tags_lock:
            _tags_in_use.discard(self.tag.removeprefix(PREFIX))
        if errors:
            raise ClusterError("; ".join(errors))

    # -- setup --------------------------------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        """The wrapper directory (holds ``ssh``); first in ``PATH`` of :meth:`env` and ssh sessions."""
        return self.workdir / "bin"

    def _path(self) -> str:
        parts = [str(self.bindir), os.path.dirname(sys.executable), os.environ.get("PATH", "")]
        return os.pathsep.join(p for p in parts if p)

    def _write_keys_and_configs(self) -> None:
        wd = self.workdir
        for key in ("host_ed25519", "id_ed25519"):
            comment = f"{self.tag}-{key}"
            _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(wd / key)])
        shutil.copy(wd / "id_ed25519.pub", wd / "authorized_keys")
        (wd / "ssh_config").write_text(
            "Host *\n"
            "  User root\n"
            f"  IdentityFile {wd / 'id_ed25519'}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 5\n"
            "  ServerAliveInterval 2\n"
            "  ServerAliveCountMax 3\n"
        )
        self.bindir.mkdir()
        wrapper = self.bindir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {SSH} -F {shlex.quote(str(wd / "ssh_config"))} "$@"\n')
        wrapper.chmod(0o755)

    def _make_network(self) -> None:
        sw = self.switch_netns
        _sh(["ip", "netns", "add", sw])
        _sh(["ip", "-n", sw, "link", "set", "lo", "up"])
        _sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0"])
        _sh(["ip", "-n", sw, "link", "set", "br0", "up"])
        assert self.subnet is not None
        for host in self.hosts:
            ns, port, iface = host.netns, self._port(host), host.iface
            _sh(["ip", "netns", "add", ns])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            # created in the switch namespace, its peer goes straight into the host's: none in ours
            _sh(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", iface, "netns", ns])
            _sh(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _sh(["ip", "-n", sw, "link", "set", port, "up"])
            _sh(["ip", "-n", ns, "addr", "add", f"{host.addr}/{self.subnet.prefixlen}", "dev", iface])
            _sh(["ip", "-n", ns, "link", "set", iface, "up"])

    def _port(self, host: Host) -> str:
        """The switch end of the host's veth pair (inside the switch namespace)."""
        return f"{self.tag}p{self.hosts.index(host)}"

    def _write_etc(self, host: Host) -> None:
        etc = NETNS_ETC / host.netns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1\tlocalhost"]
        if self.stock_debian_hosts:
            lines.append(f"127.0.1.1\t{host.name}")
        lines += ["::1\tlocalhost ip6-localhost ip6-loopback", "ff02::1\tip6-allnodes"]
        lines += ["ff02::2\tip6-allrouters"]
        lines += [f"{h.addr}\t{h.name}" for h in self.hosts]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "hostname").write_text(host.name + "\n")
        wd = self.workdir
        (wd / f"sshd_config.{host.name}").write_text(
            f"ListenAddress {host.addr}:22\n"
            f"HostKey {wd / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {wd / 'authorized_keys'}\n"
            f"PidFile {wd / f'sshd.{host.name}.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "X11Forwarding no\n"
            "MaxStartups 200\n"
            "MaxSessions 200\n"
            # As a cluster's sshd should be set: a session whose client is gone (a cut link) ends in
            # ~6 s. Without it the session's pipes stay open and a launcher on a cut-off host blocks
            # for good writing its last lines into them.
            "ClientAliveInterval 2\n"
            "ClientAliveCountMax 3\n"
            f'SetEnv "PATH={self._path()}"\n'
        )
        enter = wd / f"enter-{host.name}"  # for humans: a shell (or a command) on that host
        variables = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.env().items())
        enter.write_text(
            "#!/bin/sh\n"
            f"pid=$(cat {shlex.quote(str(wd / f'sshd.{host.name}.pid'))}) || exit 1\n"
            f'[ $# -gt 0 ] || set -- "${{SHELL:-/bin/sh}}"\n'
            f'exec nsenter -t "$pid" -n -u -m --wd="$PWD" env {variables} "$@"\n'
        )
        enter.chmod(0o755)

    def _start_sshd(self, host: Host) -> None:
        cfg = self.workdir / f"sshd_config.{host.name}"
        log = open(self.workdir / f"sshd.{host.name}.log", "ab")  # noqa: SIM115 (handed to the child)
        try:
            # ip netns exec, unshare and sh all exec: the Popen's pid is sshd's own
            script = f"hostname {shlex.quote(host.name)} && exec {SSHD} -D -e -f {shlex.quote(str(cfg))}"
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        self._sshd[host.name] = proc

    def _wait_sshd(self, host: Host, timeout: float = 10.0) -> None:
        proc = self._sshd[host.name]
        deadline = time.monotonic() + timeout
        while not _listening(proc.pid, host.addr):
            if proc.poll() is not None:
                log = self._sshd_log(host)
                raise ClusterError(f"sshd on {host.name} exited ({proc.returncode}): {log}")
            if time.monotonic() > deadline:
                log = self._sshd_log(host)
                raise ClusterError(f"sshd on {host.name} not listening after {timeout}s: {log}")
            time.sleep(0.02)

    def _sshd_log(self, host: Host) -> str:
        try:
            return (self.workdir / f"sshd.{host.name}.log").read_text()[-2000:].strip()
        except OSError:
            return ""

    def _reap(self) -> None:
        for proc in list(self._sshd.values()):
            proc.poll()
        self._procs = [p for p in self._procs if p.poll() is None]

    # -- use ----------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Variables to add to ``os.environ`` for launchers run on a host (:meth:`run` adds them)."""
        return {
            "PATH": self._path(),
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1",
            "OMP_NUM_THREADS": "1",
            # pdsh on Debian defaults to rsh; its ssh module runs `ssh` through PATH (the wrapper)
            "PDSH_RCMD_TYPE": "ssh",
        }

    def hostfile(self, slots: int) -> Path:
        """A hostfile with ``<name> slots=<slots>`` per host, valid for DeepSpeed and OpenMPI."""
        path = self.workdir / f"hostfile.{slots}"
        path.write_text("".join(f"{h.name} slots={slots}\n" for h in self.hosts))
        return path

    def sshd_pid(self, host: Host) -> int:
        """The pid of the host's running sshd (its namespaces are the host's)."""
        proc = self._sshd.get(host.name)
        if proc is None or proc.poll() is not None:
            raise ClusterError(f"host {host.name} is down (kill_host); restart_host brings it back")
        return proc.pid

    def _enter(self, host: Host, argv: list[str], cwd: Path | str | None) -> list[str]:
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        # entering a mount namespace resets the cwd to its root, hence --wd
        return ["nsenter", "-t", str(self.sshd_pid(host)), "-n", "-u", "-m", f"--wd={wd}", "--", *argv]

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**os.environ, **self.env(), **(env or {})}

    def run(
        self,
        host: Host,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        timeout: float = 300,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` directly (nsenter into its sshd's net, uts and mount namespaces, so
        it sees the host's hostname and /etc/hosts); output captured as text. ``env`` is merged over
        ``os.environ`` + :meth:`env`; ``cwd`` defaults to ours. On timeout the whole process group is
        killed and ``subprocess.TimeoutExpired`` raised."""
        cmd = self._enter(host, argv, cwd)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(env),
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def popen(
        self,
        host: Host,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in the background, as :meth:`run` does, in a new session (so the
        caller can ``os.killpg`` it); other ``kwargs`` go to ``subprocess.Popen``. :meth:`kill_host`
        and :meth:`stop` kill it too."""
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._enter(host, argv, cwd), env=self._env(env), **kwargs)
        self._procs.append(proc)
        return proc

    def ssh(
        self, host: Host, command: str, timeout: float = 60, *, via: Host | None = None
    ) -> subprocess.CompletedProcess:
        """``ssh <host> <command>`` through the wrapper. The root namespace has no route to the
        cluster's subnet, so the client runs on ``via`` (default ``hosts[0]``) through :meth:`run`."""
        return self.run(via or self.hosts[0], ["ssh", host.name, command], timeout=timeout)

    def kill_host(self, host: Host) -> None:
        """SIGKILL every process in the host's network namespace, sshd included: the host is gone
        (its interface and address stay; connections to it are refused)."""
        _kill_netns(host.netns, reap=self._reap)
        proc = self._sshd.pop(host.name, None)
        if proc is not None:
            proc.wait(timeout=5)
        self._reap()

    def restart_host(self, host: Host) -> None:
        """Start the host's sshd again (after :meth:`kill_host`) and wait until it listens; a no-op
        if it is running."""
        proc = self._sshd.get(host.name)
        if proc is not None and proc.poll() is None:
            return
        self._start_sshd(host)
        self._wait_sshd(host)

    def link_down(self, host: Host) -> None:
        """Pull the host's cable: set the switch end of its veth down (its ``eth0`` loses carrier)."""
        _sh(["ip", "-n", self.switch_netns, "link", "set", self._port(host), "down"])

    def link_up(self, host: Host, timeout: float = 5.0) -> None:
        """Plug the cable back in, and wait until the host's ``eth0`` is up again."""
        _sh(["ip", "-n", self.switch_netns, "link", "set", self._port(host), "up"])
        deadline = time.monotonic() + timeout
        while True:
            out = _sh(["ip", "-n", host.netns, "-j", "link", "show", host.iface]).stdout
            if json.loads(out)[0].get("operstate") == "UP":
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{host.name}'s {host.iface} not up {timeout}s after link_up")
            time.sleep(0.02)

    def link_bytes(self, host: Host) -> tuple[int, int]:
        """``(rx_bytes, tx_bytes)`` of the host's ``eth0``, as counted inside its namespace."""
        out = _sh(["ip", "-n", host.netns, "-s", "-j", "link", "show", host.iface]).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])


def cleanup_stale() -> list[str]:
    """Remove namespaces, ``/etc/netns`` entries and work directories of clusters whose owner
    process is dead. Only names this module makes (``xmc<pid><c>h<i>``, ``xmc<pid><c>sw``) are
    touched. Returns what was removed."""
    removed: list[str] = []
    for ns in _netns_list():
        m = _NS_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _remove_netns(ns)
            removed.append(f"netns {ns}")
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.iterdir():
            m = _NS_RE.match(entry.name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
        _rmdir_netns_etc()
    for entry in Path(tempfile.gettempdir()).iterdir():
        m = _WORKDIR_RE.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


def main(argv: list[str] | None = None) -> int:
    """``up``: start a cluster, print how to use it, run until Ctrl-C/SIGTERM. ``down``: clean up."""
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster and keep it until Ctrl-C / SIGTERM")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--slots", type=int, default=1, help="slots per host in the printed hostfile")
    up.add_argument("--stock-debian-hosts", action="store_true", help="add '127.0.1.1 <hostname>' lines")
    sub.add_parser("down", help="remove leftovers of clusters whose owner process is dead")
    args = parser.parse_args(argv)

    if args.cmd == "down":
        removed = cleanup_stale()
        print("\n".join(removed) if removed else "nothing to remove")
        live = [ns for ns in _netns_list() if _NS_RE.match(ns)]
        if live:
            print("still running (owner alive):", " ".join(live))
        return 0

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Cluster(args.hosts, stock_debian_hosts=args.stock_debian_hosts) as cluster:
        hostfile = cluster.hostfile(args.slots)
        h0 = cluster.hosts[0]
        names = ",".join(h.name for h in cluster.hosts)
        print(f"cluster {cluster.tag}: subnet {cluster.subnet} (only inside its namespaces)")
        print(f"workdir {cluster.workdir}")
        for h in cluster.hosts:
            print(f"  {h.name}  {h.addr}  netns {h.netns}  sshd pid {cluster.sshd_pid(h)}")
        print("\n# the environment for launchers on a host (enter-* scripts set it):")
        for key, value in cluster.env().items():
            print(f"export {key}={shlex.quote(value)}")
        print(f"\n# a shell on {h0.name} (or a command: append it):")
        print(f"{cluster.workdir / ('enter-' + h0.name)}")
        print("# then, on that host:")
        print(f"ssh {cluster.hosts[-1].name} hostname")
        print(f"pdsh -R ssh -w {names} hostname")
        print(f"mpirun --hostfile {hostfile} -np {args.hosts * args.slots} hostname")
        for launcher in ("pdsh", "openmpi"):
            print(f"deepspeed --hostfile {hostfile} --launcher {launcher} --master_addr {h0.name} X.py ...")
        print("\nCtrl-C (or SIGTERM) tears it down.", flush=True)
        while not stop.wait(1.0):
            pass
    print("torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
