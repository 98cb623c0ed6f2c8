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


def test_a_byte_that_is_not_utf8_names_its_file_and_line(make_config, tmp_path, capsys):
    import yaml

    from .conftest import sft_rows

    data = tmp_path / "bad.jsonl"
    lines = [json.dumps(r).encode() for r in sft_rows(4)]
    lines[2] = lines[2].replace(b"The", b"Th\xe9", 1)  # latin-1 e-acute
    data.write_bytes(b"\n".join(lines) + b"\n")
    config = make_config("sft")
    config["stages"][0]["data"]["train"] = str(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 3: not UTF-8 (byte 0xe9 at column" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_label_config_typos_get_a_did_you_mean(tmp_path):
    import pytest

    from aligner.commands.label import load_label_config
    from aligner.errors import ConfigError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    base = {"prompts": str(prompts), "output": str(tmp_path / "out.jsonl"), "model": {"tiny": {}},
            "judge": {"name": "rule", "regex": "e"}}
    with pytest.raises(ConfigError, match=r"unknown key 'num_completion'.*did you mean 'num_completions'"):
        load_label_config({**base, "num_completion": 2})
    with pytest.raises(ConfigError, match=r"unknown key 'sede'.*did you mean 'seed'"):
        load_label_config({**base, "sede": 2})


def test_two_swapped_letters_in_a_short_key_get_a_did_you_mean():
    from aligner.errors import suggest

    assert suggest("rl", ["lr", "seed"]) == " (did you mean 'lr'?)"  # difflib alone scores it 0.5


def test_a_resumed_stage_reports_the_before_of_its_first_attempt(make_config, capsys):
    import re

    from .conftest import sft_rows
    from .test_resume import run_interrupted_then_resumed

    config = make_config("sft", rows=sft_rows(16), eval_rows=sft_rows(4),
                         train={"max_steps": 4, "batch_size": 4, "save_every": 2})
    result = run_interrupted_then_resumed(config, kill_at=3)
    before = re.findall(r"│ nll\s+│\s+(\S+)\s+│", capsys.readouterr().out)[-1]  # the resumed run's table
    records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    # the step-0 evaluation of the first attempt, read back from metrics.jsonl (it printed "-" before)
    assert before == f"{[r for r in records if r['step'] == 0][0]['eval/nll']:.4f}"


def test_json_output_stays_valid_when_a_library_prints_while_loading():
    # transformers prints "[INFO] Running in WANDB offline mode" to stdout when imported under
    # WANDB_MODE=offline, which the fresh-clone check runs with; the listing must stay parseable.
    import os

    result = subprocess.run([sys.executable, "-m", "aligner", "plugins", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)
    config = str(ROOT / "configs" / "grpo.yaml")
    result = subprocess.run([sys.executable, "-m", "aligner", "data", "check", config, "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr
    assert [r["split"] for r in json.loads(result.stdout)] == ["train", "eval", "train", "eval"]
