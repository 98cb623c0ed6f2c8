"""Every hook in aligner/hookspecs.py, exercised by a plugin in a real (tiny) training run.

Two runs per module: one whose plugin implements every lifecycle hook and records the calls, one
whose plugin registers a loss, a reference policy, a judge and a PEFT backend that the stage then
uses. Each test checks one hook; tests/test_hook_reference.py fails if a hook has no test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aligner
from aligner.hookspecs import hookimpl
from aligner.plugins import get_registry, plugin_infos, reset_plugins, temporary_plugin
from aligner.protocols import PREFERENCE, LossOutput, Options, SequenceLogProbs
from tests.conftest import preference_rows, tiny_model, write_jsonl

STEPS = 4


def _config(directory: Path, **stage) -> dict:
    rows = preference_rows(24)
    return {
        "output_dir": str(directory / "run"),
        "seed": 0,
        "model": tiny_model(),
        "tokenizer": "builtin",
        "stages": [{
            "name": "stage",
            "data": {"train": str(write_jsonl(directory / "train.jsonl", rows[:16])),
                     "eval": str(write_jsonl(directory / "eval.jsonl", rows[16:])),
                     "template": "plain", "max_length": 48},
            "losses": [{"name": "dpo"}],
            "train": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 2, "save_every": 2},
            **stage,
        }],
    }


class Recorder:
    """Implements every lifecycle hook; records (hook, step, a copy of what it saw)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    @hookimpl
    def on_run_start(self, run):
        self.calls.append(("on_run_start", {"step": run.step, "total_steps": run.total_steps,
                                            "model": run.model is not None, "stage": run.stage.name}))

    @hookimpl
    def on_step_end(self, run, step, metrics):
        metrics["recorder/step_seen"] = float(step)  # added keys are logged
        self.calls.append(("on_step_end", {"step": step, "run_step": run.step, "metrics": dict(metrics)}))

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        metrics["eval/recorder_seen"] = 1.0
        self.calls.append(("on_evaluate", {"step": step, "metrics": dict(metrics)}))

    @hookimpl
    def on_checkpoint_saved(self, run, step, path):
        self.calls.append(("on_checkpoint_saved", {"step": step, "path": path,
                                                   "complete": (Path(path) / "COMPLETE").exists(),
                                                   "weights": (Path(path) / "model.safetensors").exists()}))

    @hookimpl
    def on_run_end(self, run, metrics):
        self.calls.append(("on_run_end", {"step": run.step, "metrics": dict(metrics),
                                          "final_saved": (run.stage_dir / "final" / "COMPLETE").exists()}))

    def of(self, hook: str) -> list[dict]:
        return [seen for name, seen in self.calls if name == hook]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    reset_plugins()
    directory = tmp_path_factory.mktemp("lifecycle")
    recorder = Recorder()
    with temporary_plugin(recorder, name="recorder"):
        result = aligner.train(_config(directory))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return recorder, result, records


def test_on_run_start_is_called_once_after_setup_before_any_step(lifecycle):
    recorder, _, _ = lifecycle
    assert recorder.calls[0][0] == "on_run_start"
    assert recorder.of("on_run_start") == [{"step": 0, "total_steps": STEPS, "model": True, "stage": "stage"}]


def test_on_step_end_is_called_after_every_step_and_added_metrics_are_logged(lifecycle):
    recorder, _, records = lifecycle
    seen = recorder.of("on_step_end")
    assert [s["step"] for s in seen] == [1, 2, 3, 4]
    assert all(s["run_step"] == s["step"] and "loss" in s["metrics"] and "learning_rate" in s["metrics"] for s in seen)
    train_records = [r for r in records if "loss" in r]
    assert [r["recorder/step_seen"] for r in train_records] == [1.0, 2.0, 3.0, 4.0]


