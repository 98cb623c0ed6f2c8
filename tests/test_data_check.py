"""``aligner data check`` and what training drops: every bad row located, every drop counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aligner.api import train
from aligner.cli import main
from aligner.data.check import length_stats
from aligner.errors import DataError
from tests.conftest import preference_rows


def _messy_rows() -> list[str]:
    """20 preference lines with one fault of each kind; returns JSON lines (some not JSON at all)."""
    rows = [json.dumps(r) for r in preference_rows(20)]
    good = preference_rows(20)
    rows[2] = '{"prompt": "Hi", "chosen": "a", '                                     # line 3: not JSON
    rows[4] = json.dumps({"prompt": "Hi", "chosen": 7, "rejected": "b"})             # line 5: wrong type
    rows[6] = json.dumps({"prompt": "Hi", "rejected": "b"})                          # line 7: missing field
    rows[8] = json.dumps({**good[8], "rejected": good[8]["chosen"]})                 # line 9: identical pair
    rows[10] = json.dumps({**good[10], "chosen": "  "})                               # line 11: empty chosen
    rows[12] = json.dumps({**good[12], "prompt": "word " * 200})                      # line 13: prompt fills max_length
    rows[14] = rows[0]                                                                # line 15: duplicate of line 1
    rows[16] = "[1, 2]"                                                               # line 17: not an object
    return rows


@pytest.fixture
def messy_config(tmp_path: Path, make_config):
    train_file = tmp_path / "messy.jsonl"
    train_file.write_text("\n".join(_messy_rows()) + "\n")
    config = make_config("dpo", eval_rows=preference_rows(3))
    config["stages"][0]["data"].update({"train": str(train_file), "max_prompt_length": 64})
    path = tmp_path / "messy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, train_file


def test_data_check_reports_every_fault_with_its_line(messy_config, capsys):
    path, data = messy_config
    code = main(["data", "check", str(path)])
    out = capsys.readouterr().out
    assert code == 2
    assert f"stage 'dpo' train ({data}, preference format): 20 rows read, 4 rejected, 3 dropped, 13 kept" in out
    assert f"{data}, line 3: not valid JSON: Expecting property name enclosed in double quotes (column 33)" in out
    assert f"{data}, line 5: field 'chosen' must be a string or a list of messages, got int" in out
    assert f"{data}, line 7: missing field 'chosen'" in out
    assert f"{data}, line 17: each line must be a JSON object, got list" in out
    assert "dropped by training (19% of valid rows, limit 10% - more than data.max_drop_fraction)" in out
    assert f"{data}, line 9: identical chosen and rejected" in out
    assert f"{data}, line 11: empty chosen" in out
    assert f"{data}, line 13: no completion tokens left after truncation" in out
    assert "truncation (max_length 48, max_prompt_length 64): touches 1 rows, empties 1" in out
    assert "1 duplicate rows, 1 identical chosen/rejected pairs" in out
    assert "stage 'dpo' eval" in out and "3 rows read, 0 rejected, 0 dropped, 3 kept" in out
    assert "2 rows also in train" in out  # eval rows 1-2 are train lines 1-2 (line 3 is broken there)
    assert "data check failed: 4 rejected rows" in out


def test_data_check_json_and_length_distribution(messy_config, capsys):
    path, _ = messy_config
    assert main(["data", "check", str(path), "--json"]) == 2
    train_report, eval_report = json.loads(capsys.readouterr().out)
    assert [r["location"].rsplit(" ", 1)[1] for r in train_report["rejected"]] == ["3", "5", "7", "17"]
    assert train_report["dropped"] == {"identical chosen and rejected": 1, "empty chosen": 1,
                                       "no completion tokens left after truncation": 1}
    lengths = train_report["token_lengths"]
    assert lengths["min"] <= lengths["median"] <= lengths["p95"] <= lengths["max"]
    assert lengths["max"] > 200  # the 200-word prompt, measured before truncation
    assert eval_report["failed"] is False and eval_report["kept"] == 3


def test_data_check_passes_clean_data(make_config, tmp_path, capsys):
    path = tmp_path / "clean.yaml"
    path.write_text(yaml.safe_dump(make_config("dpo")))
    assert main(["data", "check", str(path)]) == 0
    assert "data check passed: 1 splits" in capsys.readouterr().out


def test_length_stats_nearest_rank():
    assert length_stats(list(range(1, 101))) == {"min": 1, "median": 50.5, "p95": 95, "max": 100}
    assert length_stats([]) == {}


def test_too_many_drops_stop_the_run_before_the_model_loads(make_config, monkeypatch, caplog):
    rows = preference_rows(10)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["rejected"] = rows[2]["chosen"]
    config = make_config("dpo", rows=rows)

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("aligner.modeling.loading.load_model", no_model)
    with pytest.raises(DataError) as info, caplog.at_level("ERROR", logger="aligner"):
        train(config)
    message = str(info.value)
    assert "stage 'dpo' train: 2 of 10 rows (20%) would be dropped (2 identical chosen and rejected)" in message
    assert "more than data.max_drop_fraction=0.1" in message
    assert "dpo_train.jsonl, line 2: identical chosen and rejected" in caplog.text  # the report is logged
    assert not (Path(config["output_dir"]) / "config.yaml").exists()


def test_drops_under_the_limit_are_counted_in_log_and_summary_and_secrets_stay_out(make_config, monkeypatch, caplog):
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "OPENAI_API_KEY": "sk-secret-0123456789abcdef",
               "HF_TOKEN": "hf_secret0123456789abcdef"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    rows = preference_rows(10)
    rows[1]["rejected"] = rows[1]["chosen"]     # identical pair
    rows[3]["chosen"] = ""                      # empty completion
    rows[5]["prompt"] = "word " * 100           # truncation leaves no completion token
    config = make_config("dpo", rows=rows, eval_rows=preference_rows(4))
    config["stages"][0]["data"].update({"max_prompt_length": 64, "max_drop_fraction": 0.3})
    with caplog.at_level("INFO", logger="aligner"):
        result = train(config)
    assert ("stage 'dpo' train: dropped 3 of 10 rows (1 identical chosen and rejected, 1 empty chosen, "
            "1 no completion tokens left after truncation)") in caplog.text
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["data"]["dpo"]["train"] == {
        "rows": 10, "kept": 7, "truncated": 0,
        "dropped": {"identical chosen and rejected": 1, "empty chosen": 1,
                    "no completion tokens left after truncation": 1}}
    assert summary["data"]["dpo"]["eval"]["dropped"] == {}
    # Weights are written as safetensors only (the optimizer state is loaded with weights_only=True).
    assert (result.final_model_dir / "model.safetensors").is_file()
    assert not list(result.output_dir.rglob("*.bin"))
    # Secrets from the environment appear in no file of the run and in no log line.
    written = "".join(p.read_text(errors="ignore") for p in result.output_dir.rglob("*") if p.is_file())
    for value in secrets.values():
        assert value not in written
        assert value not in caplog.text


def test_data_check_reports_every_failing_stage_check_not_only_the_first(make_config, tmp_path, capsys):
    """A stage whose reference cannot serve its loss and that asks for packing it cannot use: both
    are reported (the check used to stop at the first); training stops at the first."""
    config = make_config("kto", rows=[{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0}
                                      for i in range(8)])
    stage = config["stages"][0]
    stage["reference"] = {"name": "cached"}
    stage["data"]["packing"] = True
    path = tmp_path / "two_problems.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["data", "check", str(path)]) == 2
    out = capsys.readouterr().out
    assert "'stages[0].reference'" in out and "scores only the dataset's own sequences" in out
    assert "'stages[0].data.packing' packs sft rows only" in out
