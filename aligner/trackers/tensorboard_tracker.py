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

import logging
from pathlib import Path
from typing import Any

import yaml

from aligner.reporting.model_card import redact
from aligner.trackers.base import StageTracker, hooks_for

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


class TensorBoardTracking(StageTracker):
    """The TensorBoard writer across stages."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker: Any = None

    def enabled(self, run: Any) -> bool:
        """A ``tensorboard`` section in the config."""
        return run.config.tensorboard is not None

    def open(self, run: Any) -> bool:
        """Open the writer and, for a fresh run, log the resolved config."""
        settings = run.config.tensorboard
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
        return True

    def write(self, run: Any, global_step: int, values: dict[str, Any], table: list[dict] | None) -> None:
        """Scalars at the global step, the samples as a markdown table."""
        scalars = {k: s for k, s in ((k, _scalar(v)) for k, v in values.items()) if s is not None}
        # NaN/inf are written as they are: TensorBoard shows them, and a diverging run should look like one.
        self.tracker.log(scalars, step=global_step)
        if table:
            self.tracker.writer.add_text(f"{run.stage.name}/samples", _samples_markdown(table), global_step)
            self.tracker.writer.flush()

    def write_final(self, run: Any, values: dict[str, float]) -> None:
        """Final metrics as scalars at the stage's last step."""
        self.write(run, self.offset + run.step, values, None)

    def close(self, run: Any, error: BaseException | None = None) -> None:
        """Flush and close the writer (also after a failed stage: the events so far stay readable)."""
        self.tracker.finish()
        self.tracker = None


_hooks = hooks_for(TensorBoardTracking())
on_run_start, on_step_end, on_evaluate = _hooks.on_run_start, _hooks.on_step_end, _hooks.on_evaluate
on_run_end, on_run_failed = _hooks.on_run_end, _hooks.on_run_failed
