"""Fault injection for the tests of the failure paths, read from the environment.

XMC_FAULT_RANK=N   the rank that fails (nothing happens on the others, or when unset)
XMC_FAULT_KIND     raise (default): raise a RuntimeError; kill: SIGKILL itself; nan: make the
                   training loss NaN (training steps only); term: send itself one SIGTERM (a
                   preemption, training steps only)
XMC_FAULT_STEP=S   fail at optimizer step S and later; unset: right after start-up
XMC_FAULT_COUNT=C  for nan: this many losses in a row (default 1)
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class FaultInjector:
    """The fault this rank was asked to inject, if any."""

    kind: str | None = None  # None: this rank injects nothing
    step: int | None = None
    count: int = 1
    injected: int = 0

    @classmethod
    def from_env(cls, rank: int, env: Mapping[str, str] = os.environ) -> FaultInjector:
        if env.get("XMC_FAULT_RANK") != str(rank):
            return cls()
        step = int(env["XMC_FAULT_STEP"]) if "XMC_FAULT_STEP" in env else None
        kind = env.get("XMC_FAULT_KIND", "raise")
        if kind not in ("raise", "kill", "nan", "term"):
            raise ValueError(f"XMC_FAULT_KIND: expected raise, kill, nan or term, got {kind!r}")
        return cls(kind, step, int(env.get("XMC_FAULT_COUNT", "1")))

    def at_start(self) -> None:
        """Right after start-up: fail here when no step was given."""
        if self.kind not in (None, "term") and self.step is None:
            self._fail("at start-up")

    def at_step(self, step: int) -> bool:
        """Before the loss of optimizer step `step` is used; True when that loss is to be made NaN."""
        if self.kind is None or self.step is None or step < self.step:
            return False
        if self.kind == "term":
            if self.injected == 0:
                self.injected = 1
                os.kill(os.getpid(), signal.SIGTERM)
            return False
        if self.kind != "nan":
            self._fail(f"at step {step}")
        if self.injected < self.count:
            self.injected += 1
            return True
        return False

    def _fail(self, where: str) -> None:
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault {where} (XMC_FAULT_RANK)")
