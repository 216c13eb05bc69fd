"""The heartbeat watch (`pipeline.parallel.peer_watch`) against a real TCPStore: which loss it names.

A rank's heartbeat thread reads everyone's counters from rank 0's store. When a host's link is cut,
the rank that notices first ends; if that is rank 0, the store goes with it, and the other ranks
must still name the host whose beats had stopped (not wait a further timeout and blame the store).
When the store goes away while every counter still moves, this host is the one cut off: the store
is what is named. The beats of the other ranks come from the test's own thread.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from pipeline.parallel.distributed import Peer
from pipeline.parallel.peer_watch import PeerWatch

TIMEOUT_S, INTERVAL_S = 1.0, 0.05
PEERS = [Peer(r, f"h{r // 2}", f"10.9.0.{r // 2 + 1}", "eth0") for r in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def watch_rank1(monkeypatch, beating: set[int], stop_store_after: float, quiet_after: float) -> str:
    """Run rank 1's watch while this thread beats for `beating`; ranks 2 and 3 go quiet after
    `quiet_after` s, the store is shut down after `stop_store_after` s. Returns the message."""
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    lost: list[str] = []
    done = threading.Event()

    def on_lost(message: str) -> None:
        lost.append(message)
        done.set()

    watch = PeerWatch(PEERS, 1, timeout_s=TIMEOUT_S, interval_s=INTERVAL_S, on_lost=on_lost).start()
    start = time.monotonic()
    try:
        while not done.is_set() and time.monotonic() - start < 10 * TIMEOUT_S:
            elapsed = time.monotonic() - start
            if store is not None and elapsed > stop_store_after:
                del store  # the master's server stops with it: rank 0 has ended
                store = None
            if store is not None:
                for r in beating:
                    if r in (2, 3) and elapsed > quiet_after:
                        continue
                    store.add(f"xmc/heartbeat/{r}", 1)
            time.sleep(INTERVAL_S / 2)
    finally:
        watch.stop()
    assert lost, "the watch never reported a loss"
    return lost[0]


def test_peers_gone_quiet_are_named_when_rank_0_ends_first(monkeypatch):
    """Ranks 2 and 3 stop at 0.5 s; rank 0 notices at 1.5 s and ends before rank 1's next read."""
    message = watch_rank1(monkeypatch, {0, 2, 3}, stop_store_after=0.5 + TIMEOUT_S * 0.95, quiet_after=0.5)
    assert "lost rank 2, 3 on host h1 (10.9.0.2): no heartbeat" in message, message


def test_store_named_when_this_host_is_cut_off(monkeypatch):
    """Every counter moves until the store goes: nothing is stale; the store is named."""
    message = watch_rank1(monkeypatch, {0, 2, 3}, stop_store_after=0.5, quiet_after=1e9)
    assert "lost the rendezvous store on rank 0 on host h0 (10.9.0.1)" in message, message
    assert "is cut off" in message


def test_quiet_peers_named_while_the_store_answers(monkeypatch):
    message = watch_rank1(monkeypatch, {0, 2, 3}, stop_store_after=1e9, quiet_after=0.5)
    assert "lost rank 2, 3 on host h1 (10.9.0.2): no heartbeat" in message, message