def test_on_evaluate_is_called_at_start_every_n_steps_and_at_end(lifecycle):
    recorder, result, records = lifecycle
    seen = recorder.of("on_evaluate")
    assert [s["step"] for s in seen] == [0, 2, 4]
    assert all(set(s["metrics"]) >= {"eval/loss", "eval/rewards/accuracies"} for s in seen)
    assert [r["step"] for r in records if "eval/recorder_seen" in r] == [0, 2, 4]
    assert result.final_metrics["eval/recorder_seen"] == 1.0


def test_on_checkpoint_saved_is_called_with_a_complete_checkpoint(lifecycle):
    recorder, result, _ = lifecycle
    seen = recorder.of("on_checkpoint_saved")
    assert [s["step"] for s in seen] == [2, 4]
    assert all(s["complete"] and s["weights"] for s in seen)
    assert seen[-1]["path"] == str(result.output_dir / "stage" / "checkpoints" / "step-4")


def test_on_run_end_is_called_last_with_the_final_metrics(lifecycle):
    recorder, result, _ = lifecycle
    assert recorder.calls[-1][0] == "on_run_end"
    (seen,) = recorder.of("on_run_end")
    assert seen["step"] == STEPS and seen["final_saved"]
    assert seen["metrics"] == result.final_metrics
    assert {"train/loss", "eval/loss"} <= set(seen["metrics"])


def test_on_run_failed_is_called_instead_of_on_run_end_and_the_error_still_raised(tmp_path):
    class Failing:
        def __init__(self) -> None:
            self.failed: list[tuple[str, int, BaseException]] = []
            self.ended = 0

        @hookimpl
        def on_step_end(self, run, step, metrics):
            if step == 2:
                raise RuntimeError("plugin gave up at step 2")

        @hookimpl
        def on_run_end(self, run, metrics):
            self.ended += 1

        @hookimpl
        def on_run_failed(self, run, error):
            self.failed.append((run.stage.name, run.step, error))
            raise ValueError("a broken on_run_failed must not hide the run's own error")

    plugin = Failing()
    with temporary_plugin(plugin, name="failing"), pytest.raises(RuntimeError, match="plugin gave up at step 2"):
        aligner.train(_config(tmp_path))
    assert plugin.ended == 0
    assert [(stage, step, str(error)) for stage, step, error in plugin.failed] == [
        ("stage", 2, "plugin gave up at step 2")]


# --- registration hooks -------------------------------------------------------------------------


class ZeroReference:
    """Reference log-probs of zero for every sequence; counts its calls."""

    name = "zero_reference"
    calls = {"setup": 0, "logprobs": 0}

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options

    def setup(self, context):
        assert isinstance(context.policy, torch.nn.Module)
        ZeroReference.calls["setup"] += 1

    def logprobs(self, batch):
        ZeroReference.calls["logprobs"] += 1
        n = batch["input_ids"].shape[0]
        return SequenceLogProbs(torch.zeros(n, device=batch["input_ids"].device), torch.ones(n, dtype=torch.long))


class MarginLoss:
    """``-log sigmoid(scale * (chosen - rejected log-ratio))``: DPO written by a plugin."""

    name = "test_margin"
    data_formats = (PREFERENCE,)
    needs_reference = True
    calls = {"compute": 0, "reference_seen": 0}

    class Options(Options):
        scale: float = 1.0

    def __init__(self, options):
        self.options = options

    def compute(self, inputs):
        MarginLoss.calls["compute"] += 1
        MarginLoss.calls["reference_seen"] += inputs.reference is not None
        chosen, rejected = inputs.policy.pairs()
        ref_chosen, ref_rejected = inputs.reference.pairs()
        margin = (chosen.logps - ref_chosen.logps) - (rejected.logps - ref_rejected.logps)
        return LossOutput(-F.logsigmoid(self.options.scale * margin).mean(), {"test_margin": margin.detach().mean()})


