"""Progress bars that read well in a terminal and in a log file.

On a terminal: tqdm as usual. Elsewhere (CI, `nohup`, SLURM output files) tqdm's carriage-return
redraws would pile up into one huge line (a demo run's log was ~250 KB of them); there the bar writes
one plain line every `1/lines` of the total instead, about 20 lines for a whole run.
"""

from __future__ import annotations

import math
import sys
from typing import IO

from tqdm import tqdm


class _Lines:
    """A file for tqdm that turns each redraw into one line of its own."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    total: int | None, desc: str, enabled: bool = True, initial: int = 0, lines: int = 20, **kwargs
) -> tqdm:
    """A tqdm bar on stderr; on a non-terminal one line every total/lines updates (every `lines`
    thousand units when the total is unknown). `kwargs` go to tqdm (unit, unit_scale, ...)."""
    stream = sys.stderr
    if not enabled or stream.isatty():
        return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, file=stream, **kwargs)
    every = max(1, math.ceil(total / lines)) if total else 1000 * lines
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        file=_Lines(stream),
        miniters=every,
        mininterval=0,
        maxinterval=float("inf"),
        ascii=True,
        **kwargs,
    )
