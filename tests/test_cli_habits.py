"""CLI habits: ``--version``, ``key.path=value`` overrides anywhere on the line, and a fast ``--help``
that imports neither torch nor transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

import aligner.api
import aligner.commands.label
import aligner.data.check
from aligner.cli import main


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_version_is_the_distributions():
    done = subprocess.run([sys.executable, "-m", "aligner", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip() == f"aligner-trainer {version('aligner-trainer')}"


# Each command's help, and --version: none may import torch or transformers (seconds of imports).
HELP_LINES = [["--help"], ["--version"], ["train", "--help"], ["data", "check", "--help"], ["label", "--help"],
              ["plugins", "--help"], ["plot", "--help"], ["cache", "--help"], ["export", "--help"],
              ["verify", "--help"]]


@pytest.mark.parametrize("argv", HELP_LINES, ids=[" ".join(a) for a in HELP_LINES])
def test_help_imports_no_torch(argv):
    done = _python(
        "import json, sys\n"
        "from aligner.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'peft', 'trl', 'datasets') if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n")
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}
    assert done.stdout.strip()


@pytest.fixture
def captured(monkeypatch):
    """What each command's handler received, instead of running it."""
    calls: dict[str, tuple] = {}

    def fake_train(config, overrides, **kwargs):
        calls["train"] = (config, list(overrides), kwargs)
        return type("Result", (), {"final_model_dir": "out/final"})()

    def fake_check(config, overrides):
        calls["data check"] = (config, list(overrides))
        return []

    def fake_label_config(config, overrides):
        calls["label"] = (config, list(overrides))
        raise SystemExit(0)

    monkeypatch.setattr(aligner.api, "train", fake_train)
    monkeypatch.setattr(aligner.data.check, "check_data", fake_check)
    monkeypatch.setattr(aligner.commands.label, "load_label_config", fake_label_config)
    return calls


@pytest.mark.parametrize("argv", [
    ["train", "c.yaml", "seed=1", "--overwrite", "stages.dpo.train.learning_rate=1e-5", "--output-dir", "o"],
    ["train", "--overwrite", "c.yaml", "seed=1", "stages.dpo.train.learning_rate=1e-5", "--output-dir", "o"],
    ["train", "c.yaml", "--output-dir", "o", "seed=1", "--overwrite", "stages.dpo.train.learning_rate=1e-5"],
    ["train", "--output-dir", "o", "--overwrite", "c.yaml", "seed=1", "stages.dpo.train.learning_rate=1e-5"],
    ["--debug", "train", "c.yaml", "seed=1", "--overwrite", "--debug", "stages.dpo.train.learning_rate=1e-5",
     "--output-dir=o"],
])
def test_train_overrides_anywhere_in_order(captured, argv):
    assert main(argv) == 0
    config, overrides, kwargs = captured["train"]
    assert config == "c.yaml"
    assert overrides == ["seed=1", "stages.dpo.train.learning_rate=1e-5"]
    assert kwargs["output_dir"] == "o" and kwargs["overwrite"] is True


def test_data_check_and_label_take_overrides_after_flags(captured):
    assert main(["data", "check", "c.yaml", "--json", "a=1", "b.c=x"]) == 0
    assert captured["data check"] == ("c.yaml", ["a=1", "b.c=x"])
    with pytest.raises(SystemExit):
        main(["label", "l.yaml", "--debug", "num_completions=8"])
    assert captured["label"] == ("l.yaml", ["num_completions=8"])


def test_a_value_may_hold_equals_and_slashes(captured):
    assert main(["train", "c.yaml", "--overwrite", "stages.sft.data.train=data/a=b.jsonl"]) == 0
    assert captured["train"][1] == ["stages.sft.data.train=data/a=b.jsonl"]


@pytest.mark.parametrize(("argv", "unrecognized"), [
    (["train", "c.yaml", "--bogus", "a=1"], "--bogus"),
    (["train", "c.yaml", "--overwrite", "stray"], "stray"),
    (["plot", "run_dir", "a=1"], "a=1"),  # plot takes no overrides
])
def test_what_is_not_an_override_is_still_refused(captured, capsys, argv, unrecognized):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"unrecognized arguments: {unrecognized}" in capsys.readouterr().err
    assert "train" not in captured
