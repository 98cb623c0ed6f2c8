"""Checkpoints and exact resume: an interrupted-and-resumed run equals an uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import aligner
from aligner.errors import ConfigError, Interrupted
from aligner.plugins import temporary_plugin
from aligner.training.checkpoint_manifest import MARKER

from .conftest import preference_rows, sft_rows, write_jsonl


class KillAt:
    """Sends this process a real SIGTERM at the end of a given step."""

    def __init__(self, step: int):
        self.step = step

    @aligner.hookimpl
    def on_step_end(self, run, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def final_weights(result):
    return load_file(str(result.final_model_dir / "model.safetensors"))


def run_interrupted_then_resumed(config, kill_at):
    with temporary_plugin(KillAt(kill_at), "killer"):
        with pytest.raises(Interrupted, match=f"stopped by signal SIGTERM at step {kill_at}.*--resume"):
            aligner.train(config)
    return aligner.train(config, resume=True)


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(make_config, tmp_path, loss):
    rows = sft_rows(24) if loss == "sft" else preference_rows(24)
    # 24 rows / batch 4 = 6 micro-batches per epoch; 2 per step; 7 steps cross an epoch boundary.
    train = {"max_steps": 7, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
             "save_every": 2, "lr_scheduler": "cosine", "warmup_ratio": 0.2}
    config = make_config(loss, rows=rows, train=train)
    config["output_dir"] = str(tmp_path / "straight")
    straight = aligner.train(config)
    config["output_dir"] = str(tmp_path / "resumed")
    resumed = run_interrupted_then_resumed(config, kill_at=3)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"

    def losses(result):
        records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert losses(straight) == losses(resumed)  # every step logged once, same values
    # The checkpoint written on SIGTERM (step 3) and the regular ones (2, 4, 6) exist; keep_checkpoints=2.
    kept = sorted(p.name for p in (resumed.output_dir / loss / "checkpoints").iterdir())
    assert kept == ["step-4", "step-6"]


def test_half_written_checkpoint_is_ignored_and_the_previous_one_used(make_config, tmp_path):
    config = make_config("sft", rows=sft_rows(16), train={"max_steps": 4, "batch_size": 4, "save_every": 2,
                                                          "learning_rate": 1e-3})
    straight_dir = tmp_path / "straight"
    config["output_dir"] = str(straight_dir)
    straight = aligner.train(config)
    config["output_dir"] = str(tmp_path / "crashed")
    with temporary_plugin(KillAt(2), "killer"), pytest.raises(Interrupted):
        aligner.train(config)
    checkpoints = tmp_path / "crashed" / "sft" / "checkpoints"
    # A crash while writing step 3's checkpoint: a directory with weights but no completion marker.
    broken = checkpoints / "step-3"
    shutil.copytree(checkpoints / "step-2", broken)
    (broken / MARKER).unlink()
    (broken / "model.safetensors").write_bytes(b"truncated")
    resumed = aligner.train(config, resume=True)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_stages_are_loaded_not_retrained_on_resume(make_config, tmp_path):
    config = make_config("dpo", rows=preference_rows(16), train={"max_steps": 4, "batch_size": 4, "save_every": 2,
                                                                 "learning_rate": 1e-3})
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    config["stages"].insert(0, {"name": "sft", "data": {"train": str(sft_data), "template": "plain"},
                                "losses": [{"name": "sft"}], "train": {"max_steps": 2, "batch_size": 4}})
    config["output_dir"] = str(tmp_path / "straight")
    straight = aligner.train(config)
    config["output_dir"] = str(tmp_path / "resumed")

    class KillInDPO:
        @aligner.hookimpl
        def on_step_end(self, run, step, metrics):
            if run.stage.name == "dpo" and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    with temporary_plugin(KillInDPO(), "killer"), pytest.raises(Interrupted):
        aligner.train(config)
    sft_steps = []

    class Watch:
        @aligner.hookimpl
        def on_step_end(self, run, step, metrics):
            sft_steps.append((run.stage.name, step))

    with temporary_plugin(Watch(), "watch"):
        resumed = aligner.train(config, resume=True)
    assert sft_steps == [("dpo", 3), ("dpo", 4)]
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_earlier_run_is_never_silently_replaced(make_config):
    config = make_config("sft", steps=1)
    aligner.train(config)
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        aligner.train(config)
    aligner.train(config, overwrite=True)


def test_final_model_has_a_model_card_and_loads_with_transformers(make_config):
    from transformers import AutoModelForCausalLM

    result = aligner.train(make_config("dpo", steps=1, eval_rows=preference_rows(4)))
    card = (result.final_model_dir / "README.md").read_text()
    assert "dpo (weight 1)" in card and "built-in tiny Llama" in card and "eval/rewards/accuracies" in card
    assert AutoModelForCausalLM.from_pretrained(result.final_model_dir).config.model_type == "llama"


def test_ppo_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    from .test_ppo import _ppo_config

    config = _ppo_config(tmp_path, steps=4)
    config["stages"][0]["train"]["save_every"] = 2
    config["output_dir"] = str(tmp_path / "straight")
    straight = aligner.train(config)
    config["output_dir"] = str(tmp_path / "resumed")
    resumed = run_interrupted_then_resumed(config, kill_at=3)
    for name in ("model.safetensors", "value_head.safetensors"):
        a = load_file(str(straight.final_model_dir / name))
        b = load_file(str(resumed.final_model_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((resumed.output_dir / "ppo" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["algorithm"]["kl_coef"] == pytest.approx(straight.final_metrics["train/kl_coef"], rel=0.1)
