"""``early_stopping``: ends a stage when a metric stops improving or reaches a target.

Switched on from a config (``callbacks: [{name: early_stopping, metric: eval/loss, patience: 2}]``)
or registered from Python (``register_plugin(EarlyStopping(patience=2))``). It also shows the stop
mechanism of lifecycle hooks: a hook sets ``run.should_stop`` (and, for the log, ``run.stop_reason``);
the loop finishes the current step, then runs the final evaluation and save.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.protocols import Options
from aligner.training.run_state import RunState


class EarlyStopping:
    """Watch ``metric`` (a training metric such as ``loss`` or a held-out one such as ``eval/loss``).

    Stops when it has not improved by more than ``min_delta`` for ``patience`` observations in a row,
    or as soon as it reaches ``target`` (``<=`` for ``mode="min"``, ``>=`` for ``"max"``).
    A non-finite value stops at once. State is reset at the start of every stage.
    """

    name = "early_stopping"

    class Options(Options):
        """Which metric to watch and when to stop."""

        metric: str = Field("eval/loss", description="a logged metric: 'loss', 'eval/loss', 'eval/rewards/accuracies'")
        mode: Literal["min", "max"] = Field("min", description="whether lower or higher is better")
        patience: int = Field(3, gt=0, description="observations without improvement before stopping")
        min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")
        target: float | None = Field(None, description="stop as soon as the metric reaches this value")

    def __init__(self, options: Options | None = None, **settings: Any):
        """From ``options`` (how a config builds it) or keyword settings (``EarlyStopping(patience=2)``)."""
        o = options if options is not None else self.Options(**settings)
        self.metric, self.mode, self.patience, self.min_delta, self.target = (
            o.metric, o.mode, o.patience, o.min_delta, o.target)
        self.best: float | None = None
        self.bad_observations = 0

    @hookimpl
    def on_run_start(self, run: RunState) -> None:
        """Forget the previous stage's best value."""
        self.best, self.bad_observations = None, 0

    @hookimpl
    def on_step_end(self, run: RunState, step: int, metrics: dict[str, float]) -> None:
        """Watch training metrics."""
        self._observe(run, step, metrics)

    @hookimpl
    def on_evaluate(self, run: RunState, step: int, metrics: dict[str, float]) -> None:
        """Watch held-out metrics."""
        self._observe(run, step, metrics)

    def _better(self, value: float, than: float, by: float) -> bool:
        return value < than - by if self.mode == "min" else value > than + by

    def _stop(self, run: RunState, reason: str) -> None:
        if not run.should_stop:
            run.should_stop, run.stop_reason = True, reason

    def _observe(self, run: RunState, step: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            self._stop(run, f"{self.metric} is {value} at step {step}")
            return
        if self.target is not None and not self._better(self.target, value, 0.0):
            self._stop(run, f"{self.metric} = {value:.4g} reached the target {self.target:g} at step {step}")
            return
        if self.best is None or self._better(value, self.best, self.min_delta):
            self.best, self.bad_observations = value, 0
            return
        self.bad_observations += 1
        if self.bad_observations >= self.patience:
            self._stop(run, f"{self.metric} has not improved on {self.best:.4g} for {self.patience} "
                            f"observations (step {step})")


@hookimpl
def register_callbacks(register):
    """Register ``early_stopping``."""
    register(EarlyStopping)
