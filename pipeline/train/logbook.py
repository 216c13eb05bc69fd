"""Metrics of a run, written by rank 0: JSONL (one record per line, appended, so a resumed run
continues the same file), TensorBoard scalars, and a PNG plot of loss and P@1/P@5 at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class Logbook:
    """Append-only metrics log; a no-op on ranks other than 0."""

    def __init__(self, output_dir: str | Path, enabled: bool) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            plot_metrics(self.dir / "metrics.jsonl", self.dir / "metrics.png")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Training loss and test P@1/P@5 over steps, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(jsonl) if jsonl.is_file() else []
    train = [r for r in records if r["kind"] == "train"]
    test = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    for key in ("P@1", "P@5"):
        ax_p.plot([r["step"] for r in test], [r[key] for r in test], marker="o", label=key)
    ax_p.set(xlabel="step", ylabel="precision", title="test precision")
    ax_p.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
