"""Weights & Biases tracking, as a plugin on the lifecycle hooks.

Active when the config has a ``wandb`` section. One W&B run covers every stage; metrics are logged
as ``STAGE/key`` against a global step (steps of earlier stages added, also after a resume
that loads finished stages; ``aligner.trackers.base``). Mode ``auto`` goes online
only when an API key is available (``WANDB_API_KEY`` or a netrc login) and otherwise writes an
offline run, so a machine without network or login never waits on a prompt. The key itself is
never read into the config, logged, or written by aligner.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aligner.trackers.base import StageTracker, hooks_for

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


class WandbTracker(StageTracker):
    """One W&B run across the stages; ``global_step`` is the x-axis of every metric."""

    def __init__(self) -> None:
        super().__init__()
        self.run: Any = None

    def enabled(self, run: Any) -> bool:
        """A ``wandb`` section in the config."""
        return run.config.wandb is not None

    def open(self, run: Any) -> bool:
        """Start the W&B run (offline without a key; nothing in ``disabled`` mode)."""
        settings = run.config.wandb
        mode = resolve_mode(settings.mode)
        if mode == "disabled":
            return False
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
        return True

    def write(self, run: Any, global_step: int, values: dict[str, Any], table: list[dict] | None) -> None:
        """One W&B row: the values, ``global_step`` and the samples as a ``wandb.Table``."""
        data: dict[str, Any] = {**values, "global_step": global_step}
        if table:
            import wandb

            columns = list(table[0])
            data[f"{run.stage.name}/samples"] = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table])
        self.run.log(data)

    def write_final(self, run: Any, values: dict[str, float]) -> None:
        """Final metrics go to the run's summary."""
        self.run.summary.update(values)

    def close(self, run: Any, error: BaseException | None = None) -> None:
        """Finish the run; after a failure with exit code 130 (SIGINT/SIGTERM) or 1 and the error in the summary."""
        if error is None:
            self.run.finish()
        else:
            from aligner.errors import Interrupted

            self.run.summary.update({"failed_stage": run.stage.name, "error": f"{type(error).__name__}: {error}"[:1000]})
            self.run.finish(exit_code=130 if isinstance(error, Interrupted | KeyboardInterrupt) else 1)
        self.run = None


_hooks = hooks_for(WandbTracker())
on_run_start, on_step_end, on_evaluate = _hooks.on_run_start, _hooks.on_step_end, _hooks.on_evaluate
on_run_end, on_run_failed = _hooks.on_run_end, _hooks.on_run_failed
