"""One micro-batch through the policy, the reference (only if needed) and the stage's losses.

Training and evaluation share this, so held-out metrics are computed exactly like training ones.
"""

from __future__ import annotations

from typing import Any

import torch

from aligner.logprobs import completion_logprobs
from aligner.protocols import LossInputs


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def compute_losses(model: torch.nn.Module, stage: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weighted total loss of the stage's losses, and their metrics.

    With one loss its metrics keep their names; with several each is prefixed by the loss name
    (``dpo/rewards/margins``) and ``<name>/loss`` is logged too.
    """
    policy = completion_logprobs(model, batch, token_level=stage.needs_token_logps)
    # A reference-free stage never runs a reference forward pass.
    reference = stage.reference.logprobs(batch) if stage.needs_reference else None
    inputs = LossInputs(data_format=stage.data_format, policy=policy, reference=reference, batch=batch)
    total = None
    metrics: dict[str, Any] = {}
    several = len(stage.losses) > 1
    for loss, weight in stage.losses:
        output = loss.compute(inputs)
        term = weight * output.loss
        total = term if total is None else total + term
        prefix = f"{loss.name}/" if several else ""
        if several:
            metrics[f"{loss.name}/loss"] = output.loss.detach()
        metrics.update({prefix + k: v for k, v in output.metrics.items()})
    assert total is not None
    metrics["loss"] = total.detach()
    return total, metrics
