"""The shared maths of online RL (``aligner.online``) against values computed by hand.

Every expected number is worked out in the comment next to it, not by re-running the code. Several
"processes" are simulated with threads whose ``all_reduce_sum`` sums a tensor over all of them,
as ``torch.distributed.all_reduce`` does.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from aligner.online import aggregation
from aligner.online.advantages import AdvantageInputs, masked_whiten
from aligner.online.advantages.gae import GAE, gae
from aligner.online.advantages.group_relative import GroupRelative
from aligner.online.advantages.reinforce_pp import ReinforcePP, ReinforcePPBaseline, discounted_returns
from aligner.online.advantages.rloo import RLOO
from aligner.online.aggregation import AGGREGATIONS, aggregate, step_counts, token_weights
from aligner.online.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_per_token
from aligner.online.policy_loss import kl_penalty_loss, policy_gradient_loss

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def run_processes(functions: list[Callable[[Callable[[torch.Tensor], torch.Tensor]], Any]]) -> list[Any]:
    """Run ``functions[i](all_reduce_sum)`` in one thread each, ``all_reduce_sum`` summing over the threads."""
    n = len(functions)
    # A timeout so that a failing "process" breaks the barrier instead of hanging the others.
    barrier = threading.Barrier(n, timeout=10)
    slots: list[torch.Tensor | None] = [None] * n
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def reducer(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor.clone()
            barrier.wait()  # every process has written its tensor
            total = torch.stack([s for s in slots if s is not None]).sum(dim=0)
            barrier.wait()  # every process has read them before any writes the next
            return total
        return all_reduce_sum

    def target(rank: int) -> None:
        try:
            results[rank] = functions[rank](reducer(rank))
        except BaseException as exc:  # re-raised in the main thread, after the others stop
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def inputs(scores: list[float], mask: list[list[int]], groups: list[int], **extra: Any) -> AdvantageInputs:
    """AdvantageInputs from plain lists."""
    return AdvantageInputs(scores=torch.tensor(scores), mask=torch.tensor(mask, dtype=torch.bool),
                           group_ids=torch.tensor(groups), **extra)


# ---------------------------------------------------------------------------------------------
# kl
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    log_ratio = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    # k1 = x
    assert KL_ESTIMATORS["k1"](log_ratio).tolist() == pytest.approx([0.5, -0.5, 0.0])
    # k2 = x^2 / 2 = 0.25 / 2
    assert KL_ESTIMATORS["k2"](log_ratio).tolist() == pytest.approx([0.125, 0.125, 0.0])
    # k3 = e^-x - 1 + x: e^-0.5 = 0.6065307 -> 0.1065307; e^0.5 = 1.6487213 -> 0.1487213
    assert KL_ESTIMATORS["k3"](log_ratio).tolist() == pytest.approx([0.1065307, 0.1487213, 0.0], abs=1e-7)


def test_kl_per_token_masks_before_the_estimator():
    policy = torch.tensor([[0.5, 100.0]])  # the second token is padding with a wild log-prob
    reference = torch.tensor([[0.0, 0.0]])
    mask = torch.tensor([[True, False]])
    # k3 of 0.5 as above; the padding's log-ratio is zeroed before exp(-100) could matter
    assert kl_per_token(policy, reference, mask, "k3").tolist()[0] == pytest.approx([0.1065307, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(policy, reference, mask, "k4")


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.1)
    controller.update(current_kl=50.0, n_steps=1000)
    assert controller.value == 0.1


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12: error = 12/6 - 1 = 1, clipped to 0.2; 0.1 * (1 + 0.2 * 100 / 10000) = 0.1 * 1.002 = 0.1002
    controller.update(current_kl=12.0, n_steps=100)
    assert controller.value == pytest.approx(0.1002)
    # KL 5.4: error = 0.9 - 1 = -0.1; 0.1002 * (1 - 0.1 * 100 / 10000) = 0.1002 * 0.999 = 0.1000998
    controller.update(current_kl=5.4, n_steps=100)
    assert controller.value == pytest.approx(0.1000998)


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------

# Rows of 1, 2 and 3 tokens and an empty row; 100 and 9 mark positions outside the mask.
LOSS = torch.tensor([[1.0, 100.0, 100.0], [2.0, 4.0, 100.0], [3.0, 3.0, 6.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)


def test_step_counts_skip_empty_rows():
    # tokens 1 + 2 + 3 = 6; rows with a token: 3 (the empty row is no sequence)
    assert step_counts([MASK[:2], MASK[2:]]) == aggregation.StepCounts(tokens=6.0, sequences=3.0)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 19 / 6),  # (1 + 2+4 + 3+3+6) / 6 tokens = 19 / 6 = 3.1666667
    ("seq-mean-token-mean", 8 / 3),  # token means 1, 3, 4 -> (1 + 3 + 4) / 3 = 2.6666667
    ("seq-mean-token-sum", 19 / 3),  # token sums 1, 6, 12 -> 19 / 3 = 6.3333333
    ("seq-mean-token-sum-norm", 19 / 12),  # 19 / (3 sequences * norm_length 4) = 1.5833333
])
def test_aggregation_modes_by_hand(mode, expected):
    assert aggregate(LOSS, MASK, mode, norm_length=4).item() == pytest.approx(expected)


def test_aggregation_errors_name_the_problem():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate(LOSS, MASK, "sum")
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(LOSS, MASK, "seq-mean-token-sum-norm")


def test_aggregation_of_a_step_without_tokens_is_zero():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGGREGATIONS:
        assert aggregate(torch.ones(2, 3), empty, mode, norm_length=3).item() == 0.0


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_is_invariant_to_micro_batches_and_processes(mode):
    generator = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 5, generator=generator)
    lengths = torch.tensor([0, 1, 5, 3, 2, 4, 0, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    expected = aggregate(loss, mask, mode, norm_length=5).item()

    def total(rows: range, micro_batches: int, all_reduce_sum=None) -> float:
        chunks = [(loss[list(rows)][i::micro_batches], mask[list(rows)][i::micro_batches])
                  for i in range(micro_batches)]
        counts = step_counts([m for _, m in chunks], all_reduce_sum)
        return sum((token_weights(m, mode, counts, norm_length=5) * lo).sum().item() for lo, m in chunks)

    for micro_batches in (1, 2, 4):
        assert total(range(8), micro_batches) == pytest.approx(expected, abs=1e-6)
    # Two processes of 4 rows, each with 2 micro-batches: their totals add up to the step's loss.
    halves = run_processes([lambda reduce: total(range(4), 2, reduce), lambda reduce: total(range(4, 8), 2, reduce)])
    assert sum(halves) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# policy loss
# ---------------------------------------------------------------------------------------------


def test_token_level_loss_is_the_clipped_surrogate_by_hand():
    ratio = torch.tensor([[1.5, 0.7]])
    advantages = torch.tensor([[2.0, -1.0]])
    logps = ratio.log()
    loss, _ = policy_gradient_loss(logps, torch.zeros_like(logps), advantages, torch.ones(1, 2, dtype=torch.bool))
    # token 0: max(-2 * 1.5, -2 * 1.2) = max(-3, -2.4) = -2.4; token 1: max(0.7, 1 * 0.8) = 0.8
    assert loss.tolist()[0] == pytest.approx([-2.4, 0.8])
    r = torch.exp(logps - torch.zeros_like(logps))
    assert torch.equal(loss, torch.maximum(-advantages * r, -advantages * r.clamp(0.8, 1.2)))


def test_clip_higher_is_asymmetric():
    logps = torch.tensor([[math.log(1.25)]])
    old, advantages, mask = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    # ratio 1.25, A = 1: with clip_high 0.2 the clipped -1.2 beats -1.25
    loss, metrics = policy_gradient_loss(logps, old, advantages, mask, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert metrics["clip_fraction"].item() == 1.0 and metrics["clip_fraction_high"].item() == 1.0
    # with clip_high 0.28 the ratio stays inside [0.8, 1.28]: -1.25, nothing clipped
    loss, metrics = policy_gradient_loss(logps, old, advantages, mask, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25)
    assert metrics["clip_fraction"].item() == 0.0 and metrics["clip_fraction_high"].item() == 0.0


def test_dual_clip_bounds_negative_advantages():
    logps = torch.tensor([[math.log(5.0), math.log(5.0)]])
    old, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    advantages = torch.tensor([[-1.0, 1.0]])
    # A = -1, ratio 5: max(5, 1.2) = 5. A = 1, ratio 5: max(-5, -1.2) = -1.2
    loss, metrics = policy_gradient_loss(logps, old, advantages, mask)
    assert loss.tolist()[0] == pytest.approx([5.0, -1.2])
    assert "dual_clip_fraction" not in metrics
    # dual clip 3: min(5, -(-1) * 3) = 3 for the negative token; the positive one is untouched
    loss, metrics = policy_gradient_loss(logps, old, advantages, mask, dual_clip=3.0)
    assert loss.tolist()[0] == pytest.approx([3.0, -1.2])
    assert metrics["dual_clip_fraction"].item() == pytest.approx(0.5)  # 1 of 2 tokens
    with pytest.raises(ValueError, match="dual_clip"):
        policy_gradient_loss(logps, old, advantages, mask, dual_clip=1.0)


def test_gspo_sequence_ratio():
    # ratios 2 and 0.5, the third position is padding
    logps = torch.tensor([[math.log(2.0), math.log(0.5), 7.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    advantages = torch.ones(1, 3)
    mask = torch.tensor([[True, True, False]])
    loss, metrics = policy_gradient_loss(logps, old, advantages, mask, ratio_level="sequence")
    # sequence ratio exp((ln 2 + ln 0.5) / 2) = exp(0) = 1 -> inside the clip range, loss -1 per token
    assert loss.tolist()[0][:2] == pytest.approx([-1.0, -1.0])
    assert metrics["clip_fraction"].item() == 0.0
    # sum over the 2 tokens = -2 exp(s), s = (l0 + l1) / 2: d/dl_t = -2 * 1 * 1/2 = -1; padding 0
    (loss * mask).sum().backward()
    assert logps.grad.tolist()[0] == pytest.approx([-1.0, -1.0, 0.0])
    # per token the same two tokens would be clipped/unclipped: max(-2, -1.2) = -1.2, max(-0.5, -0.8) = -0.5
    token_loss, _ = policy_gradient_loss(logps.detach(), old, advantages, mask)
    assert token_loss.tolist()[0][:2] == pytest.approx([-1.2, -0.5])


def test_policy_loss_metrics_by_hand():
    # tokens (ratio, A): (2, +1) clipped high; (0.5, -1) clipped low; (0.5, +1) not clipped; 4th is padding
    logps = torch.tensor([[math.log(2.0), math.log(0.5), math.log(0.5), 3.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False]])
    _, metrics = policy_gradient_loss(logps, torch.zeros(1, 4), advantages, mask)
    # (2, +1): max(-2, -1.2) -> clipped; (0.5, -1): max(0.5, 0.8) -> clipped; (0.5, +1): max(-0.5, -0.8) -> not
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["clip_fraction_low"].item() == pytest.approx(1 / 3)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 3)
    # k3 with d = ln 2: 0.5 - 1 + 0.693147 = 0.193147; d = ln 0.5: 2 - 1 - 0.693147 = 0.306853 (twice)
    # mean (0.193147 + 2 * 0.306853) / 3 = 0.806853 / 3 = 0.268951
    assert metrics["approx_kl"].item() == pytest.approx(0.268951, abs=1e-6)


def test_kl_penalty_loss_by_hand():
    logps = torch.tensor([[0.5, 100.0]], requires_grad=True)  # the second position is padding
    mask = torch.tensor([[True, False]])
    loss = kl_penalty_loss(logps, torch.zeros(1, 2), mask, "k3")
    # k3(0.5) = 0.1065307; the padding is 0 and sends back no gradient (d k3/dx = 1 - e^-x = 0.3934693)
    assert loss.tolist()[0] == pytest.approx([0.1065307, 0.0], abs=1e-6)
    loss.sum().backward()
    assert logps.grad.tolist()[0] == pytest.approx([0.3934693, 0.0], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------

# Group 0 has rewards [1, 0, 0, 1] (mean 0.5), group 1 [2, 2] (all equal); row 1 has one token.
GROUPED = dict(scores=[1.0, 0.0, 0.0, 1.0, 2.0, 2.0], mask=[[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 1]],
               groups=[0, 0, 0, 0, 1, 1])


@pytest.mark.parametrize("scale, magnitude", [
    # group 0: deviations +-0.5; unbiased std = sqrt((4 * 0.25) / 3) = 0.5773503 -> 0.5 / 0.5774503 = 0.8658754
    ("group", 0.5 / (3**-0.5 + 1e-4)),
    # batch: rewards [1,0,0,1,2,2], mean 1, squared deviations 0+1+1+0+1+1 = 4, unbiased var 4/5,
    # std 0.8944272 -> 0.5 / 0.8945272 = 0.5589544
    ("batch", 0.5 / (0.8**0.5 + 1e-4)),
    ("none", 0.5),  # Dr. GRPO: just the deviation from the group mean
])
def test_group_relative_by_hand(scale, magnitude):
    estimator = GroupRelative(GroupRelative.Options(scale=scale))
    out = estimator.estimate(inputs(**GROUPED))
    a = magnitude
    # signs follow the rewards; the all-equal group gets 0; row 1's padding position is 0
    expected = [[a, a], [-a, 0.0], [-a, -a], [a, a], [0.0, 0.0], [0.0, 0.0]]
    torch.testing.assert_close(out.advantages, torch.tensor(expected), atol=1e-6, rtol=0)
    assert out.returns is None
    assert out.metrics["advantages/zero_std_groups"].item() == 0.5  # 1 of 2 groups


def test_group_relative_batch_scale_over_processes():
    single = GroupRelative(GroupRelative.Options(scale="batch")).estimate(inputs(**GROUPED))
    # process 0 holds group 0 (rows 0-3), process 1 group 1 (rows 4-5): same global std
    parts = [
        lambda reduce: GroupRelative(GroupRelative.Options(scale="batch")).estimate(
            inputs(GROUPED["scores"][:4], GROUPED["mask"][:4], GROUPED["groups"][:4], all_reduce_sum=reduce)),
        lambda reduce: GroupRelative(GroupRelative.Options(scale="batch")).estimate(
            inputs(GROUPED["scores"][4:], GROUPED["mask"][4:], GROUPED["groups"][4:], all_reduce_sum=reduce)),
    ]
    outs = run_processes(parts)
    assert torch.allclose(torch.cat([o.advantages for o in outs]), single.advantages, atol=1e-6)
    # zero_std_groups is pooled over processes: 1 of 2 groups
    assert outs[0].metrics["advantages/zero_std_groups"].item() == 0.5


def test_rloo_by_hand():
    out = RLOO(RLOO.Options()).estimate(inputs([1.0, 2.0, 3.0], [[1, 1], [1, 0], [1, 1]], [7, 7, 7]))
    # 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5
    torch.testing.assert_close(out.advantages, torch.tensor([[-1.5, -1.5], [0.0, 0.0], [1.5, 1.5]]))
    with pytest.raises(ValueError, match="at least 2 samples per prompt; group 9"):
        RLOO(RLOO.Options()).estimate(inputs([1.0, 2.0, 3.0], [[1], [1], [1]], [7, 7, 9]))


def test_reinforce_pp_by_hand():
    # one prompt position (masked out), then 3 completion tokens; score 1, KL rewards -0.1, -0.2, -0.3
    row = inputs([1.0], [[0, 1, 1, 1]], [0], token_rewards=torch.tensor([[5.0, -0.1, -0.2, -0.3]]))
    # per-token rewards [0, -0.1, -0.2, -0.3 + 1 = 0.7]
    rewards = torch.tensor([[0.0, -0.1, -0.2, 0.7]])
    # gamma 1, from the right: 0.7; 0.7 - 0.2 = 0.5; 0.5 - 0.1 = 0.4; the prompt position is 0
    assert discounted_returns(rewards, row.mask, 1.0).tolist()[0] == pytest.approx([0.0, 0.4, 0.5, 0.7])
    # gamma 0.5: 0.7; -0.2 + 0.35 = 0.15; -0.1 + 0.075 = -0.025
    assert discounted_returns(rewards, row.mask, 0.5).tolist()[0] == pytest.approx([0.0, -0.025, 0.15, 0.7])
    out = ReinforcePP(ReinforcePP.Options()).estimate(row)
    # whitened [0.4, 0.5, 0.7]: mean 1.6/3 = 0.5333333, deviations -0.1333333, -0.0333333, 0.1666667,
    # var (0.0177778 + 0.0011111 + 0.0277778) / 3 = 0.0155556, std 0.1247219
    # -> -1.0690450, -0.2672612, 1.3363062
    assert out.advantages.tolist()[0] == pytest.approx([0.0, -1.069045, -0.2672612, 1.3363062], rel=1e-5)


def test_reinforce_pp_baseline_subtracts_the_group_mean():
    out = ReinforcePPBaseline(ReinforcePPBaseline.Options()).estimate(
        inputs([1.0, 3.0, 5.0], [[1], [1], [1]], [0, 0, 1]))
    # group 0 mean 2 -> scores -1, 1; group 1 (alone) 5 - 5 = 0. Returns = those (one token each).
    # whitened: mean 0, var (1 + 1 + 0) / 3 = 2/3, std 0.8164966 -> -1.2247449, 1.2247449, 0
    assert out.advantages[:, 0].tolist() == pytest.approx([-1.2247449, 1.2247449, 0.0], rel=1e-5)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2: 1 - 0.7 = 0.3; t=1: 0.9*0.7 - 0.6 + 0.45*0.3 = 0.165; t=0: 0.9*0.6 - 0.5 + 0.45*0.165 = 0.11425
    assert advantages.tolist()[0] == pytest.approx([0.11425, 0.165, 0.3])
    # returns = advantages + values
    assert returns.tolist()[0] == pytest.approx([0.61425, 0.765, 1.0])
    # the estimator puts the score (1) on the last token and returns the same, unwhitened
    estimator = GAE(GAE.Options(gamma=0.9, lam=0.5, whiten=False))
    out = estimator.estimate(AdvantageInputs(scores=torch.tensor([1.0]), mask=mask, group_ids=torch.tensor([0]),
                                             values=values))
    assert out.advantages.tolist()[0] == pytest.approx([0.11425, 0.165, 0.3])
    assert out.returns.tolist()[0] == pytest.approx([0.61425, 0.765, 1.0])
    with pytest.raises(ValueError, match="critic values"):
        estimator.estimate(AdvantageInputs(scores=torch.tensor([1.0]), mask=mask, group_ids=torch.tensor([0])))


def test_masked_whiten_over_two_processes_equals_the_concatenation():
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(6, 4, generator=generator) * 3 + 2
    mask = torch.rand(6, 4, generator=generator) > 0.3
    whole = masked_whiten(values, mask)
    halves = run_processes([lambda reduce: masked_whiten(values[:2], mask[:2], reduce),
                            lambda reduce: masked_whiten(values[2:], mask[2:], reduce)])
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)


@pytest.mark.parametrize("estimator", [
    GAE(GAE.Options()), GroupRelative(GroupRelative.Options()), GroupRelative(GroupRelative.Options(scale="batch")),
    RLOO(RLOO.Options()), ReinforcePP(ReinforcePP.Options()), ReinforcePPBaseline(ReinforcePPBaseline.Options()),
])
def test_estimators_handle_empty_completions(estimator):
    # row 1 has no completion token at all; with row 0 it forms a group of 2
    batch = inputs([1.0, 0.5, 2.0, 0.0], [[1, 1], [0, 0], [1, 0], [1, 1]], [0, 0, 1, 1],
                   token_rewards=torch.full((4, 2), -0.1), values=torch.full((4, 2), 0.3))
    out = estimator.estimate(batch)
    assert torch.isfinite(out.advantages).all()
    assert out.advantages[1].tolist() == [0.0, 0.0]
    assert out.advantages[2, 1].item() == 0.0


@pytest.mark.parametrize("module, names", [
    ("gae", ["gae"]), ("group_relative", ["group_relative"]), ("rloo", ["rloo"]),
    ("reinforce_pp", ["reinforce_pp", "reinforce_pp_baseline"]),
])
def test_each_module_registers_its_estimators(module, names):
    registered: list[type] = []
    importlib.import_module(f"aligner.online.advantages.{module}").register_advantage_estimators(registered.append)
    assert [cls.name for cls in registered] == names
    for cls in registered:
        assert isinstance(cls.needs_critic, bool) and cls.Options() is not None
