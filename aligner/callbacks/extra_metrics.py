"""``extra_metrics``: adds metrics to every step and evaluation by mutating the metrics dict.

``on_step_end`` and ``on_evaluate`` receive the very dict that is logged next (to ``metrics.jsonl``,
the console and trackers), so keys added here are logged like built-in ones. Values must be floats.
Switched on from a config (``callbacks: [{name: extra_metrics, smoothing: 0.9}]``) or from Python.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.protocols import Options
from aligner.training.run_state import RunState


class ExtraMetrics:
    """Adds ``loss_ema`` and ``elapsed_seconds`` to each step, and ``eval/loss_change`` to evaluations.

    ``loss_ema`` is an exponential moving average of the step loss: ``ema = s * ema + (1 - s) * loss``,
    starting at the first step's loss (``s`` is ``smoothing``). ``eval/loss_change`` is the change of
    ``eval/loss`` since the stage's previous evaluation.
    """

    name = "extra_metrics"

    class Options(Options):
        """How much to smooth the loss."""

        smoothing: float = Field(0.9, ge=0.0, lt=1.0, description="weight of the previous average")

    def __init__(self, options: Options | None = None, **settings: Any):
        """From ``options`` (how a config builds it) or keyword settings (``ExtraMetrics(smoothing=0.5)``)."""
        o = options if options is not None else self.Options(**settings)
        self.smoothing = o.smoothing
        self.ema: float | None = None
        self.previous_eval_loss: float | None = None
        self.started = time.perf_counter()

    @hookimpl
    def on_run_start(self, run: RunState) -> None:
        """Start every stage afresh."""
        self.ema, self.previous_eval_loss, self.started = None, None, time.perf_counter()

    @hookimpl
    def on_step_end(self, run: RunState, step: int, metrics: dict[str, float]) -> None:
        """Add the smoothed loss and the time since the stage started."""
        loss = float(metrics["loss"])
        self.ema = loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * loss
        metrics["loss_ema"] = self.ema
        metrics["elapsed_seconds"] = time.perf_counter() - self.started

    @hookimpl
    def on_evaluate(self, run: RunState, step: int, metrics: dict[str, float]) -> None:
        """Add how much the held-out loss moved since the previous evaluation."""
        if "eval/loss" not in metrics:
            return
        current = float(metrics["eval/loss"])
        if self.previous_eval_loss is not None:
            metrics["eval/loss_change"] = current - self.previous_eval_loss
        self.previous_eval_loss = current


@hookimpl
def register_callbacks(register):
    """Register ``extra_metrics``."""
    register(ExtraMetrics)
