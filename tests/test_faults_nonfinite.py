"""Non-finite losses and gradients: skipped and counted, a run that keeps failing stops, bad weights are never saved."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from aligner import hookimpl
from aligner.api import train
from aligner.cli import main
from aligner.losses.sft import SFTLoss
from aligner.plugins import temporary_plugin
from aligner.protocols import PREFERENCE, SFT, LossOutput, Options
from aligner.training.checkpoint_writing import complete_checkpoints, write_atomically
from aligner.training.guards import NonFiniteError, check_finite_weights, describe_rows


class PoisonedSFT(SFTLoss):
    """SFT whose loss (``mode: loss``) or gradient (``mode: grad``) is non-finite on chosen training calls."""

    name = "poisoned_sft"
    data_formats = (SFT, PREFERENCE)

    class Options(Options):
        bad_calls: list[int] = []
        mode: str = "loss"

    def __init__(self, options: Options):
        super().__init__()
        self.bad = set(options.bad_calls)
        self.mode = options.mode
        self.calls = 0

    def compute(self, inputs):
        output = super().compute(inputs)
        if not torch.is_grad_enabled():  # evaluation: leave it alone
            return output
        self.calls += 1
        if self.calls not in self.bad:
            return output
        if self.mode == "loss":
            loss = output.loss * float("nan")
        else:
            # Value unchanged (adds sqrt(0) = 0), but d sqrt(u)/du at u = 0 is infinite.
            logps = inputs.policy.logps
            loss = output.loss + torch.sqrt((logps - logps.detach()).abs().sum())
        return LossOutput(loss=loss, metrics=output.metrics)


class PoisonPlugin:
    @hookimpl
    def register_losses(self, register):
        register(PoisonedSFT)


def _config(make_config, bad_calls, steps, mode="loss", **train):
    config = make_config("sft", steps=steps)
    config["stages"][0]["losses"] = [{"name": "poisoned_sft", "bad_calls": bad_calls, "mode": mode}]
    config["stages"][0]["train"].update(train)
    return config


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_and_counted(make_config, tmp_path, mode, caplog):
    config = _config(make_config, bad_calls=[2], steps=3, mode=mode, save_every=1, max_grad_norm=None)
    with temporary_plugin(PoisonPlugin(), "poison"), caplog.at_level("WARNING", logger="aligner"):
        result = train(config)
    # 4 training calls for 3 updates: the second was skipped.
    assert f"step 2: non-finite {mode if mode == 'loss' else 'gradient'}, update skipped (1 skipped so far)" in caplog.text
    assert "sft_train.jsonl, lines" in caplog.text  # the batch is named by file and lines
    assert result.final_metrics["train/nonfinite_steps_skipped"] == 1
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["stages"]["sft"]["train/nonfinite_steps_skipped"] == 1
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps_skipped"] for r in logged if "loss" in r] == [0, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in logged if "loss" in r)
    assert [p.name for p in complete_checkpoints(result.output_dir / "sft" / "checkpoints")] == ["step-2", "step-3"]
    from safetensors.torch import load_file

    weights = load_file(result.final_model_dir / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(make_config, tmp_path, capsys):
    config = _config(make_config, bad_calls=[3, 4, 5], steps=6, save_every=1, max_nonfinite_steps=3,
                     keep_checkpoints=5)
    path = tmp_path / "poison.yaml"
    path.write_text(yaml.safe_dump(config))
    with temporary_plugin(PoisonPlugin(), "poison"):
        code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    message = [line for line in err.splitlines() if line.startswith("aligner: error:")]
    assert len(message) == 1 and "Traceback" not in err
    assert "3 consecutive steps with a non-finite loss or gradient (train.max_nonfinite_steps=3)" in message[0]
    assert "stopped at step 3 (last update: step 2)" in message[0]
    assert "sft_train.jsonl, lines" in message[0]
    checkpoints = tmp_path / "run" / "sft" / "checkpoints"
    assert f"last good checkpoint: {checkpoints / 'step-2'}" in message[0]
    kept = complete_checkpoints(checkpoints)
    assert [p.name for p in kept] == ["step-1", "step-2"]
    assert (kept[-1] / "optimizer.pt").is_file()
    assert not (tmp_path / "run" / "sft" / "final").exists()


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    model.save_pretrained = lambda *a, **k: pytest.fail("must not write")  # type: ignore[attr-defined]
    with pytest.raises(NonFiniteError, match=r"refusing to write .*step-3: non-finite values in weight"):
        write_atomically(tmp_path / "step-3", model, None, {})
    assert list(tmp_path.iterdir()) == []
    check_finite_weights(torch.nn.Linear(2, 2), "ok")  # finite weights pass


def test_describe_rows_groups_lines_of_one_file():
    assert describe_rows(["a.jsonl, line 3", "a.jsonl, line 9"]) == "a.jsonl, lines 3, 9"
    assert describe_rows(["a.jsonl, line 3", "b.csv, line 2"]) == "a.jsonl, line 3; b.csv, line 2"
    assert describe_rows([f"a.jsonl, line {i}" for i in range(10)]).endswith("6, 7 and 2 more")


def _guard(accelerator):
    from types import SimpleNamespace

    from aligner.training.guards import NonFiniteGuard

    run = SimpleNamespace(accelerator=accelerator, step=4, stage=SimpleNamespace(name="s", train_rows=[]),
                          stage_dir="/nonexistent")
    return NonFiniteGuard(run, max_consecutive=2)


def _parameter(grad_value: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, grad_value, 0.0])
    return p


def test_under_fp16_overflowing_gradients_are_left_to_the_grad_scaler():
    from types import SimpleNamespace

    guard = _guard(SimpleNamespace(scaler=object(), num_processes=1))
    guard.observe(torch.tensor(1.0), {})
    assert guard.step_ok([_parameter(float("inf"))])  # the scaler skips this step itself
    guard.observe(torch.tensor(float("nan")), {})
    assert not guard.step_ok([_parameter(1.0)])  # a NaN loss is still caught


def test_every_process_takes_the_same_decision():
    class TwoProcesses:
        num_processes = 2
        scaler = None

        def reduce(self, flags, reduction):
            assert reduction == "sum"
            return flags + torch.tensor([1.0, 0.0])  # the other process saw a non-finite gradient

    guard = _guard(TwoProcesses())
    guard.observe(torch.tensor(1.0), {"row_ids": torch.tensor([0, 1])})
    assert not guard.step_ok([_parameter(1.0)])
    assert guard.skipped == 1
    guard.observe(torch.tensor(1.0), {})
    with pytest.raises(NonFiniteError, match="2 consecutive steps .* stopped at step 5 .* non-finite gradient"):
        guard.step_ok([_parameter(1.0)])
