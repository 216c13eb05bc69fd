"""Notice a lost host within seconds, name it, and end this rank.

Why: when every process of a host dies, its TCP peers see the connections close and the next
collective fails at once. When its link goes down nothing closes and nothing arrives: a rank blocked
in a Gloo collective waits for the process group's timeout (300 s), and the cut-off host's ranks wait
too. So every rank runs a daemon thread that, every `interval_s`, bumps its own counter in torch's
rendezvous store (on rank 0's host) and reads everyone's counters. A rank whose counter has not moved
for `timeout_s`, or a store this rank cannot reach for that long (rank 0's host lost, or this host
cut off), ends this process with `LOST_PEER_EXIT` after one line naming the rank(s), host(s) and
address(es). The launcher then ends the rest (mpirun and DeepSpeed's launcher both end a job whose
rank exited non-zero).

Cost per rank and interval: one `add` and one `multi_get` of `world` small keys on rank 0's store,
over its own connection (not the process group's), so a busy main thread is never delayed by it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch.distributed as dist

from pipeline.parallel.distributed import Peer

LOST_PEER_EXIT = 75  # EX_TEMPFAIL: the job may succeed when started again (--resume auto)


def describe(peers: Sequence[Peer]) -> str:
    """'rank 2, 3 on host h1 (10.0.0.3)' grouped by host."""
    by_host: dict[tuple[str, str], list[int]] = {}
    for p in peers:
        by_host.setdefault((p.host, p.addr), []).append(p.rank)
    parts = [f"rank {', '.join(map(str, r))} on host {h} ({a})" for (h, a), r in by_host.items()]
    return "; ".join(parts)


_peers: list[Peer] = []  # of the running watch: `name_peers_in` reads it


def name_peers_in(message: str) -> str:
    """The ranks and hosts whose addresses an error message mentions (Gloo names the peer it lost
    as [addr]:port), as ' (that is rank 2, 3 on host h1 (10.0.0.3))', or '' when none."""
    lost = [p for p in _peers if re.search(rf"\b{re.escape(p.addr)}\b", message)]
    return f" (that is {describe(lost)})" if lost else ""


def _exit_lost(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(LOST_PEER_EXIT)


class PeerWatch:
    """The heartbeat thread of one rank. `start()` after the process group is up, `stop()` on every
    rank before the last barrier (rank 0's store goes away with rank 0)."""

    def __init__(
        self,
        peers: Sequence[Peer],
        rank: int,
        timeout_s: float = 30.0,
        interval_s: float = 2.0,
        on_lost: Callable[[str], None] = _exit_lost,
    ) -> None:
        self.peers, self.rank = list(peers), rank
        self.timeout_s, self.interval_s, self.on_lost = timeout_s, interval_s, on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeerWatch:
        global _peers
        _peers = self.peers
        if self.timeout_s > 0 and len(self.peers) > 1:
            self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _connect(self) -> dist.TCPStore:
        timeout = timedelta(seconds=max(1.0, min(10.0, self.timeout_s / 3)))
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timeout,
            wait_for_workers=False,
        )

    def _run(self) -> None:
        keys = [f"xmc/heartbeat/{p.rank}" for p in self.peers]
        seen: list[bytes | None] = [None] * len(keys)
        moved = [time.monotonic()] * len(keys)  # when each counter last changed
        store, reached = None, time.monotonic()  # when the store last answered
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                store = store or self._connect()
                store.add(keys[self.rank], 1)
                values = store.multi_get(keys) if store.check(keys) else seen
                reached = now
            except Exception as e:  # the store is on rank 0's host: it is lost, or we are cut off
                store = None
                if self._stop.is_set():
                    return
                # rank 0 may have ended on peers whose beats had stopped while it still answered
                if self._report_stale(moved, now, before=reached - self.timeout_s / 2):
                    return
                if now - reached > self.timeout_s:
                    self.on_lost(
                        f"[rank {self.rank}] lost the rendezvous store on {describe(self.peers[:1])} for "
                        f"{now - reached:.0f} s ({type(e).__name__}: {e}): rank 0's host is down or this "
                        f"host ({describe(self.peers[self.rank : self.rank + 1])}) is cut off; exiting"
                    )
                    return
                continue
            for i, value in enumerate(values):
                if value != seen[i]:
                    seen[i], moved[i] = value, now
            if self._report_stale(moved, now):
                return

    def _report_stale(self, moved: Sequence[float], now: float, before: float = float("inf")) -> bool:
        """Report the peers whose counters last moved over `timeout_s` ago (and before `before`);
        False when none.

        Also checked when the store does not answer: the rank that first sees a host lost ends, and
        when that is rank 0 the store goes with it, so the others must not wait a further `timeout_s`
        for the store before naming the host they already know to be lost. Only peers that had gone
        quiet while the store still answered count then: when this host is the one cut off, every
        counter stopped with the store, and the store is what is reported."""
        stale = [p for p, t in zip(self.peers, moved, strict=True) if now - t > self.timeout_s and t < before]
        if not stale or self._stop.is_set():
            return False
        self.on_lost(
            f"[rank {self.rank}] lost {describe(stale)}: no heartbeat for {self.timeout_s:.0f} s "
            "(the host is down or its link is cut); exiting"
        )
        return True