class ConstantJudge:
    """Scores everything ``value``."""

    name = "test_constant"
    calls = {"score": 0}

    class Options(Options):
        value: float = 0.25

    def __init__(self, options):
        self.options = options

    def score(self, prompts, completions):
        ConstantJudge.calls["score"] += 1
        return [self.options.value] * len(completions)


class NormOnly:
    """Trains only the final norm (the tiny model ties lm_head to the embeddings); keeps the model for the test."""

    name = "test_norm_only"
    applied: list = []

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options

    def apply(self, model):
        model.requires_grad_(False)
        model.model.norm.requires_grad_(True)
        NormOnly.applied.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return model


class StepCounter:
    """A callback: adds ``<label>/steps_seen`` to every step's metrics; instances are kept for the test."""

    name = "test_step_counter"
    instances: list = []

    class Options(Options):
        label: str = "counter"

    def __init__(self, options):
        self.options = options
        self.steps = 0
        StepCounter.instances.append(self)

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.steps += 1
        metrics[f"{self.options.label}/steps_seen"] = float(self.steps)


class Registrations:
    @hookimpl
    def register_losses(self, register):
        register(MarginLoss)

    @hookimpl
    def register_callbacks(self, register):
        register(StepCounter)

    @hookimpl
    def register_reference_policies(self, register):
        register(ZeroReference)

    @hookimpl
    def register_judges(self, register):
        register(ConstantJudge)

    @hookimpl
    def register_peft_backends(self, register):
        register(NormOnly)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    reset_plugins()
    directory = tmp_path_factory.mktemp("registration")
    stage = {
        "losses": [{"name": "test_margin", "scale": 0.5}],
        "reference": {"name": "zero_reference"},
        "peft": {"name": "test_norm_only"},
        "eval": {"at_start": False, "generate": {"judge": {"name": "test_constant", "value": 0.75},
                                                 "num_prompts": 4, "max_new_tokens": 4}},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
    }
    config = _config(directory, **stage)
    config["callbacks"] = [{"name": "test_step_counter", "label": "mine"}]
    with temporary_plugin(Registrations(), name="registrations"):
        registries = {kind: get_registry(kind).entry(name).plugin for kind, name in (
            ("loss", "test_margin"), ("reference policy", "zero_reference"), ("judge", "test_constant"),
            ("peft backend", "test_norm_only"), ("callback", "test_step_counter"))}
        result = aligner.train(config)
        # registered for the run only
        assert not [info.name for info in plugin_infos() if info.name.startswith("callbacks[")]
    return registries, result


def test_register_losses_adds_a_loss_the_stage_trains_with(registered):
    registries, result = registered
    assert registries["loss"] == "registrations"
    assert MarginLoss.calls["compute"] >= 2 and MarginLoss.calls["reference_seen"] == MarginLoss.calls["compute"]
    assert "train/test_margin" in result.final_metrics and "eval/test_margin" in result.final_metrics


def test_register_reference_policies_adds_a_reference_the_loop_uses(registered):
    registries, _ = registered
    assert registries["reference policy"] == "registrations"
    assert ZeroReference.calls["setup"] == 1 and ZeroReference.calls["logprobs"] >= 2


def test_register_judges_adds_a_judge_for_generation_eval(registered):
    registries, result = registered
    assert registries["judge"] == "registrations"
    assert ConstantJudge.calls["score"] == 1
    assert result.final_metrics["eval/judge_score"] == 0.75


def test_register_peft_backends_adds_a_backend_that_decides_what_trains(registered):
    registries, _ = registered
    assert registries["peft backend"] == "registrations"
    ((model, before),) = NormOnly.applied
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.norm.weight"}


def test_register_callbacks_adds_a_callback_the_config_switches_on(registered):
    registries, result = registered
    assert registries["callback"] == "registrations"
    (counter,) = StepCounter.instances  # one instance per `callbacks` entry, built with its options
    assert counter.options.label == "mine" and counter.steps == 2
    assert result.final_metrics["train/mine/steps_seen"] == 2.0
