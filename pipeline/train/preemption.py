"""Preemption: a scheduler's signal ends the job at a step boundary, with a checkpoint of that step.

SIGTERM (Kubernetes, `scancel`, a launcher passing its own SIGTERM on) or SIGUSR1 (SLURM's
`--signal=USR1@120`, forwarded by mpirun) on any one rank or on all of them sets a flag. The trainer
agrees on the flag inside a collective it runs every micro-step anyway (the non-finite loss check), so
every rank finishes the same step, the job writes a checkpoint at that step, and every rank exits with
PREEMPTED_EXIT; `--resume auto` continues exactly from there.

The handler only sets the flag: a rank blocked in a collective sees it when the collective returns,
and a second signal while the checkpoint is written changes nothing (the scheduler's SIGKILL at the
end of its grace period is what ends a job that cannot finish in time; the previous checkpoint is
then the newest complete one).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

PREEMPTED_EXIT = 76
"""Exit code of every rank of a preempted job (distinct from failures, 1, and a lost peer, 75)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Preempted(Exception):
    """Training stopped on a signal after step `step`; the checkpoint at `checkpoint` holds it."""

    def __init__(self, why: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {why} after step {step}: checkpoint {checkpoint} written")
        self.why, self.step, self.checkpoint = why, step, checkpoint


class StopSignals:
    """Catches STOP_SIGNALS in this process (install from the main thread) and remembers the first."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.received = 0  # the first signal's number, 0: none yet
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum
            print(
                f"[rank {self.rank}] got {signal_name(signum)}: finishing this step, then a checkpoint",
                file=sys.stderr,
                flush=True,
            )
