"""W&B tracking offline: metrics, config and samples are logged and read back; the key never leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

import aligner
from aligner.trackers.wandb_tracker import resolve_mode

from .conftest import preference_rows
from .wandb_offline import history, records, summary_and_config, wait_until_complete


def test_offline_run_logs_metrics_config_and_summary_without_leaking_the_key(make_config, monkeypatch):
    secret = "0123456789abcdef-not-a-real-key-0123456789"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = make_config("dpo", steps=3, eval_rows=preference_rows(4))
    # offline explicitly: with a key, auto would go online, and this machine has no network.
    config["wandb"] = {"project": "tests", "mode": "offline", "tags": ["ci"]}
    result = aligner.train(config)
    files = list((result.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rows = history(wait_until_complete(files[0]))
    steps = [r for r in rows if "dpo/loss" in r]
    assert [r["global_step"] for r in steps] == [1, 2, 3]
    assert steps[0]["dpo/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    evals = [r for r in rows if "dpo/eval/rewards/accuracies" in r]
    assert [r["global_step"] for r in evals] == [0, 3]
    summary, logged = summary_and_config(files[0])
    assert "dpo/final/train/loss" in summary
    stages = logged["stages"]["value"] if isinstance(logged["stages"], dict) else logged["stages"]
    assert stages[0]["losses"][0]["name"] == "dpo"
    for path in result.output_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the API key was written to {path}"


def test_mode_auto_never_goes_online_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"


def test_disabled_mode_writes_nothing(make_config, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = make_config("sft", steps=1)
    config["wandb"] = {"mode": "disabled"}
    result = aligner.train(config)
    assert not list((result.output_dir / "wandb").glob("*run-*"))


def test_plot_draws_curves_of_a_run(make_config, capsys):
    from PIL import Image

    from aligner.cli import main

    result = aligner.train(make_config("dpo", steps=3, eval_rows=preference_rows(4)))
    assert main(["plot", str(result.output_dir)]) == 0
    png = result.output_dir / "plots" / "dpo.png"
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.size[0] > 4 * image.size[1]  # loss, reward, margin and accuracy panels side by side
    assert main(["plot", str(result.output_dir / "nowhere")]) == 2


def test_a_failed_run_is_closed_as_failed(make_config, monkeypatch):
    """A stage that raises leaves an offline W&B run with exit code 1 and the error in its summary."""
    from aligner.hookspecs import hookimpl
    from aligner.plugins import temporary_plugin

    class GiveUp:
        @hookimpl
        def on_step_end(self, run, step, metrics):
            if step == 2:
                raise RuntimeError("gave up at step 2")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = make_config("sft", steps=3)
    config["wandb"] = {"project": "tests", "mode": "offline"}
    with temporary_plugin(GiveUp(), name="give-up"), pytest.raises(RuntimeError, match="gave up"):
        aligner.train(config)
    files = list((Path(config["output_dir"]) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    path = wait_until_complete(files[0])
    exits = [r.exit.exit_code for r in records(path) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    summary, _ = summary_and_config(path)
    assert summary["failed_stage"] == "sft" and "gave up at step 2" in summary["error"]
    assert [r["global_step"] for r in history(path) if "sft/loss" in r][:1] == [1]  # what was logged is kept


def test_a_resumed_run_continues_the_global_step_axis(tmp_path, monkeypatch):
    """Killed in its second stage and resumed: the first stage is loaded, not retrained, and the W&B
    steps of the second stage still follow the first's (3, 4 before the kill, 5 after)."""
    import os
    import signal

    from aligner.errors import Interrupted
    from aligner.hookspecs import hookimpl
    from aligner.plugins import temporary_plugin

    from .test_trackers import _two_stage_config

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")

    class KillInDpo:
        @hookimpl
        def on_step_end(self, run, step, metrics):
            if run.stage.name == "dpo" and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    config = _two_stage_config(tmp_path, wandb={"project": "tests", "mode": "offline"})
    with temporary_plugin(KillInDpo(), name="kill"), pytest.raises(Interrupted):
        aligner.train(config)
    aligner.train(config, resume=True)
    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    rows = [row for f in files for row in history(wait_until_complete(f))]
    # Two runs started in the same second sort by their random ids: compare the steps, not the file order
    # (before the fix the resumed run logged dpo's step 3 again at global step 3: [3, 3, 4]).
    assert sorted(r["global_step"] for r in rows if "sft/loss" in r) == [1, 2]
    assert sorted(r["global_step"] for r in rows if "dpo/loss" in r) == [3, 4, 5]
