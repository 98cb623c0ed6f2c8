"""The built-in callbacks (aligner/callbacks/) in real tiny runs, from Python and from a config, and their logic by hand."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

import aligner
from aligner.callbacks.early_stopping import EarlyStopping
from aligner.callbacks.extra_metrics import ExtraMetrics
from aligner.plugins import reset_plugins, temporary_plugin
from tests.conftest import preference_rows


def _records(result) -> list[dict]:
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_ends_the_stage_when_eval_loss_stops_improving(make_config, caplog):
    reset_plugins()
    config = make_config("dpo", eval_rows=preference_rows(8), steps=20)
    config["stages"][0]["train"]["eval_every"] = 1
    # No improvement can be as large as min_delta: observations at steps 0, 1, 2 -> stop after step 2.
    with temporary_plugin(EarlyStopping(metric="eval/loss", patience=2, min_delta=1e6), name="early-stopping"), \
            caplog.at_level(logging.INFO, logger="aligner"):
        result = aligner.train(config)
    steps = [r["step"] for r in _records(result) if "loss" in r]
    assert steps == [1, 2]
    state = json.loads((result.final_model_dir / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert "stopped at step 2: eval/loss has not improved" in caplog.text


def test_extra_metrics_adds_logged_metrics_to_steps_and_evaluations(make_config):
    reset_plugins()
    config = make_config("dpo", eval_rows=preference_rows(8), steps=4)
    config["stages"][0]["train"]["eval_every"] = 2
    with temporary_plugin(ExtraMetrics(smoothing=0.5), name="extra-metrics"):
        result = aligner.train(config)
    records = _records(result)
    train = [r for r in records if "loss" in r]
    ema = None
    for record in train:
        ema = record["loss"] if ema is None else 0.5 * ema + 0.5 * record["loss"]
        assert record["loss_ema"] == pytest.approx(ema)
        assert record["elapsed_seconds"] > 0
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert "eval/loss_change" not in evals[0]
    for previous, current in zip(evals, evals[1:], strict=False):
        assert current["eval/loss_change"] == pytest.approx(current["eval/loss"] - previous["eval/loss"])
    assert "eval/loss_change" in result.final_metrics


def _run() -> SimpleNamespace:
    return SimpleNamespace(should_stop=False, stop_reason=None)


def test_early_stopping_target_and_mode_max():
    stopper, run = EarlyStopping(metric="eval/rewards/accuracies", mode="max", target=0.9, patience=100), _run()
    stopper.on_evaluate(run, 0, {"eval/rewards/accuracies": 0.5})
    assert not run.should_stop
    stopper.on_evaluate(run, 10, {"eval/rewards/accuracies": 0.95, "other": 1.0})
    assert run.should_stop and run.stop_reason == "eval/rewards/accuracies = 0.95 reached the target 0.9 at step 10"


def test_early_stopping_patience_counts_only_observations_without_improvement():
    stopper, run = EarlyStopping(metric="loss", patience=2, min_delta=0.1), _run()
    for step, loss in enumerate([1.0, 0.95, 0.8, 0.79]):  # 0.95 and 0.79 are not better by > 0.1
        stopper.on_step_end(run, step, {"loss": loss})
        assert not run.should_stop
    stopper.on_step_end(run, 4, {"eval/loss": 0.1})  # another metric: ignored
    stopper.on_step_end(run, 5, {"loss": 0.75})
    assert run.should_stop and "has not improved on 0.8 for 2 observations (step 5)" in run.stop_reason
    stopper.on_run_start(run)  # a new stage starts afresh
    assert stopper.best is None and stopper.bad_observations == 0


def test_early_stopping_stops_on_a_non_finite_value():
    stopper, run = EarlyStopping(metric="loss"), _run()
    stopper.on_step_end(run, 3, {"loss": math.nan})
    assert run.should_stop and run.stop_reason == "loss is nan at step 3"


def test_callbacks_switched_on_from_the_config(make_config):
    reset_plugins()
    config = make_config("dpo", eval_rows=preference_rows(8), steps=20)
    config["stages"][0]["train"]["eval_every"] = 1
    config["callbacks"] = [{"name": "early_stopping", "metric": "eval/loss", "patience": 2, "min_delta": 1e6},
                           {"name": "extra_metrics", "smoothing": 0.5}]
    result = aligner.train(config)
    train = [r for r in _records(result) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]  # stopped by early_stopping
    assert train[1]["loss_ema"] == pytest.approx(0.5 * train[0]["loss"] + 0.5 * train[1]["loss"])
    # the resolved config written to the run keeps them
    written = (result.output_dir / "config.yaml").read_text()
    assert "early_stopping" in written and "extra_metrics" in written


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "early_stoping"}, r"unknown callback 'early_stoping' at 'callbacks\[0\]'.*did you mean 'early_stopping'"),
    ({"name": "early_stopping", "patiense": 2}, r"callbacks\[0\]\.patiense.*patience"),
    ({"name": "extra_metrics", "smoothing": 1.5}, r"callbacks\[0\]\.smoothing"),
])
def test_a_bad_callback_entry_is_a_config_error_before_anything_is_written(make_config, entry, message):
    from aligner.errors import AlignerError

    config = make_config("dpo", steps=1)
    config["callbacks"] = [entry]
    with pytest.raises(AlignerError, match=message):
        aligner.train(config)
    assert not (Path(config["output_dir"]) / "config.yaml").exists()


def test_a_callback_class_with_no_lifecycle_hook_is_refused_at_registration():
    from aligner.errors import PluginError
    from aligner.hookspecs import hookimpl
    from aligner.plugins import get_registry
    from aligner.protocols import Options as BaseOptions

    class Silent:
        name = "silent"

        class Options(BaseOptions):
            pass

    class Registers:
        @hookimpl
        def register_callbacks(self, register):
            register(Silent)

    reset_plugins()
    with temporary_plugin(Registers(), name="silent-plugin"), \
            pytest.raises(PluginError, match="callback 'silent' which implements none of the lifecycle hooks"):
        get_registry("callback")
    reset_plugins()
