"""Weights & Biases tracking, as a plugin on the lifecycle hooks.

Active when the config has a ``wandb`` section. One W&B run covers every stage; metrics are logged
as ``STAGE/key`` against a global step (steps of earlier stages added). Mode ``auto`` goes online
only when an API key is available (``WANDB_API_KEY`` or a netrc login) and otherwise writes an
offline run, so a machine without network or login never waits on a prompt. The key itself is
never read into the config, logged, or written by aligner.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aligner.hookspecs import hookimpl

log = logging.getLogger("aligner")


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` with an API key, else ``offline``; ``WANDB_MODE`` wins when set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        found = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        found = None
    return "online" if found else "offline"


class WandbTracker:
    """Holds the W&B run across stages."""

    def __init__(self) -> None:
        self.run: Any = None
        self.offset = 0  # steps of the stages already finished
        self.stage_steps = 0

    def _active(self, run: Any) -> bool:
        return run.config.wandb is not None and run.is_main_process

    def start(self, run: Any) -> None:
        """Open the W&B run on the first stage."""
        if self.run is not None or not self._active(run):
            return
        settings = run.config.wandb
        mode = resolve_mode(settings.mode)
        if mode == "disabled":
            return
        import wandb

        directory = run.output_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, name=settings.name or run.output_dir.name,
            tags=settings.tags, group=settings.group, mode=mode, dir=str(run.output_dir),
            config=run.config.model_dump(mode="json"), reinit="finish_previous",
        )
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        log.info("W&B run %s (%s mode) in %s", self.run.id, mode, directory)

    def log(self, run: Any, step: int, metrics: dict[str, float], table: list[dict] | None = None) -> None:
        """Log ``metrics`` under the stage's name at the global step."""
        if self.run is None:
            return
        data: dict[str, Any] = {f"{run.stage.name}/{k}": v for k, v in metrics.items()}
        data["global_step"] = self.offset + step
        if table:
            import wandb

            columns = list(table[0])
            data[f"{run.stage.name}/samples"] = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table])
        self.run.log(data)
        self.stage_steps = max(self.stage_steps, step)

    def end_stage(self, run: Any, metrics: dict[str, float]) -> None:
        """Record a stage's final metrics in the summary; close the run after the last stage."""
        if self.run is None:
            return
        self.run.summary.update({f"{run.stage.name}/final/{k}": v for k, v in metrics.items()})
        self.offset += self.stage_steps
        self.stage_steps = 0
        if run.stage.index == len(run.config.stages) - 1:
            self.run.finish()
            self.run = None
            self.offset = 0


    def fail(self, run: Any, error: BaseException) -> None:
        """Close the run marked as failed: exit code 130 after SIGINT/SIGTERM, else 1."""
        if self.run is None:
            return
        from aligner.errors import Interrupted

        self.run.summary.update({"failed_stage": run.stage.name, "error": f"{type(error).__name__}: {error}"[:1000]})
        interrupted = isinstance(error, Interrupted | KeyboardInterrupt)
        self.run.finish(exit_code=130 if interrupted else 1)
        self.run = None
        self.offset = self.stage_steps = 0


_tracker = WandbTracker()


@hookimpl
def on_run_start(run):
    """Open the W&B run (first stage only)."""
    _tracker.start(run)


@hookimpl
def on_step_end(run, step, metrics):
    """Log the step's training metrics."""
    _tracker.log(run, step, metrics)


@hookimpl
def on_evaluate(run, step, metrics):
    """Log held-out metrics, with the judged samples as a table when there are any."""
    _tracker.log(run, step, metrics, table=getattr(run, "last_samples", None))


@hookimpl
def on_run_end(run, metrics):
    """Write the stage's final metrics to the summary."""
    _tracker.end_stage(run, metrics)


@hookimpl
def on_run_failed(run, error):
    """Close the W&B run as failed, so the dashboard does not show a crashed run as finished."""
    _tracker.fail(run, error)
