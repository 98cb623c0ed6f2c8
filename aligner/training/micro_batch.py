"""One micro-batch through the policy, the reference (only if needed) and the stage's losses.

Training and evaluation share this, so held-out metrics are computed exactly like training ones.
How the model is run depends on the stage's ``forward_kind`` (declared by its losses), looked up in
``FORWARDS``: completion log-probs for language-model losses, scalar scores for reward models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from aligner.data.mismatch import mismatched_batch
from aligner.modeling.logprobs import completion_logprobs
from aligner.modeling.reward_scores import sequence_scores
from aligner.protocols import LossInputs


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def kl_completion_logprobs(model: torch.nn.Module, stage: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Policy and reference log-probs of the batch's mismatched pairs (empty for a one-row batch).

    No gradient flows through them: the KL estimate is a reference point, not a training signal.
    """
    kl_batch = mismatched_batch(batch)
    if kl_batch is None:
        return {}
    with torch.no_grad():
        policy = completion_logprobs(model, kl_batch).detach()
    return {"kl_policy": policy, "kl_reference": stage.reference.logprobs(kl_batch)}


def logprob_inputs(model: torch.nn.Module, stage: Any, batch: dict[str, Any]) -> LossInputs:
    """Completion log-probs of the policy, and of the reference and mismatched pairs when asked for."""
    policy = completion_logprobs(model, batch, token_level=stage.needs_token_logps)
    # A reference-free stage never runs a reference forward pass.
    reference = stage.reference.logprobs(batch) if stage.losses_need_reference else None
    extra = kl_completion_logprobs(model, stage, batch) if stage.needs_kl_completions else {}
    return LossInputs(data_format=stage.data_format, policy=policy, reference=reference, batch=batch, extra=extra)


def reward_inputs(model: torch.nn.Module, stage: Any, batch: dict[str, Any]) -> LossInputs:
    """Scalar scores of a sequence-classification model; no log-probs, no reference."""
    return LossInputs(data_format=stage.data_format, policy=None, reference=None, batch=batch,
                      scores=sequence_scores(model, batch))


# forward kind (a loss's ``forward_kind``) -> how a micro-batch becomes ``LossInputs``
FORWARDS: dict[str, Callable[[torch.nn.Module, Any, dict[str, Any]], LossInputs]] = {
    "logprobs": logprob_inputs,
    "reward": reward_inputs,
}


def compute_losses(model: torch.nn.Module, stage: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weighted total loss of the stage's losses, and their metrics.

    With one loss its metrics keep their names; with several each is prefixed by the loss name
    (``dpo/rewards/margins``) and ``<name>/loss`` is logged too.
    """
    inputs = FORWARDS[stage.forward_kind](model, stage, batch)
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
