"""The CLI: one-line errors with exit code 2, tracebacks only with --debug."""

from __future__ import annotations

import pytest

from aligner.cli import main

from .conftest import write_jsonl


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_misspelled_key_exits_2_with_path_and_suggestion(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    config = tmp_path / "c.yaml"
    config.write_text("model: {tiny: {}}\nstages:\n  - name: s\n    data: {train: d.jsonl}\n"
                      "    losses: [{name: sft}]\n    train: {learnig_rate: 0.1}\n")
    code, _, err = run(capsys, "train", str(config))
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "unknown key 'stages[0].train.learnig_rate'" in err and "line 6" in err
    assert "did you mean 'learning_rate'?" in err


def test_bad_preference_line_exits_2_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    import aligner.modeling.loading

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was validated")

    monkeypatch.setattr(aligner.modeling.loading, "load_model", no_models)
    monkeypatch.setattr(aligner.modeling.loading, "load_tokenizer", no_models)
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4 + [{"prompt": "a", "chosen": "b"}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text("model: {tiny: {}}\nstages:\n  - name: dpo\n    data: {train: pairs.jsonl}\n"
                      "    losses: [{name: dpo}]\n")
    code, _, err = run(capsys, "train", str(config))
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'pairs.jsonl'}, line 5: missing field 'rejected'" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    from aligner.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])
    code, _, err = run(capsys, "train", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err


def test_unknown_loss_and_wrong_data_format_are_config_errors(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    config = tmp_path / "c.yaml"
    config.write_text("model: {tiny: {}}\nstages:\n  - name: s\n    data: {train: d.jsonl}\n    losses: [{name: dop}]\n")
    code, _, err = run(capsys, "train", str(config))
    assert code == 2 and "unknown loss 'dop' at 'stages[0].losses[0]' (" in err
    assert "c.yaml, line 5) (did you mean 'dpo'?); known:" in err
    config.write_text("model: {tiny: {}}\nstages:\n  - name: s\n    data: {train: d.jsonl}\n    losses: [{name: dpo}]\n")
    code, _, err = run(capsys, "train", str(config))
    assert code == 2 and "loss 'dpo' in stage 's' trains on preference data" in err and "is sft data" in err


def test_train_from_the_cli_with_overrides(make_config, tmp_path, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(make_config("sft", steps=5)))
    code, out, _ = run(capsys, "train", str(config), "stages.sft.train.max_steps=1",
                       "--output-dir", str(tmp_path / "cli-run"))
    assert code == 0 and "final model:" in out
    assert (tmp_path / "cli-run" / "sft" / "final" / "model.safetensors").is_file()


# `aligner plugins | head -1` with a listing longer than a pipe holds: the reader takes one line and
# goes away while aligner is still writing. The child lists 20,000 plugins (far past the pipe's buffer).
_MANY_PLUGINS = """
import sys
import aligner.plugins
from aligner.cli import main
from aligner.plugins import PluginInfo
aligner.plugins.plugin_infos = lambda: [PluginInfo(f"p{i}", "entry point", "dist", "1.0", {"judge": [f"j{i}"]})
                                        for i in range(20_000)]
sys.exit(main(["plugins"{json}]))
"""


@pytest.mark.parametrize("json_flag", ["", ', "--json"'])
def test_a_reader_that_stops_early_ends_the_command_quietly(json_flag):
    import subprocess
    import sys

    from .conftest import ROOT

    producer = subprocess.Popen([sys.executable, "-c", _MANY_PLUGINS.replace("{json}", json_flag)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = producer.stdout.readline()
    producer.stdout.close()
    stderr = producer.stderr.read().decode()
    assert producer.wait(timeout=120) == 0, stderr
    assert first.strip() and "BrokenPipeError" not in stderr and "Traceback" not in stderr
