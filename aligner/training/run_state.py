"""The state of a run that lifecycle hooks see, and what a finished run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.config import RunConfig


@dataclass
class RunState:
    """Live state of the stage being trained; passed to every lifecycle hook as ``run``.

    Hooks may read anything here and set ``should_stop = True`` to end the stage after the current
    step (a checkpoint and the final model are still written).
    """

    config: RunConfig
    output_dir: Path
    stage: Any = None
    model: Any = None
    tokenizer: Any = None
    accelerator: Any = None
    step: int = 0
    total_steps: int = 0
    should_stop: bool = False
    stop_reason: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    last_samples: list[dict[str, Any]] | None = None  # judged generations of the latest evaluation

    @property
    def stage_dir(self) -> Path:
        """Where this stage writes checkpoints, samples and its final model."""
        return self.output_dir / self.stage.name

    @property
    def is_main_process(self) -> bool:
        """Only the main process writes files and logs."""
        return self.accelerator is None or self.accelerator.is_main_process


@dataclass
class RunResult:
    """What ``aligner.train`` returns."""

    output_dir: Path
    final_model_dir: Path
    metrics: dict[str, dict[str, float]]

    @property
    def final_metrics(self) -> dict[str, float]:
        """The last stage's final metrics."""
        return list(self.metrics.values())[-1]
