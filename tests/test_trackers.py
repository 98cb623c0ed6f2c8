"""TensorBoard tracking: refused at config time without the package; a run's event files hold its scalars."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import aligner
from aligner.config import load_config
from aligner.errors import ConfigError

from .conftest import preference_rows, sft_rows, tiny_model, write_jsonl

WRITER_INSTALLED = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def _two_stage_config(tmp_path: Path, **top: object) -> dict:
    """SFT (2 steps) then DPO (3 steps, evaluated before and after): global steps 1-2, then 3-5."""
    data = {"template": "plain", "max_length": 48}
    return {
        "output_dir": str(tmp_path / "run"),
        "model": tiny_model(),
        "tokenizer": "builtin",
        **top,
        "stages": [
            {"name": "sft", "data": {**data, "train": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows()))},
             "losses": [{"name": "sft"}], "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3}},
            {"name": "dpo", "data": {**data, "train": str(write_jsonl(tmp_path / "pref.jsonl", preference_rows())),
                                     "eval": str(write_jsonl(tmp_path / "eval.jsonl", preference_rows(4)))},
             "losses": [{"name": "dpo"}], "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3}},
        ],
    }


def test_tensorboard_is_refused_at_config_time_without_the_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def without_tensorboard(name, *args):
        return None if name in ("tensorboard", "tensorboardX") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_tensorboard)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(_two_stage_config(tmp_path, tensorboard={})))  # JSON is YAML: lines to point at
    with pytest.raises(ConfigError, match=r"'tensorboard' \(.*run.yaml, line \d+\).*pip install tensorboard"):
        load_config(path)


def test_tensorboard_section_rejects_unknown_keys(tmp_path):
    if not WRITER_INSTALLED:
        pytest.skip("the install check comes first without tensorboard")
    with pytest.raises(ConfigError, match=r"unknown key 'tensorboard.logdir'.*did you mean 'log_dir'"):
        load_config(_two_stage_config(tmp_path, tensorboard={"logdir": "x"}))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="writing needs tensorboard (pip install tensorboard), and so does reading the events back")
def test_a_run_writes_event_files_with_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = aligner.train(_two_stage_config(tmp_path, tensorboard={}))
    runs = list((result.output_dir / "tensorboard").iterdir())
    assert [p.name for p in runs] == ["run"]  # default name: the output directory's
    assert list(runs[0].glob("events.out.tfevents.*"))
    events = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in logged if r["stage"] == "sft" and "loss" in r]
    # Stages share one global step: DPO's steps follow SFT's; its evaluations are at its start and end.
    assert scalars("sft/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in sft]
    assert [s for s, _ in scalars("dpo/loss")] == [3, 4, 5]
    assert scalars("dpo/loss")[0][1] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at its first step
    assert [s for s, _ in scalars("dpo/eval/rewards/accuracies")] == [2, 5]
    final = json.loads((result.final_model_dir / "trainer_state.json").read_text())["metrics"]
    assert scalars("dpo/final/train/loss") == [(5, pytest.approx(final["train/loss"], rel=1e-6))]
    assert "config" in "".join(events.Tags()["tensors"])  # the resolved config, as text


@pytest.mark.skipif(not WRITER_INSTALLED, reason="needs tensorboard (pip install tensorboard)")
def test_log_dir_and_name_are_settings_and_a_failed_run_keeps_its_events(tmp_path):
    from aligner.hookspecs import hookimpl
    from aligner.plugins import temporary_plugin

    class GiveUp:
        @hookimpl
        def on_step_end(self, run, step, metrics):
            if run.stage.name == "dpo" and step == 2:
                raise RuntimeError("gave up")

    config = _two_stage_config(tmp_path, tensorboard={"log_dir": str(tmp_path / "tb"), "name": "trial-1"})
    with temporary_plugin(GiveUp(), name="give-up"), pytest.raises(RuntimeError, match="gave up"):
        aligner.train(config)
    files = list((tmp_path / "tb" / "trial-1").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    # The next run in the same process starts a fresh writer at global step 1 (no stale offset).
    config["output_dir"] = str(tmp_path / "again")
    config["tensorboard"]["name"] = "trial-2"
    aligner.train(config)
    assert list((tmp_path / "tb" / "trial-2").glob("events.out.tfevents.*"))
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb" / "trial-2"))
        events.Reload()
        assert [e.step for e in events.Scalars("sft/loss")] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard (pip install tensorboard)")
def test_a_resumed_run_continues_the_global_step_axis(tmp_path):
    """Killed in its second stage and resumed: the first stage is loaded, not retrained, and the second
    stage's steps still follow the first's (3, 4 before the kill, 5 after), each step once."""
    import os
    import signal

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aligner.errors import Interrupted
    from aligner.hookspecs import hookimpl
    from aligner.plugins import temporary_plugin

    class KillInDpo:
        @hookimpl
        def on_step_end(self, run, step, metrics):
            if run.stage.name == "dpo" and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    config = _two_stage_config(tmp_path, tensorboard={})
    with temporary_plugin(KillInDpo(), name="kill"), pytest.raises(Interrupted):
        aligner.train(config)
    aligner.train(config, resume=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("dpo/loss")] == [3, 4, 5]
    assert [e.step for e in events.Scalars("dpo/final/train/loss")] == [5]
