"""Config and CLI errors: exit code 2, one line saying what and where, no traceback unless --debug."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligner.cli import main
from aligner.errors import AlignerError
from tests.conftest import preference_rows, write_jsonl

CONFIG = """\
# aligner train {name}
output_dir: {out}
model:
  tiny: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
tokenizer: builtin
stages:
  - name: dpo
    data: {{train: train.jsonl, template: plain, max_length: 48}}
    losses:
      - name: {loss}
        beta: 0.1
    train:
      max_steps: 1
      batch_size: {batch_size}
"""


@pytest.fixture
def config_file(tmp_path: Path):
    write_jsonl(tmp_path / "train.jsonl", preference_rows(8))

    def write(loss: str = "dpo", batch_size: str = "4") -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(CONFIG.format(name=path, out=tmp_path / "out", loss=loss, batch_size=batch_size))
        return path

    return write


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aligner: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_wrong_type_in_the_file_names_key_file_and_line(config_file, capsys):
    path = config_file(batch_size="many")
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line(code, err, "'stages[0].train.batch_size'", f"{path}, line 14", "valid integer", "'many'")


def test_wrong_type_in_an_override_names_the_override(config_file, capsys):
    code, err = run_cli(capsys, "train", str(config_file()), "stages.dpo.train.learning_rate=fast")
    assert_one_line(code, err, "'stages[0].train.learning_rate'", "override 'stages.dpo.train.learning_rate=fast'")


def test_unknown_key_suggests_the_nearest(config_file, capsys):
    code, err = run_cli(capsys, "train", str(config_file()), "stages.dpo.train.batchsize=3")
    assert_one_line(code, err, "unknown key 'stages[0].train.batchsize'", "did you mean 'batch_size'")


def test_unknown_plugin_option_names_file_and_line(config_file, capsys):
    path = config_file()
    path.write_text(path.read_text().replace("beta: 0.1", "betta: 0.1"))
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line(code, err, "unknown option 'stages[0].losses[0].betta' for 'dpo'", f"{path}, line 11",
                    "did you mean 'beta'")


def test_unknown_plugin_name_names_file_and_line(config_file, capsys):
    path = config_file(loss="dpoo")
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line(code, err, "unknown loss 'dpoo'", "'stages[0].losses[0]'", f"{path}, line 10",
                    "did you mean 'dpo'", "known: ")


@pytest.mark.parametrize("override, fragments", [
    ("stages.dpo.reference.name=frozen", ("unknown reference policy 'frozen'", "'stages[0].reference'")),
    ("stages.dpo.peft.name=lora2", ("unknown peft backend 'lora2'", "'stages[0].peft'")),
])
def test_unknown_plugin_names_of_every_kind(config_file, capsys, override, fragments):
    code, err = run_cli(capsys, "train", str(config_file()), override)
    assert_one_line(code, err, *fragments, f"override '{override}'")


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert_one_line(code, err, "config file not found", "nope.yaml")


def test_missing_data_file_names_the_key(config_file, capsys, tmp_path):
    code, err = run_cli(capsys, "train", str(config_file()), "stages.dpo.data.train=missing.jsonl")
    assert_one_line(code, err, "file not found for 'stages[0].data.train'", str(tmp_path / "missing.jsonl"))


def test_missing_tokenizer_directory(config_file, capsys):
    code, err = run_cli(capsys, "train", str(config_file()), "tokenizer=./no-such-dir")
    assert_one_line(code, err, "file not found for 'tokenizer'", "no-such-dir")


def test_invalid_yaml_names_the_line(config_file, capsys):
    path = config_file()
    path.write_text(path.read_text() + "  oops: [unclosed\n")
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line(code, err, str(path), "line 1", "not valid YAML")


@pytest.mark.parametrize("override, fragment", [
    ("foo", "override 'foo' is not of the form key.path=value"),
    ("stages.dpx.train.batch_size=3", "no item named 'dpx' in 'stages' (did you mean 'dpo'?)"),
    ("stages.7.name=x", "index 7 out of range for 'stages'"),
    ("stages..name=x", "has an empty key"),
    ("output_dir.x=1", "'output_dir' is not a section"),
])
def test_bad_overrides(config_file, capsys, override, fragment):
    code, err = run_cli(capsys, "train", str(config_file()), override)
    assert_one_line(code, err, fragment)


def test_unknown_template_names_the_stage_key(config_file, capsys):
    code, err = run_cli(capsys, "train", str(config_file()), "stages.dpo.data.template=chatmlx")
    assert_one_line(code, err, "'stages[0].data.template'", "unknown template 'chatmlx'", "available: alpaca")


def test_bad_data_row_names_file_line_and_field(config_file, capsys, tmp_path):
    rows = preference_rows(8)
    rows[4]["chosen"] = 3
    write_jsonl(tmp_path / "train.jsonl", rows)
    code, err = run_cli(capsys, "train", str(config_file()))
    assert_one_line(code, err, f"{tmp_path / 'train.jsonl'}, line 5", "field 'chosen'")


def test_debug_shows_the_traceback(config_file):
    with pytest.raises(AlignerError, match="unknown key 'stages\\[0\\].train.batchsize'"):
        main(["--debug", "train", str(config_file()), "stages.dpo.train.batchsize=3"])
