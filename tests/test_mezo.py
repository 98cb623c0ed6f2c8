"""``mezo``: zeroth-order SPSA training with forward passes only (no gradient ever allocated)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import aligner
from aligner.algorithms import mezo
from aligner.errors import ConfigError
from aligner.plugins import temporary_plugin

from .conftest import sft_rows
from .test_resume import run_interrupted_then_resumed


def _mezo_config(make_config, tmp_path, steps: int, **train: object) -> dict:
    rows = sft_rows(4)
    config = make_config("sft", rows=rows * 4, eval_rows=rows, steps=steps,
                         algorithm={"name": "mezo", "eps": 1e-3})
    config["stages"][0]["train"].update({"learning_rate": 3e-3, "lr_scheduler": "constant", **train})
    return config


class GradientWatch:
    """Checks after every step that no trainable weight has a gradient."""

    def __init__(self):
        self.steps_checked = 0

    @aligner.hookimpl
    def on_step_end(self, run, step, metrics):
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is None for p in trainable), f"a gradient was allocated by step {step}"
        self.steps_checked += 1


def test_no_gradient_is_ever_allocated(make_config, tmp_path, monkeypatch):
    grad_modes = []
    real = mezo.compute_losses

    def recording(model, stage, batch):
        grad_modes.append(torch.is_grad_enabled())
        return real(model, stage, batch)

    monkeypatch.setattr(mezo, "compute_losses", recording)
    watch = GradientWatch()
    config = _mezo_config(make_config, tmp_path, steps=3, weight_decay=0.1)
    with temporary_plugin(watch, "gradient-watch"):
        result = aligner.train(config)
    assert watch.steps_checked == 3
    # 3 steps x 2 passes (L+, L-) x 1 micro-batch, every one without autograd.
    assert len(grad_modes) == 6 and not any(grad_modes)
    assert result.final_metrics["train/projected_grad"] != 0


def test_one_update_equals_a_hand_computed_spsa_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    seed, eps, lr, wd = 1234, 1e-3, 0.05, 0.1

    def loss_fn():
        return torch.nn.functional.mse_loss(model(x), y)

    loss_plus, loss_minus = mezo.spsa_estimate(params, loss_fn, seed, eps)
    projected = float((loss_plus - loss_minus) / (2 * eps))
    mezo.spsa_update(params, [(seed, projected)], lr=lr, weight_decay=wd)

    # By hand: z drawn from the seed, parameter by parameter in order; losses at theta +- eps z.
    generator = torch.Generator().manual_seed(seed)
    z = [torch.randn(t.shape, generator=generator) for t in theta]

    def loss_at(weights):
        with torch.no_grad():
            hidden = torch.tanh(x @ weights[0].T + weights[1])
            return torch.nn.functional.mse_loss(hidden @ weights[2].T + weights[3], y)

    plus = loss_at([t + eps * zi for t, zi in zip(theta, z, strict=True)])
    minus = loss_at([t - eps * zi for t, zi in zip(theta, z, strict=True)])
    assert float(loss_plus) == pytest.approx(float(plus), abs=1e-6)
    assert float(loss_minus) == pytest.approx(float(minus), abs=1e-6)
    grad = float((plus - minus) / (2 * eps))
    for p, t, zi in zip(params, theta, z, strict=True):
        expected = t - lr * (grad * zi + wd * t)
        assert torch.allclose(p.detach(), expected, atol=1e-6, rtol=0)
        assert p.grad is None


def test_several_perturbations_average_their_estimates():
    params = [torch.nn.Parameter(torch.zeros(3))]
    mezo.spsa_update(params, [(1, 2.0), (2, 4.0)], lr=0.5)
    z1 = torch.randn(3, generator=torch.Generator().manual_seed(1))
    z2 = torch.randn(3, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(params[0].detach(), -0.5 * (2.0 * z1 + 4.0 * z2) / 2, atol=1e-7)


def test_a_non_finite_loss_skips_the_update(make_config, tmp_path, monkeypatch):
    calls = []
    real = mezo.compute_losses

    def poisoned(model, stage, batch):
        calls.append(1)
        loss, metrics = real(model, stage, batch)
        # The L- pass of the first step is NaN: that step must change nothing and not count.
        return (loss * float("nan"), metrics) if len(calls) == 2 else (loss, metrics)

    monkeypatch.setattr(mezo, "compute_losses", poisoned)
    config = _mezo_config(make_config, tmp_path, steps=2)
    result = aligner.train(config)
    assert result.final_metrics["train/nonfinite_steps_skipped"] == 1
    assert len(calls) == 6  # the skipped step, then the two counted ones


def test_loss_goes_down_on_repeated_sft_rows(make_config, tmp_path):
    result = aligner.train(_mezo_config(make_config, tmp_path, steps=30))
    records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    # Measured (docs/algorithms/mezo.md): held-out loss 6.517 before, 6.372 after 30 steps.
    assert evals[-1] < evals[0] - 0.05, evals


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(make_config, tmp_path):
    config = _mezo_config(make_config, tmp_path, steps=5, save_every=2, lr_scheduler="cosine", warmup_ratio=0.2,
                          weight_decay=0.01)
    config["stages"][0]["algorithm"]["num_perturbations"] = 2
    config["output_dir"] = str(tmp_path / "straight")
    straight = aligner.train(config)
    config["output_dir"] = str(tmp_path / "resumed")
    resumed = run_interrupted_then_resumed(config, kill_at=3)
    a = load_file(str(straight.final_model_dir / "model.safetensors"))
    b = load_file(str(resumed.final_model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(result):
        records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["projected_grad"]) for r in records if "loss" in r}

    assert losses(straight) == losses(resumed)


@pytest.mark.parametrize(("options", "key"), [({"eps": 0}, "eps"), ({"num_perturbations": 0}, "num_perturbations"),
                                               ({"epsilon": 1e-3}, "epsilon")])
def test_bad_options_are_config_errors_naming_the_key(make_config, tmp_path, options, key):
    config = make_config("sft", rows=sft_rows(4), algorithm={"name": "mezo", **options})
    with pytest.raises(ConfigError, match=key):
        aligner.train(config)


def test_config_error_without_losses(make_config, tmp_path):
    config = make_config("sft", rows=sft_rows(4), algorithm={"name": "mezo"})
    config["stages"][0]["losses"] = []
    with pytest.raises(ConfigError, match="losses"):
        aligner.train(config)
