"""Config loading: typed validation, overrides, and errors that say where and what."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aligner.config import RunConfig, load_config
from aligner.errors import ConfigError

from .conftest import ROOT

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


BASE = """\
model:
  tiny: {hidden_size: 16}
stages:
  - name: dpo
    data: {train: train.jsonl}
    losses: [{name: dpo, beta: 0.2}]
    train:
      batch_size: 4
"""


def _reward_model_prerequisite(tmp_path: Path) -> None:
    """ppo_reward_model.yaml judges with a model its first command trains: put a stand-in there."""
    from .test_ppo import _save_reward_model

    _save_reward_model(tmp_path / "runs" / "quickstart_reward_model")


PREREQUISITES = {"ppo_reward_model.yaml": _reward_model_prerequisite}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates_and_starts_with_its_command(path: Path, tmp_path, monkeypatch):
    if path.name in PREREQUISITES:
        PREREQUISITES[path.name](tmp_path)
        monkeypatch.chdir(tmp_path)
    first = path.read_text().splitlines()[0]
    # The first line is a comment with the command (possibly after a prerequisite step).
    assert first.startswith("# ") and f"aligner train configs/{path.name}" in first, \
        f"{path.name} must start with the command that runs it"
    config = load_config(path)
    assert isinstance(config, RunConfig)
    # Plugin names and options are checked too (without loading a model or reading data twice).
    from aligner.plugins import get_registry
    from aligner.training.stages import instantiate

    for i, stage in enumerate(config.stages):
        for j, loss in enumerate(stage.losses):
            instantiate("loss", loss, ("stages", i, "losses", j), config)
        instantiate("peft backend", stage.peft, ("stages", i, "peft"), config)
        if stage.reference.name != "auto":
            assert stage.reference.name in get_registry("reference policy")


def test_relative_data_paths_resolve_against_the_config_file(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.stages[0].data.train == str(tmp_path / "train.jsonl")
    assert config.stages[0].train.batch_size == 4
    assert config.stages[0].train.learning_rate == 1e-4  # default filled in


def test_misspelled_key_names_path_line_and_suggestion(tmp_path):
    path = write(tmp_path, BASE.replace("batch_size: 4", "batch_sise: 4"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown key 'stages[0].train.batch_sise'" in message
    assert f"{path}, line 8" in message
    assert "did you mean 'batch_size'?" in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    path = write(tmp_path, BASE.replace("batch_size: 4", "batch_size: four"))
    with pytest.raises(ConfigError, match=r"invalid value for 'stages\[0\].train.batch_size'.*line 8.*'four'"):
        load_config(path)


def test_missing_data_file_is_reported_with_its_key(tmp_path):
    path = write(tmp_path, BASE.replace("train: train.jsonl", "train: nowhere.jsonl"))
    with pytest.raises(ConfigError, match=r"file not found for 'stages\[0\].data.train'.*nowhere.jsonl"):
        load_config(path)


def test_overrides_by_index_and_by_stage_name_with_typed_values(tmp_path):
    path = write(tmp_path, BASE)
    config = load_config(path, ["stages.dpo.train.learning_rate=5e-5", "stages.0.losses.0.beta=0.3", "seed=7"])
    assert config.stages[0].train.learning_rate == 5e-5
    assert config.stages[0].losses[0].options() == {"beta": 0.3}
    assert config.seed == 7


def test_bad_overrides_say_why(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_config(path, ["seed"])
    with pytest.raises(ConfigError, match=r"no item named 'dop'.*did you mean 'dpo'"):
        load_config(path, ["stages.dop.train.batch_size=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'stages\[0\].train.lr'.*from override 'stages.0.train.lr=1'"):
        load_config(path, ["stages.0.train.lr=1"])


def test_unknown_plugin_option_is_reported_with_suggestion(tmp_path, make_config):
    from aligner.training.stages import prepare_stages

    config = make_config("dpo")
    config["stages"][0]["losses"] = [{"name": "dpo", "betta": 0.1}]
    with pytest.raises(ConfigError, match=r"unknown option 'stages\[0\].losses\[0\].betta' for 'dpo'.*did you mean 'beta'"):
        prepare_stages(load_config(config))


def test_model_needs_exactly_one_source(tmp_path):
    path = write(tmp_path, BASE.replace("tiny: {hidden_size: 16}", "path: x\n  tiny: {}"))
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    from aligner.config import dump_config

    config = load_config(write(tmp_path, BASE))
    dump_config(config, tmp_path / "resolved.yaml")
    again = load_config(yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert again.model_dump() == config.model_dump()


def test_a_credential_written_into_the_config_is_refused_with_its_line(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {tiny: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}\n"
        "tokenizer: builtin\n"
        "stages:\n"
        "  - name: dpo\n"
        f"    data: {{train: {data}}}\n"
        "    losses: [{name: dpo}]\n"
        "    eval:\n"
        "      generate:\n"
        "        judge: {name: http, url: 'http://localhost:1', api_key: sk-not-a-real-key}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "'stages[0].eval.generate.judge.api_key'" in message and f"({path}, line 9)" in message
    assert "looks like a credential" in message and "sk-not-a-real-key" not in message
    # the variable's name is fine, and so are tokenizer settings that merely end in "token"
    from aligner.config import SECRET_KEYS

    for harmless in ("api_key_env", "pad_token", "eos_token", "max_new_tokens", "num_tokens"):
        assert not SECRET_KEYS.search(harmless), harmless
    for secret in ("api_key", "OPENAI_API_KEY", "apikey", "token", "hf_token", "password", "client_secret"):
        assert SECRET_KEYS.search(secret.lower()), secret
