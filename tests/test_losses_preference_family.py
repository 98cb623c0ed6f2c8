"""Hinge, robust DPO, KTO, ORPO and reward-model losses against hand computation from their formulas."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from aligner.data.mismatch import mismatched_batch
from aligner.losses.dpo import DPOLoss
from aligner.losses.dpo_variants import HingeLoss, RobustDPOLoss
from aligner.losses.kto import KTOLoss, balance_advice
from aligner.losses.orpo import ORPOLoss, log1mexp
from aligner.losses.reward_model import RewardModelLoss
from aligner.protocols import PREFERENCE, UNPAIRED, LossInputs, SequenceLogProbs


def seq(logps, num_tokens=None) -> SequenceLogProbs:
    num_tokens = num_tokens or [1] * len(logps)
    return SequenceLogProbs(torch.tensor(logps, dtype=torch.float64), torch.tensor(num_tokens))


def pairs(policy, reference=None, num_tokens=None) -> LossInputs:
    """``policy``/``reference``: [chosen..., rejected...] sums, as a preference batch lays them out."""
    return LossInputs(PREFERENCE, seq(policy, num_tokens), None if reference is None else seq(reference, num_tokens),
                      batch={})


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- hinge and robust DPO -------------------------------------------------------------------------
# r_c = -1 - (-2) = 1, r_r = -3 - (-2.5) = -0.5: gap 1.5
GAP_INPUTS = ([-1.0, -3.0], [-2.0, -2.5])


def test_hinge_is_one_minus_the_scaled_gap_until_the_margin():
    out = HingeLoss(HingeLoss.Options(beta=0.5)).compute(pairs(*GAP_INPUTS))
    assert out.loss.item() == pytest.approx(1 - 0.75)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.75)
    # beta 1: gap 1.5 > margin 1 -> no loss at all
    assert HingeLoss(HingeLoss.Options(beta=1.0)).compute(pairs(*GAP_INPUTS)).loss.item() == 0.0


def test_hinge_with_equal_chosen_and_rejected_is_one():
    out = HingeLoss(HingeLoss.Options(beta=0.1)).compute(pairs([-4.0, -4.0], [-2.0, -2.0]))
    assert out.loss.item() == pytest.approx(1.0)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_robust_dpo_debiases_for_flipped_labels():
    out = RobustDPOLoss(RobustDPOLoss.Options(beta=0.5, label_smoothing=0.2)).compute(pairs(*GAP_INPUTS))
    expected = (-0.8 * log_sigmoid(0.75) + 0.2 * log_sigmoid(-0.75)) / 0.6
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_robust_dpo_without_noise_is_dpo_and_equal_pairs_give_log_two():
    robust = RobustDPOLoss(RobustDPOLoss.Options(beta=0.5, label_smoothing=0.0)).compute(pairs(*GAP_INPUTS))
    dpo = DPOLoss(DPOLoss.Options(beta=0.5)).compute(pairs(*GAP_INPUTS))
    assert robust.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
    equal = RobustDPOLoss(RobustDPOLoss.Options(beta=0.5, label_smoothing=0.3)).compute(pairs([-2.0, -2.0], [-1., -1.]))
    assert equal.loss.item() == pytest.approx(math.log(2))  # (0.7 - 0.3) * log 2 / 0.4


# --- KTO ------------------------------------------------------------------------------------------


def unpaired(policy, reference, labels, kl_policy=None, kl_reference=None) -> LossInputs:
    extra = {} if kl_policy is None else {"kl_policy": seq(kl_policy), "kl_reference": seq(kl_reference)}
    return LossInputs(UNPAIRED, seq(policy), seq(reference), batch={"labels": torch.tensor(labels)}, extra=extra)


def test_kto_matches_the_formula_with_weights_and_the_kl_reference_point():
    # log-ratios [0.5, -1, 0]; mismatched log-ratios [0.5, 0, 1] -> z0 = 0.5; beta 0.5
    inputs = unpaired([-1.0, -2.0, -3.0], [-1.5, -1.0, -3.0], [True, False, True],
                      kl_policy=[-4.0, -5.0, -6.0], kl_reference=[-4.5, -5.0, -7.0])
    out = KTOLoss(KTOLoss.Options(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)).compute(inputs)
    expected = (2 * (1 - sigmoid(0.0)) + (1 - sigmoid(0.5 * (0.5 + 1))) + 2 * (1 - sigmoid(0.5 * (0 - 0.5)))) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(0.5)
    # desirable 0.5 > z0? no (equal); undesirable -1 < 0.5 yes; desirable 0 > 0.5 no
    assert out.metrics["rewards/label_accuracy"].item() == pytest.approx(1 / 3)


def test_kto_label_accuracy_counts_a_tie_as_wrong_for_both_labels():
    # Policy = reference (the start of training): every reward is 0 = beta * z0, a tie. Before the fix
    # the undesirable rows counted as correct, so the "before" value was the share of undesirable rows.
    inputs = unpaired([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [True, False, False],
                      kl_policy=[-4.0, -5.0, -6.0], kl_reference=[-4.0, -5.0, -6.0])
    out = KTOLoss(KTOLoss.Options(beta=0.5)).compute(inputs)
    assert out.metrics["rewards/label_accuracy"].item() == 0.0


def test_kto_clamps_a_negative_kl_estimate_at_zero():
    inputs = unpaired([-1.0, -2.0], [-1.5, -1.0], [True, False], kl_policy=[-6.0, -6.0], kl_reference=[-5.0, -5.0])
    out = KTOLoss(KTOLoss.Options(beta=1.0)).compute(inputs)
    assert out.metrics["kl"].item() == 0.0
    assert out.loss.item() == pytest.approx(((1 - sigmoid(0.5)) + (1 - sigmoid(1.0))) / 2, abs=1e-12)


def test_kto_all_desirable_batch():
    inputs = unpaired([-1.0, -2.0], [-2.0, -2.0], [True, True], kl_policy=[-3.0, -3.0], kl_reference=[-3.2, -3.0])
    out = KTOLoss(KTOLoss.Options(beta=0.1)).compute(inputs)  # z0 = 0.1
    expected = ((1 - sigmoid(0.1 * (1.0 - 0.1))) + (1 - sigmoid(0.1 * (0.0 - 0.1)))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert torch.isfinite(out.loss)


def test_kto_on_a_single_row_uses_zero_kl_and_warns_once(caplog):
    loss = KTOLoss(KTOLoss.Options(beta=1.0))
    with caplog.at_level(logging.WARNING, logger="aligner"):
        first = loss.compute(unpaired([-1.0], [-2.0], [True]))
        loss.compute(unpaired([-1.0], [-2.0], [False]))
    assert first.loss.item() == pytest.approx(1 - sigmoid(1.0))
    assert first.metrics["kl"].item() == 0.0
    warnings = [r.message for r in caplog.records if "KL" in r.message]
    assert len(warnings) == 1 and "single row" in warnings[0]


def test_kto_unpairs_a_preference_batch_and_reports_pairwise_accuracy():
    # chosen log-ratios [1, -1], rejected [-0.5, 0.5]; no KL pairs given -> z0 = 0
    inputs = LossInputs(PREFERENCE, seq([-1.0, -3.0, -3.0, -1.5]), seq([-2.0, -2.0, -2.5, -2.0]), batch={})
    out = KTOLoss(KTOLoss.Options(beta=1.0)).compute(inputs)
    expected = ((1 - sigmoid(1)) + (1 - sigmoid(-1)) + (1 - sigmoid(0.5)) + (1 - sigmoid(-0.5))) / 4
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["rewards/accuracies"].item() == 0.5
    assert out.metrics["rewards/margins"].item() == pytest.approx(((1 + 0.5) + (-1 - 0.5)) / 2)


def test_kto_with_equal_chosen_and_rejected_is_one_half_whatever_the_kl():
    # For one completion in both roles: (1 - sigmoid(b(r - z0))) + (1 - sigmoid(b(z0 - r))) = 1.
    inputs = LossInputs(PREFERENCE, seq([-3.0, -7.0, -3.0, -7.0]), seq([-2.0, -9.0, -2.0, -9.0]), batch={},
                        extra={"kl_policy": seq([-4.0] * 4), "kl_reference": seq([-4.7] * 4)})
    out = KTOLoss(KTOLoss.Options(beta=0.3)).compute(inputs)
    assert out.loss.item() == pytest.approx(0.5)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_kto_saturates_without_overflow_on_very_long_completions():
    # Summed log-ratios of +-400 nats (thousands of tokens): losses go to 0 or lambda, gradients stay finite.
    policy = torch.tensor([-100.0, -900.0, -5.0], dtype=torch.float64, requires_grad=True)
    inputs = LossInputs(UNPAIRED, SequenceLogProbs(policy, torch.tensor([2000, 2000, 3])),
                        seq([-500.0, -500.0, -5.0]), batch={"labels": torch.tensor([True, False, True])},
                        extra={"kl_policy": seq([-1.0, -2.0, -3.0]), "kl_reference": seq([-1.0, -2.0, -3.0])})
    out = KTOLoss(KTOLoss.Options(beta=0.1)).compute(inputs)
    out.loss.backward()
    assert out.loss.item() == pytest.approx((0.0 + 0.0 + 0.5) / 3, abs=1e-12)
    assert torch.isfinite(policy.grad).all()


def test_kto_balance_warning_only_far_from_the_papers_range():
    assert balance_advice(500, 500, 1.0, 1.0) is None
    assert balance_advice(550, 450, 1.0, 1.0) is None
    advice = balance_advice(100, 900, 1.0, 1.0)
    assert advice is not None and "0.11" in advice and "desirable_weight in [9.00, 12.00]" in advice
    assert balance_advice(100, 900, 10.0, 1.0) is None  # the paper's fix: up-weight the rare class
    assert "only desirable" in balance_advice(10, 0, 1.0, 1.0)


def test_mismatched_batch_rotates_completions_by_one():
    # prompts [7], [8, 8], [9]; completions [1, 1], [2], [3, 3, 3] (right padded with 0)
    batch = {
        "input_ids": torch.tensor([[7, 1, 1, 0], [8, 8, 2, 0], [9, 3, 3, 3]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
        "completion_mask": torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0], [0, 1, 1, 1]]),
        "prompt_lengths": torch.tensor([1, 2, 1]),
        "row_ids": torch.tensor([0, 1, 2]),
    }
    kl = mismatched_batch(batch)
    assert kl["input_ids"].tolist() == [[7, 3, 3, 3], [8, 8, 1, 1], [9, 2, 0, 0]]
    assert kl["completion_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert kl["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert kl["prompt_lengths"].tolist() == [1, 2, 1]
    one_pair = {k: v[:2] for k, v in batch.items()} | {"row_ids": torch.tensor([0])}
    assert mismatched_batch(one_pair) is None  # a single preference pair: nothing mismatched


# --- ORPO -----------------------------------------------------------------------------------------


def orpo_expected(beta, chosen_sum, chosen_n, rejected_sum, rejected_n):
    lc, lr = chosen_sum / chosen_n, rejected_sum / rejected_n
    log_odds = (lc - lr) - (math.log(-math.expm1(lc)) - math.log(-math.expm1(lr)))
    return -chosen_sum / chosen_n - beta * log_sigmoid(log_odds)


def test_orpo_matches_the_formula():
    inputs = pairs([-1.0, -6.0], num_tokens=[2, 3])  # mean log-probs -0.5 and -2
    out = ORPOLoss(ORPOLoss.Options(beta=0.25)).compute(inputs)
    assert out.loss.item() == pytest.approx(orpo_expected(0.25, -1.0, 2, -6.0, 3), abs=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(0.5)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.25 * -0.5)
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_orpo_with_equal_chosen_and_rejected_has_zero_log_odds():
    out = ORPOLoss(ORPOLoss.Options(beta=0.1)).compute(pairs([-2.0, -2.0], num_tokens=[4, 4]))
    assert out.metrics["log_odds_chosen"].item() == 0.0
    assert out.loss.item() == pytest.approx(0.5 + 0.1 * math.log(2))


def test_orpo_normalises_by_length_so_long_and_short_completions_compare_per_token():
    # chosen: 100 tokens averaging -0.5; rejected: 2 tokens averaging -1 -> the chosen is preferred per token
    out = ORPOLoss(ORPOLoss.Options(beta=1.0)).compute(pairs([-50.0, -2.0], num_tokens=[100, 2]))
    assert out.metrics["log_odds_chosen"].item() > 0
    assert out.loss.item() == pytest.approx(orpo_expected(1.0, -50.0, 100, -2.0, 2), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_is_finite_with_gradients_for_log_probs_near_zero(dtype):
    logps = torch.tensor([-1e-9, 0.0, -1e-30, -3.0], dtype=dtype, requires_grad=True)
    num_tokens = torch.tensor([1, 1, 1, 1])
    # pair 0: chosen -1e-9 vs rejected -1e-30; pair 1: chosen 0 vs rejected -3
    inputs = LossInputs(PREFERENCE, SequenceLogProbs(torch.stack([logps[0], logps[1], logps[2], logps[3]]),
                                                     num_tokens), None, batch={})
    out = ORPOLoss(ORPOLoss.Options(beta=0.1)).compute(inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logps.grad).all()
    if dtype == torch.float64:
        # exact values where they are representable: log(1 - exp(-1e-9)) = log(1e-9) to 1e-9 relative
        assert log1mexp(torch.tensor([-1e-9], dtype=dtype)).item() == pytest.approx(math.log(1e-9), rel=1e-8)
        assert log1mexp(torch.tensor([-50.0], dtype=dtype)).item() == pytest.approx(-math.exp(-50), rel=1e-9)
        assert log1mexp(torch.tensor([-0.5], dtype=dtype)).item() == pytest.approx(math.log(1 - math.exp(-0.5)))


# --- reward model ---------------------------------------------------------------------------------


def scored(scores, margin=None) -> LossInputs:
    batch = {} if margin is None else {"margin": torch.tensor(margin)}
    return LossInputs(PREFERENCE, None, None, batch=batch, scores=torch.tensor(scores, dtype=torch.float64))


def test_reward_model_bradley_terry_loss_and_accuracy():
    out = RewardModelLoss().compute(scored([2.0, 0.5, 1.0, 1.0]))  # chosen [2, 0.5], rejected [1, 1]
    assert out.loss.item() == pytest.approx((-log_sigmoid(1.0) - log_sigmoid(-0.5)) / 2, abs=1e-12)
    assert out.metrics["accuracy"].item() == 0.5
    assert out.metrics["margin"].item() == pytest.approx(0.25)


def test_reward_model_margin_and_centring():
    options = RewardModelLoss.Options(center_rewards_coefficient=0.1)
    out = RewardModelLoss(options).compute(scored([2.0, 0.5, 1.0, 1.0], margin=[0.5, 0.0]))
    expected = (-log_sigmoid(0.5) - log_sigmoid(-0.5)) / 2 + 0.1 * (3.0 ** 2 + 1.5 ** 2) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    ignored = RewardModelLoss(RewardModelLoss.Options(use_margin=False)).compute(scored([2.0, 1.0], margin=[5.0]))
    assert ignored.loss.item() == pytest.approx(-log_sigmoid(1.0), abs=1e-12)


def test_reward_model_with_equal_scores_is_log_two():
    out = RewardModelLoss().compute(scored([0.3, 0.3]))
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.metrics["accuracy"].item() == 0.0


def _spawn_two(target, store: str, results) -> None:
    """Run ``target(rank, store, results)`` in two spawned processes; a hang fails instead of stalling."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(target, args=(store, results), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError("the two gloo processes did not finish within 180 s")


