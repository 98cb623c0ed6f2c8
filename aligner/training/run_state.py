"""The state of a run that lifecycle hooks see, and what a finished run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aligner.config import RunConfig

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from aligner.training.stages import PreparedStage


@dataclass
class RunState:
    """Live state of the stage being trained; passed to every lifecycle hook as ``run``.

    Hooks may read anything here and set ``should_stop = True`` to end the stage after the current
    step (a checkpoint and the final model are still written).

    - ``config``: the resolved run config; ``output_dir``: the run directory.
    - ``stage``: the prepared stage being trained (its config, plugins, rows and tokenized data).
    - ``model``: the module being trained, as the stage's algorithm set it up: the PEFT-wrapped policy,
      under several processes inside accelerate's wrapper; for PPO a policy + value-head wrapper whose
      parameter names carry a ``policy.`` prefix (``aligner.online.critic.PolicyWithValueHead``); ``None``
      before setup.
    - ``tokenizer``: the run's tokenizer; ``accelerator``: the accelerate ``Accelerator``.
    - ``step``/``total_steps``: optimizer steps done in this stage and planned for it.
    - ``should_stop``/``stop_reason``: set by a hook to end the stage after the current step.
    - ``history``: every step's metrics so far; ``last_samples``: the judged generations of the latest
      evaluation (``None`` without ``eval.generate``).
    """

    config: RunConfig
    output_dir: Path
    stage: PreparedStage | None = None
    model: torch.nn.Module | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    accelerator: Accelerator | None = None
    step: int = 0
    total_steps: int = 0
    should_stop: bool = False
    stop_reason: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    last_samples: list[dict[str, Any]] | None = None

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
