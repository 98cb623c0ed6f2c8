"""Where numbers go: ``metrics.jsonl`` in the run directory, a progress display, the console report."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from aligner.errors import os_error

log = logging.getLogger("aligner")


def to_float(value: Any) -> float:
    """A metric value (float or 0-d tensor) as a plain float."""
    return float(value.item() if hasattr(value, "item") else value)


class MetricsFile:
    """Appends one JSON object per logged step to ``metrics.jsonl``."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"stage", "step", **metrics}``; non-finite values are written as null."""
        if not self.enabled:
            return
        record = {"stage": stage, "step": step}
        record.update({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk or a vanished folder: one located line, not a traceback
            raise os_error(exc, self.path, "could not write the metrics to") from exc


class Progress:
    """A rich progress bar on a terminal; plain log lines (about 20 per stage) otherwise."""

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.description = description
        self.total = total
        self.enabled = enabled
        self.start = time.perf_counter()
        self.interactive = enabled and sys.stderr.isatty()
        self.every = max(1, total // 20)
        self._bar = None
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._bar.add_task(description, total=total, info="")
            self._bar.start()

    def update(self, done: int, info: dict[str, float] | None = None) -> None:
        """Report ``done`` of ``total`` with a few headline numbers."""
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" for k, v in (info or {}).items())
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=text)
        elif done % self.every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(done, 1) * (self.total - done)
            log.info("%s %d/%d  %s  eta %.0fs", self.description, done, self.total, text, eta)

    def close(self) -> None:
        """Stop the bar."""
        if self._bar is not None:
            self._bar.stop()


def report(stage: str, before: dict[str, float], after: dict[str, float]) -> None:
    """Print held-out metrics before and after a stage as a table."""
    keys = [k for k in after if k.startswith("eval/")]
    if not keys:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stage '{stage}': held-out metrics")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in keys:
        old = before.get(key)
        table.add_row(key.removeprefix("eval/"), "-" if old is None else f"{old:.4f}", f"{after[key]:.4f}")
    Console(file=sys.stdout).print(table)