def _kto_reference_point_in_process(rank: int, store: str, results) -> None:
    """One of two gloo processes: a KTO loss on this process's own mismatched pairs."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # mismatched log-ratios: process 0 [1, 2] (alone: z0 = 1.5), process 1 [-3]; pooled (1 + 2 - 3) / 3 = 0
        kl = ([-1.0, -2.0], [-2.0, -4.0]) if rank == 0 else ([-1.0], [2.0])
        inputs = unpaired([-1.0] * len(kl[0]), [-1.0] * len(kl[0]), [True] * len(kl[0]),
                          kl_policy=kl[0], kl_reference=kl[1])
        out = KTOLoss(KTOLoss.Options(beta=1.0)).compute(inputs)
        results[rank] = out.metrics["kl"].item()
    finally:
        dist.destroy_process_group()


def test_kto_reference_point_pools_the_mismatched_pairs_of_every_process(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        _spawn_two(_kto_reference_point_in_process, str(tmp_path / "store"), results)
        assert dict(results) == {0: 0.0, 1: 0.0}  # one shared z0: (1 + 2 - 3) / 3, not 1.5 on process 0


def test_kto_reference_point_weighs_every_pair_of_every_process_equally(tmp_path):
    """Alone, process 0 would use 1.5; pooled with a process whose 2 pairs average 0.5: 1.0."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        _spawn_two(_kto_positive_in_process, str(tmp_path / "store"), results)
        assert dict(results) == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}


def _kto_positive_in_process(rank: int, store: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        kl = ([-1.0, -2.0], [-2.0, -4.0]) if rank == 0 else ([-1.0, -1.0], [-1.5, -1.5])  # means 1.5 and 0.5
        inputs = unpaired([-1.0, -1.0], [-1.0, -1.0], [True, False], kl_policy=kl[0], kl_reference=kl[1])
        results[rank] = KTOLoss(KTOLoss.Options(beta=1.0)).compute(inputs).metrics["kl"].item()
    finally:
        dist.destroy_process_group()
