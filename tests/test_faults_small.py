"""Small faults from issue 19, each a test that failed before its fix."""

from __future__ import annotations

import json
import subprocess
import sys

from aligner.cli import main

from .conftest import ROOT


def test_resume_of_a_directory_with_no_run_is_a_config_error(make_config, tmp_path, capsys):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(make_config("sft")))
    assert main(["train", str(config), "--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no run to resume" in err and "Traceback" not in err


def test_export_of_a_folder_with_another_tools_summary_is_a_config_error(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"accuracy": 0.9}))
    assert main(["export", str(tmp_path), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "is not an aligner run summary (no 'final_model')" in err and "Traceback" not in err


def test_plugins_into_a_closed_pipe_ends_quietly():
    # `aligner plugins --all | head -0`: the reader is gone before anything is written.
    producer = subprocess.Popen([sys.executable, "-m", "aligner", "plugins", "--all"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    producer.stdout.close()
    stderr = producer.stderr.read().decode()
    assert producer.wait(timeout=120) == 0
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr
