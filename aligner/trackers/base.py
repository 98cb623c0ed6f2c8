"""What every built-in tracker shares: one tracker across a run's stages, driven by the lifecycle hooks.

A tracker subclass says how to open, write and close its backend; this module gives it the global
step (steps of the earlier stages added, read from their final models so that a resumed run whose
first stages are loaded rather than trained continues the same axis) and the five lifecycle hook
implementations, so a tracker module is its class plus one line: ``hooks_for(MyTracker())``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from aligner.hookspecs import hookimpl


def earlier_steps(run: Any) -> int:
    """The steps of the stages before this one, read from their final models: the global step offset."""
    total = 0
    for stage in run.config.stages[: run.stage.index]:
        try:
            total += int(json.loads((run.output_dir / stage.name / "final" / "trainer_state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no final model to count (cannot happen in a run that reached this stage)
    return total


class StageTracker:
    """A metrics backend kept open across stages; only the main process writes.

    Subclasses implement ``enabled``, ``open``, ``write``, ``write_final`` and ``close``; ``opened``
    says whether ``open`` has run. Metrics are written as ``STAGE/key`` at ``offset + step``.
    """

    def __init__(self) -> None:
        self.opened = False
        self.offset = 0  # global step of the current stage's step 0

    # -- what a backend implements ---------------------------------------------------------------

    def enabled(self, run: Any) -> bool:
        """Whether the run's config asks for this tracker."""
        raise NotImplementedError

    def open(self, run: Any) -> bool:
        """Open the backend on the first stage that runs; return ``False`` to stay off (e.g. disabled)."""
        raise NotImplementedError

    def write(self, run: Any, global_step: int, values: dict[str, Any], table: list[dict] | None) -> None:
        """Write ``values`` (keys already ``STAGE/...``) at ``global_step``, and the samples table if any."""
        raise NotImplementedError

    def write_final(self, run: Any, values: dict[str, float]) -> None:
        """Record a stage's final metrics (keys ``STAGE/final/...``)."""
        raise NotImplementedError

    def close(self, run: Any, error: BaseException | None = None) -> None:
        """Close the backend after the last stage, or marked as failed with ``error``."""
        raise NotImplementedError

    # -- the lifecycle, shared ------------------------------------------------------------------

    def start(self, run: Any) -> None:
        """A stage starts: open the backend once, and set the global step offset for this stage."""
        if not (self.enabled(run) and run.is_main_process):
            return
        self.offset = earlier_steps(run)
        if not self.opened:
            self.opened = bool(self.open(run))

    def log(self, run: Any, step: int, metrics: dict[str, Any], table: list[dict] | None = None) -> None:
        """Write the step's metrics under the stage's name at the global step."""
        if self.opened:
            self.write(run, self.offset + step, {f"{run.stage.name}/{k}": v for k, v in metrics.items()}, table)

    def end_stage(self, run: Any, metrics: dict[str, float]) -> None:
        """Record a stage's final metrics; close after the last stage."""
        if not self.opened:
            return
        self.write_final(run, {f"{run.stage.name}/final/{k}": v for k, v in metrics.items()})
        if run.stage.index == len(run.config.stages) - 1:
            self.close(run)
            self.opened, self.offset = False, 0

    def fail(self, run: Any, error: BaseException) -> None:
        """Close after a failed stage, so what was logged before the failure is kept."""
        if self.opened:
            self.close(run, error)
            self.opened, self.offset = False, 0


def hooks_for(tracker: StageTracker) -> SimpleNamespace:
    """The lifecycle hook implementations that drive ``tracker``: a tracker module assigns them to its
    module-level names (pluggy registers the module)."""

    @hookimpl
    def on_run_start(run):
        """Open the tracker (first stage only) and set the stage's global step offset."""
        tracker.start(run)

    @hookimpl
    def on_step_end(run, step, metrics):
        """Log the step's training metrics."""
        tracker.log(run, step, metrics)

    @hookimpl
    def on_evaluate(run, step, metrics):
        """Log held-out metrics, with the judged samples when there are any."""
        tracker.log(run, step, metrics, table=run.last_samples)

    @hookimpl
    def on_run_end(run, metrics):
        """Record the stage's final metrics; close after the last stage."""
        tracker.end_stage(run, metrics)

    @hookimpl
    def on_run_failed(run, error):
        """Close the tracker marked as failed."""
        tracker.fail(run, error)

    return SimpleNamespace(on_run_start=on_run_start, on_step_end=on_step_end, on_evaluate=on_evaluate,
                           on_run_end=on_run_end, on_run_failed=on_run_failed)
