"""TensorBoard tracking through accelerate's tracker integration, as a plugin on the lifecycle hooks.

Active when the config has a ``tensorboard`` section (the config refuses it, with the install hint,
when neither ``tensorboard`` nor ``tensorboardX`` is installed). Like the W&B tracker, one TensorBoard
run covers every stage: scalars are ``STAGE/key`` against a global step (steps of earlier stages
added), held-out metrics ``STAGE/eval/...``. The resolved config is logged once as text (``config``),
the judged samples of each evaluation as a text table (``STAGE/samples``), and each stage's final
metrics as ``STAGE/final/...`` at its last step. Only the main process writes.

accelerate's ``TensorBoardTracker`` is used rather than a ``SummaryWriter`` of our own: it picks
``torch.utils.tensorboard`` or ``tensorboardX``, whichever is installed, and keeps the layout
(``LOG_DIR/NAME/events.out.tfevents.*``) that ``accelerate``-based trainers write.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from aligner.hookspecs import hookimpl
from aligner.reporting.model_card import redact

log = logging.getLogger("aligner")


def _scalar(value: Any) -> float | None:
    """A loggable float, or ``None`` for a value TensorBoard cannot plot (text, ``None``)."""
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return number


def _samples_markdown(table: list[dict[str, Any]], limit: int = 16) -> str:
    """The first ``limit`` judged samples as a markdown table (TensorBoard renders text as markdown)."""
    columns = list(table[0])

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")[:300]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in table[:limit]]
    return "\n".join(lines)


def earlier_steps(run: Any) -> int:
    """The steps of the stages before this one, read from their final models: the global step offset.

    Read from disk rather than counted in memory, so a resumed run whose first stages had already
    finished (they are loaded, not trained) continues the same global step axis.
    """
    total = 0
    for stage in run.config.stages[: run.stage.index]:
        try:
            total += int(json.loads((run.output_dir / stage.name / "final" / "trainer_state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no final model to count (cannot happen in a run that reached this stage)
    return total


class TensorBoardTracking:
    """Holds the TensorBoard writer across stages."""

    def __init__(self) -> None:
        self.tracker: Any = None
        self.offset = 0  # global step of the current stage's step 0

    def start(self, run: Any) -> None:
        """Open the writer (first stage that runs) and, for a fresh run, log the resolved config."""
        settings = run.config.tensorboard
        if settings is None or not run.is_main_process:
            return
        self.offset = earlier_steps(run)
        if self.tracker is not None:
            return
        from accelerate.tracking import TensorBoardTracker

        log_dir = Path(settings.log_dir) if settings.log_dir else run.output_dir / "tensorboard"
        name = settings.name or run.output_dir.name
        tracker = TensorBoardTracker(name, str(log_dir))
        tracker.start()  # accelerate opens the writer here, not in __init__
        self.tracker = tracker
        if run.stage.index == 0 and run.step == 0:
            # Not again on resume: an event at step 0 after later ones makes TensorBoard discard those
            # as orphans of a restart. Four spaces keep the YAML a code block (text renders as markdown).
            config = yaml.safe_dump(redact(run.config.model_dump(mode="json")), sort_keys=False)
            self.tracker.writer.add_text("config", "\n".join("    " + line for line in config.splitlines()), 0)
        log.info("TensorBoard logs in %s", log_dir / name)

    def log(self, run: Any, step: int, metrics: dict[str, Any], table: list[dict] | None = None,
            prefix: str = "") -> None:
        """Write ``metrics`` as ``STAGE/[prefix]key`` scalars at the global step."""
        if self.tracker is None:
            return
        values = {f"{run.stage.name}/{prefix}{k}": v for k, v in metrics.items()}
        scalars = {k: s for k, s in ((k, _scalar(v)) for k, v in values.items()) if s is not None}
        # NaN/inf are written as they are: TensorBoard shows them, and a diverging run should look like one.
        self.tracker.log(scalars, step=self.offset + step)
        if table:
            self.tracker.writer.add_text(f"{run.stage.name}/samples", _samples_markdown(table), self.offset + step)
            self.tracker.writer.flush()

    def end_stage(self, run: Any, metrics: dict[str, float]) -> None:
        """Write a stage's final metrics at its last step; close the writer after the last stage."""
        if self.tracker is None:
            return
        self.log(run, run.step, metrics, prefix="final/")
        if run.stage.index == len(run.config.stages) - 1:
            self.close()

    def close(self) -> None:
        """Flush and close the writer (also after a failed stage: the events so far stay readable)."""
        if self.tracker is not None:
            self.tracker.finish()
        self.tracker = None
        self.offset = 0


_tracking = TensorBoardTracking()


@hookimpl
def on_run_start(run):
    """Open the TensorBoard writer (first stage only)."""
    _tracking.start(run)


@hookimpl
def on_step_end(run, step, metrics):
    """Log the step's training metrics."""
    _tracking.log(run, step, metrics)


@hookimpl
def on_evaluate(run, step, metrics):
    """Log held-out metrics, and the judged samples as text when there are any."""
    _tracking.log(run, step, metrics, table=getattr(run, "last_samples", None))


@hookimpl
def on_run_end(run, metrics):
    """Log the stage's final metrics; close after the last stage."""
    _tracking.end_stage(run, metrics)


@hookimpl
def on_run_failed(run, error):
    """Close the writer so the events logged before the failure are on disk."""
    _tracking.close()
