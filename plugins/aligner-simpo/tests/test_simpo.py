"""SimPO against hand-computed values, and trained for real through aligner with no reference pass."""

from __future__ import annotations

import importlib.metadata
import math
from importlib.resources import files

import pytest
import torch
from aligner_simpo import SimPOLoss

import aligner
from aligner.hookspecs import hookimpl
from aligner.plugins import get_registry, reset_plugins, temporary_plugin
from aligner.protocols import PREFERENCE, LossInputs, Options, SequenceLogProbs


def pairs(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens) -> LossInputs:
    """A preference micro-batch: chosen rows first, then rejected rows."""
    logps = torch.tensor([*chosen_logps, *rejected_logps], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([*chosen_tokens, *rejected_tokens])
    return LossInputs(PREFERENCE, SequenceLogProbs(logps, tokens), reference=None, batch={})


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_loss_matches_the_papers_formula_by_hand():
    # chosen: -4 over 4 tokens -> -1 per token; rejected: -6 over 2 tokens -> -3 per token.
    # beta = 2: rewards -2 and -6, margin 4; gamma = 1.5 -> z = 2.5; loss = -log sigmoid(2.5).
    out = SimPOLoss(SimPOLoss.Options(beta=2.0, gamma=1.5)).compute(pairs([-4.0], [-6.0], [4], [2]))
    assert out.loss.item() == pytest.approx(0.078889, abs=1e-6)
    assert out.loss.item() == pytest.approx(-log_sigmoid(2.5), abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-2.0)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-6.0)
    assert out.metrics["rewards/margins"].item() == pytest.approx(4.0)
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_length_normalisation_makes_the_loss_independent_of_length():
    loss = SimPOLoss(SimPOLoss.Options(beta=1.0, gamma=0.5))
    short = loss.compute(pairs([-1.0], [-2.0], [1], [1])).loss.item()
    long = loss.compute(pairs([-100.0], [-200.0], [100], [100])).loss.item()
    assert short == pytest.approx(long)
    # Summed log-probs would give a very different value for the long pair.
    assert short == pytest.approx(-log_sigmoid(1.0 - 0.5))


def test_gamma_is_a_margin_the_rewards_must_exceed():
    # Equal rewards: z = -gamma, so the loss is log(1 + e^gamma); gamma = 0 gives log 2.
    batch = pairs([-2.0], [-2.0], [2], [2])
    assert SimPOLoss(SimPOLoss.Options(gamma=0.0)).compute(batch).loss.item() == pytest.approx(math.log(2))
    assert SimPOLoss(SimPOLoss.Options(gamma=1.0)).compute(batch).loss.item() == pytest.approx(math.log1p(math.e))


def test_label_smoothing_and_averaging_over_pairs():
    # pair 1: per-token -1 vs -2, beta 1 -> margin 1; pair 2: -3 vs -1 -> margin -2. gamma 0.5.
    batch = pairs([-2.0, -3.0], [-4.0, -1.0], [2, 1], [2, 1])
    out = SimPOLoss(SimPOLoss.Options(beta=1.0, gamma=0.5, label_smoothing=0.1)).compute(batch)
    z1, z2 = 0.5, -2.5
    expected = sum(-0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z) for z in (z1, z2)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["rewards/accuracies"].item() == 0.5


def test_gradient_raises_chosen_and_lowers_rejected():
    batch = pairs([-2.0], [-2.0], [2], [4])
    SimPOLoss().compute(batch).loss.backward()
    grad = batch.policy.logps.grad
    assert grad[0] < 0 < grad[1]
    # The longer rejected completion gets half the per-log-prob gradient of the chosen one.
    assert grad[1].item() == pytest.approx(-grad[0].item() / 2)


def test_registered_through_its_entry_point():
    reset_plugins()
    assert importlib.metadata.distribution("aligner-simpo").entry_points.select(group="aligner")
    entry = get_registry("loss").entry("simpo")
    assert entry.obj is SimPOLoss and entry.plugin == "simpo"
    assert SimPOLoss.needs_reference is False


class ExplodingReference:
    """A reference policy that fails if anyone asks it for log-probs."""

    name = "exploding"

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options

    def setup(self, context):
        pass

    def logprobs(self, batch):
        raise AssertionError("a reference pass ran for a reference-free loss")


@hookimpl
def register_reference_policies(register):
    register(ExplodingReference)


def _config(tmp_path, **stage):
    data = files("aligner.quickstart") / "data"
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "tokenizer": "builtin",
        "stages": [{
            "name": "simpo",
            "data": {"train": str(data / "preference_train.jsonl"), "eval": str(data / "preference_eval.jsonl"),
                     "template": "plain", "max_length": 48, "max_rows": 64},
            "losses": [{"name": "simpo", "beta": 2.0, "gamma": 0.5}],
            "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3},
            **stage,
        }],
    }


def test_trains_in_a_real_run_without_any_reference_pass(tmp_path):
    reset_plugins()
    with temporary_plugin(__import__(__name__, fromlist=["_"]), name="exploding-reference"):
        config = _config(tmp_path, reference={"name": "exploding"})
        result = aligner.train(config)
    metrics = result.final_metrics
    assert math.isfinite(metrics["train/loss"])
    assert "eval/rewards/margins" in metrics
    assert (result.final_model_dir / "model.safetensors").exists()
