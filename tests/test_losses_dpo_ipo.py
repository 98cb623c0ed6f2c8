"""DPO, IPO and SFT loss values against hand computation from their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from aligner.losses.dpo import DPOLoss, IPOLoss
from aligner.losses.sft import SFTLoss
from aligner.protocols import PREFERENCE, SFT, LossInputs, SequenceLogProbs


def preference_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len=(1,), rejected_len=(1,)):
    def seq(chosen, rejected, chosen_n, rejected_n):
        return SequenceLogProbs(torch.tensor([*chosen, *rejected], dtype=torch.float64),
                                torch.tensor([*chosen_n, *rejected_n]))

    return LossInputs(PREFERENCE, seq(policy_chosen, policy_rejected, chosen_len, rejected_len),
                      seq(ref_chosen, ref_rejected, chosen_len, rejected_len), batch={})


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_matches_the_formula():
    # r_c = -1 - (-2) = 1, r_r = -3 - (-2.5) = -0.5; beta = 0.5 -> z = 0.5 * 1.5 = 0.75
    inputs = preference_inputs([-1.0], [-3.0], [-2.0], [-2.5])
    out = DPOLoss(DPOLoss.Options(beta=0.5)).compute(inputs)
    assert out.loss.item() == pytest.approx(-log_sigmoid(0.75), abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.25)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.75)
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_dpo_label_smoothing_mixes_both_directions():
    inputs = preference_inputs([-1.0], [-3.0], [-2.0], [-2.5])
    out = DPOLoss(DPOLoss.Options(beta=0.5, label_smoothing=0.2)).compute(inputs)
    expected = -0.8 * log_sigmoid(0.75) - 0.2 * log_sigmoid(-0.75)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_dpo_with_equal_chosen_and_rejected_is_log_two_with_zero_margin():
    inputs = preference_inputs([-4.0, -1.0], [-4.0, -1.0], [-2.0, -3.0], [-2.0, -3.0])
    out = DPOLoss(DPOLoss.Options(beta=0.1)).compute(inputs)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.metrics["rewards/margins"].item() == 0.0
    assert out.metrics["rewards/accuracies"].item() == 0.0  # ties are not counted as correct (as in TRL)


def test_dpo_averages_over_pairs():
    inputs = preference_inputs([-1.0, -5.0], [-3.0, -1.0], [-2.0, -2.0], [-2.5, -2.0], (1, 1), (1, 1))
    out = DPOLoss(DPOLoss.Options(beta=1.0)).compute(inputs)
    expected = (-log_sigmoid(1.5) - log_sigmoid(-4.0)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["rewards/accuracies"].item() == 0.5


def test_ipo_length_normalised_as_in_trl():
    # r_c = 1 over 4 tokens -> 0.25; r_r = -0.5 over 2 tokens -> -0.25; h = 0.5; beta = 0.25 -> target 2
    inputs = preference_inputs([-1.0], [-3.0], [-2.0], [-2.5], (4,), (2,))
    out = IPOLoss(IPOLoss.Options(beta=0.25)).compute(inputs)
    assert out.loss.item() == pytest.approx((0.5 - 2.0) ** 2)


def test_ipo_unnormalised_is_the_papers_equation():
    inputs = preference_inputs([-1.0], [-3.0], [-2.0], [-2.5], (4,), (2,))
    out = IPOLoss(IPOLoss.Options(beta=0.25, length_normalize=False)).compute(inputs)
    assert out.loss.item() == pytest.approx((1.5 - 2.0) ** 2)


def test_ipo_long_and_short_completions_are_comparable_when_normalised():
    # The same per-token log-ratio gives the same loss whatever the length.
    short = IPOLoss(IPOLoss.Options(beta=0.1)).compute(preference_inputs([-1.0], [-2.0], [-1.5], [-1.5], (1,), (1,)))
    long = IPOLoss(IPOLoss.Options(beta=0.1)).compute(
        preference_inputs([-100.0], [-200.0], [-150.0], [-150.0], (100,), (100,)))
    assert short.loss.item() == pytest.approx(long.loss.item())


def test_sft_is_token_mean_nll_and_uses_only_chosen_on_preference_data():
    sft = SFTLoss()
    plain = LossInputs(SFT, SequenceLogProbs(torch.tensor([-2.0, -6.0]), torch.tensor([1, 3])), None, {})
    assert sft.compute(plain).loss.item() == pytest.approx(8.0 / 4)
    paired = preference_inputs([-2.0], [-100.0], [0.0], [0.0], (4,), (1,))
    assert sft.compute(paired).loss.item() == pytest.approx(0.5)


def test_gradient_of_dpo_pushes_chosen_up_and_rejected_down():
    logps = torch.tensor([-1.0, -1.0], requires_grad=True)
    inputs = LossInputs(PREFERENCE, SequenceLogProbs(logps, torch.tensor([1, 1])),
                        SequenceLogProbs(torch.tensor([-1.0, -1.0]), torch.tensor([1, 1])), {})
    DPOLoss().compute(inputs).loss.backward()
    assert logps.grad[0] < 0 < logps.grad[1]
