"""KTO (Ethayarajh et al., 2024): Kahneman-Tversky optimisation on unpaired, labelled completions.

For a completion ``y`` of prompt ``x`` with log-ratio ``r = log pi(y|x) - log ref(y|x)`` and the
reference point ``z0 = max(0, mean over mismatched pairs (x_i, y_j) of log pi(y_j|x_i) - log ref(y_j|x_i))``
(a batch estimate of ``KL(pi || ref)``, no gradient through it):

    desirable   y:  lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable y:  lambda_U * (1 - sigmoid(beta * (z0 - r)))

and the loss is the mean over the batch's completions (Eq. 7-8 of the paper, TRL's ``kto`` loss).
The mismatched pairs are built by rotating completions by one inside the micro-batch:
``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``, as TRL does; the loss asks for them with
``needs_kl_completions`` and ``compute_losses`` passes their policy and reference log-probs in
``LossInputs.extra`` (``kl_policy``/``kl_reference``).

Paired preference data is unpaired on the fly: in a preference micro-batch every chosen completion
is a desirable example and every rejected one an undesirable example. The pairs then also give a
pairwise ``rewards/accuracies`` (implicit reward of chosen > rejected), comparable with DPO's.

A micro-batch with a single row has no mismatched pair: the reference point is then 0 for that
batch (logged once as a warning; ``kl`` is logged as 0). With several processes, ``z0`` is the mean
over every process's mismatched pairs of the step (one all-reduce per micro-batch), as in TRL.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.losses.common import mean_over_processes, preference_metrics
from aligner.protocols import PREFERENCE, UNPAIRED, LossInputs, LossOutput, Options

log = logging.getLogger("aligner")

# Eq. (8) of the paper: lambda_D * n_D / (lambda_U * n_U) should lie in [1, 4/3].
RECOMMENDED_RATIO = (1.0, 4 / 3)
# Warn only when well outside it ("far"), so a 55/45 split with default weights passes silently.
WARN_FACTOR = 1.5


def balance_advice(num_desirable: int, num_undesirable: int, desirable_weight: float,
                   undesirable_weight: float) -> str | None:
    """A warning text when the weighted class ratio is far outside the paper's range, else ``None``."""
    if num_desirable == 0 or num_undesirable == 0:
        only = "desirable" if num_undesirable == 0 else "undesirable"
        return (f"KTO: the training data has only {only} examples ({num_desirable} desirable, {num_undesirable} "
                "undesirable); KTO learns from the contrast of both")
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    low, high = RECOMMENDED_RATIO
    if low / WARN_FACTOR <= ratio <= high * WARN_FACTOR:
        return None
    best_d = (low * undesirable_weight * num_undesirable / num_desirable,
              high * undesirable_weight * num_undesirable / num_desirable)
    best_u = (desirable_weight * num_desirable / (high * num_undesirable),
              desirable_weight * num_desirable / (low * num_undesirable))
    return (f"KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {desirable_weight} * "
            f"{num_desirable} / ({undesirable_weight} * {num_undesirable}) = {ratio:.2f}, far outside the paper's "
            f"recommended [1, 1.33]; set desirable_weight in [{best_d[0]:.2f}, {best_d[1]:.2f}] or "
            f"undesirable_weight in [{best_u[0]:.2f}, {best_u[1]:.2f}] (not both)")


def labels_of(inputs: LossInputs) -> torch.Tensor:
    """Desirable (True) / undesirable (False) per sequence of the micro-batch."""
    if inputs.data_format == PREFERENCE:
        half = inputs.policy.logps.shape[0] // 2
        return torch.arange(2 * half, device=inputs.policy.logps.device) < half
    return inputs.batch["labels"].to(inputs.policy.logps.device)


class KTOLoss:
    """The KTO loss with a batch-estimated KL reference point."""

    name = "kto"
    data_formats = (UNPAIRED, PREFERENCE)
    needs_reference = True
    needs_kl_completions = True

    class Options(Options):
        """KTO's knobs."""

        beta: float = Field(0.1, gt=0, description="sharpness of the value function / KL strength")
        desirable_weight: float = Field(1.0, gt=0, description="lambda_D, weight of desirable examples")
        undesirable_weight: float = Field(1.0, gt=0, description="lambda_U, weight of undesirable examples")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self._warned_single_row = False

    def check_stage(self, stage: Any) -> None:
        """Warn (before training) about class balance and micro-batches too small for the KL estimate."""
        if stage.data_format == UNPAIRED:
            desirable = sum(1 for row in stage.train_rows if row.data["label"])
            undesirable = len(stage.train_rows) - desirable
        else:
            desirable = undesirable = len(stage.train_rows)
        advice = balance_advice(desirable, undesirable, self.options.desirable_weight, self.options.undesirable_weight)
        if advice:
            log.warning("stage '%s': %s", stage.name, advice)
        if stage.config.train.batch_size < 2:
            log.warning("stage '%s': KTO with batch_size 1 has no mismatched prompt/completion pair to estimate the "
                        "KL reference point z0; it is taken as 0 (use batch_size >= 2, ideally >= 8)", stage.name)

    def _reference_point(self, inputs: LossInputs) -> torch.Tensor:
        kl_policy, kl_reference = inputs.extra.get("kl_policy"), inputs.extra.get("kl_reference")
        if kl_policy is None or kl_reference is None:
            if not self._warned_single_row:
                log.warning("KTO: a micro-batch with a single row has no mismatched pair for the KL estimate; "
                            "using z0 = 0 for such batches")
                self._warned_single_row = True
            local, count = torch.zeros((), device=inputs.policy.logps.device), 0
        else:
            differences = (kl_policy.logps - kl_reference.logps).detach()
            local, count = differences.sum(), differences.numel()
        # Under several processes the estimate pools every process's mismatched pairs (TRL gathers
        # it too): one shared reference point, from more samples. Clamped after pooling.
        return mean_over_processes(local, count).clamp(min=0)

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Mean weighted KTO loss over the completions of the micro-batch."""
        if inputs.reference is None:
            raise ValueError("KTO needs reference log-probs but none were computed")
        o = self.options
        labels = labels_of(inputs)
        logratios = inputs.policy.logps - inputs.reference.logps
        z0 = self._reference_point(inputs)
        desirable = o.desirable_weight * (1 - torch.sigmoid(o.beta * (logratios - z0)))
        undesirable = o.undesirable_weight * (1 - torch.sigmoid(o.beta * (z0 - logratios)))
        losses = torch.where(labels, desirable, undesirable)
        rewards = o.beta * logratios.detach()
        metrics: dict[str, Any] = {
            "kl": z0,
            # Share of completions strictly on the side of the reference point their label asks for (a
            # tie is on neither side: at the start, policy = reference, the accuracy is 0, not the
            # share of undesirable rows).
            "rewards/label_accuracy": torch.where(labels, rewards > o.beta * z0, rewards < o.beta * z0).float().mean(),
            "logps/mean": inputs.policy.logps.detach().mean(),
        }
        if inputs.data_format == PREFERENCE:
            half = labels.shape[0] // 2
            metrics.update(preference_metrics(inputs, rewards[:half], rewards[half:]))
        return LossOutput(losses.mean(), metrics)


@hookimpl
def register_losses(register):
    """Register KTO."""
    register(KTOLoss)
