"""The distributions in plugins/, installed the way a user installs them, used through the CLI.

The README's test command and .ci/run install them (``pip install -e plugins/aligner-simpo ...``)
before running pytest; these tests fail with that instruction if they are missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aligner.cli import main
from aligner.plugins import reset_plugins
from tests.conftest import ROOT

DISTRIBUTIONS = {"aligner-simpo": ("simpo", {"loss": ["simpo"]}),
                 "aligner-http-judge": ("http_judge", {"judge": ["http"]}),
                 "aligner-rank-advantage": ("rank_advantage", {"advantage estimator": ["rank"]})}


@pytest.fixture(autouse=True)
def installed(monkeypatch):
    for dist in DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{dist} is not installed: run the README's test command, which installs plugins/* "
                        f"(pip install -e plugins/{dist})")
    monkeypatch.delenv("ALIGNER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_plugins()
    yield
    reset_plugins()


def aligner_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``aligner`` console script (the one next to this interpreter)."""
    script = Path(sys.executable).parent / "aligner"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "aligner.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_aligner_plugins_json_lists_each_distribution_version_and_what_it_registered():
    result = aligner_command("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["distribution"]: row for row in json.loads(result.stdout)}
    assert "aligner-trainer" not in rows  # built-ins only with --all
    for dist, (entry_name, registers) in DISTRIBUTIONS.items():
        assert rows[dist] == {"name": entry_name, "source": "entry point", "distribution": dist,
                              "version": importlib.metadata.version(dist), "registers": registers}


def test_aligner_plugins_text_and_all(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "simpo (entry point, aligner-simpo 0.1.0): loss: simpo" in out
    assert "http_judge (entry point, aligner-http-judge 0.1.0): judge: http" in out
    assert main(["plugins", "--all", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["aligner.losses.dpo"]["registers"] == {"loss": ["dpo", "ipo"]}
    assert rows["aligner.losses.dpo"]["source"] == "builtin"
    assert rows["aligner.losses.dpo"]["distribution"] == "aligner-trainer"
    assert "simpo" in rows


def _simpo_config(tmp_path: Path, make_config) -> Path:
    config = make_config("simpo")
    config["stages"][0]["losses"] = [{"name": "simpo", "beta": 2.0, "gamma": 0.5}]
    path = tmp_path / "simpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_aligner_train_with_a_config_naming_simpo_trains(tmp_path, make_config):
    result = aligner_command("train", str(_simpo_config(tmp_path, make_config)))
    assert result.returncode == 0, result.stderr
    assert "final model:" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all("rewards/margins" in r for r in records if "loss" in r)
    assert (tmp_path / "run" / "simpo" / "final" / "model.safetensors").exists()


def test_without_the_plugin_a_config_naming_simpo_is_a_clear_error(tmp_path, make_config, monkeypatch, capsys):
    # Stands in for `pip uninstall aligner-simpo`: entry-point plugins are not loaded.
    monkeypatch.setenv("ALIGNER_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["train", str(_simpo_config(tmp_path, make_config))]) == 2
    err = capsys.readouterr().err.strip()
    # aligner: error: unknown loss 'simpo' at 'stages[0].losses[0]' (FILE, line N); known: dpo, ...
    match = re.fullmatch(r"aligner: error: unknown loss 'simpo' at 'stages\[0\]\.losses\[0\]'( \([^)]*\))?; "
                         r"known: ([a-z_, ]+) \(is the plugin .*", err)
    assert match, err
    known = match.group(2).split(", ")
    assert "dpo" in known and "sft" in known and "simpo" not in known
    assert err.endswith("(is the plugin that provides it installed? `aligner plugins --all` lists what is loaded)")
    assert not (tmp_path / "run").exists()
