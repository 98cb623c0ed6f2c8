"""ORPO (Hong et al., 2024): reference-free preference optimisation by an odds-ratio term.

With ``l_c``/``l_r`` the per-token *average* log-probs of the chosen/rejected completions (so
``P(y|x) = exp(l)`` is the geometric-mean token probability) and ``odds(y|x) = P / (1 - P)``:

    log_odds = (l_c - l_r) - (log(1 - exp(l_c)) - log(1 - exp(l_r)))
    loss     = NLL(chosen completion tokens) - lambda * mean(log sigmoid(log_odds))

(Eq. 6-7 of the paper; ``lambda`` is called ``beta`` here, as in TRL.) ``log(1 - exp(l))`` is
computed with the two-branch log1mexp (Maechler, 2012), each branch fed only inputs it is exact
for, so that average log-probs at or next to 0 give finite values *and finite gradients*
(the one-``where`` form lets the unused branch's infinite gradient turn into NaN).

Differences from TRL's experimental ORPOTrainer, on purpose: its NLL term also covers the prompt
tokens; the paper (Eq. 6, and its released code's ``labels`` masking) and this loss score the
chosen completion only. The odds-ratio term is identical.

Implicit rewards (logged) are ``beta * l``, as in TRL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.losses.common import preference_metrics
from aligner.protocols import PREFERENCE, LossInputs, LossOutput, Options

_LOG_HALF = -math.log(2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, exact near 0 and for very negative ``x``, with finite gradients.

    ``x`` is clamped just below 0 (at the smallest normal number of its dtype): a completion with
    probability exactly 1 has infinite odds, which no finite loss can represent.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > _LOG_HALF
    # Each branch sees a harmless placeholder where it is not used, so its gradient there is finite.
    near = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, _LOG_HALF))))
    far = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, _LOG_HALF), x)))
    return torch.where(near_zero, near, far)


class ORPOLoss:
    """NLL on the chosen completion plus the weighted odds-ratio preference term."""

    name = "orpo"
    data_formats = (PREFERENCE,)
    needs_reference = False

    class Options(Options):
        """ORPO's knobs."""

        beta: float = Field(0.1, gt=0, description="weight lambda of the odds-ratio term")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """NLL of the chosen completions minus ``beta`` times the mean log-sigmoid of the log odds ratio."""
        beta = self.options.beta
        chosen, rejected = inputs.policy.pairs()
        nll = -chosen.logps.sum() / chosen.num_tokens.sum().clamp(min=1)
        # At least float32: in half precision 1 - exp(l) loses every digit for l near 0.
        dtype = torch.promote_types(chosen.logps.dtype, torch.float32)
        mean_chosen, mean_rejected = chosen.mean_logps().to(dtype), rejected.mean_logps().to(dtype)
        log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
        ratio = F.logsigmoid(log_odds)
        loss = nll - beta * ratio.mean()
        metrics = preference_metrics(inputs, beta * mean_chosen, beta * mean_rejected)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                        "log_odds_chosen": log_odds.detach().mean()})
        return LossOutput(loss, metrics)


@hookimpl
def register_losses(register):
    """Register ORPO."""
    register(ORPOLoss)
