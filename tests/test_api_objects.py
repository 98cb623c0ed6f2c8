"""The Python API takes a model object and a tokenizer object where the config would name them."""

from __future__ import annotations

import pytest
import torch
import yaml

import aligner
from aligner.config import TinyModelConfig
from aligner.errors import ConfigError
from aligner.modeling.loading import build_tiny_model, build_tiny_reward_model
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

from .conftest import tiny_model


def _objects(reward: bool = False):
    tokenizer = load_builtin_tokenizer()
    spec = TinyModelConfig(**tiny_model()["tiny"])
    torch.manual_seed(0)
    build = build_tiny_reward_model if reward else build_tiny_model
    return build(spec, tokenizer, torch.float32), tokenizer


def test_a_model_and_tokenizer_object_train_in_place_without_model_or_tokenizer_keys(make_config):
    model, tokenizer = _objects()
    config = make_config("sft", steps=2)
    del config["model"], config["tokenizer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = aligner.train(config, model=model, tokenizer=tokenizer)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert changed, "the object passed as model= was not trained"
    assert (result.final_model_dir / "model.safetensors").is_file()
    written = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert written["model"]["path"] == "<in-memory LlamaForCausalLM>"
    assert written["tokenizer"].startswith("<in-memory ")


def test_the_same_run_from_an_object_and_from_the_config_gives_the_same_losses(make_config, tmp_path):
    """The object path changes where the model comes from, not the maths: same seed, same losses."""
    config = make_config("dpo", steps=2)
    from_config = aligner.train(config).metrics["dpo"]
    model, tokenizer = _objects()
    del config["model"]
    config["output_dir"] = str(tmp_path / "objects")
    from_object = aligner.train(config, model=model, tokenizer=tokenizer).metrics["dpo"]
    assert from_object["train/loss"] == pytest.approx(from_config["train/loss"], abs=1e-6)


def test_a_model_without_the_head_the_losses_need_is_refused_before_anything_is_written(make_config, tmp_path):
    model, tokenizer = _objects(reward=True)
    config = make_config("sft", steps=1)
    with pytest.raises(ConfigError, match="model= is a LlamaForSequenceClassification without a language-model head"):
        aligner.train(config, model=model, tokenizer=tokenizer)
    assert not (tmp_path / "run").exists()


def test_a_model_object_from_a_path_the_config_cannot_see_still_trains(make_config, tmp_path, monkeypatch):
    """A model loaded from a folder relative to the working directory (or since deleted) is the object
    passed, not a path to check: the run trains and config.yaml names where it came from."""
    model, tokenizer = _objects()
    model.name_or_path = "models/sft: v1"  # relative, not there, and not plain YAML
    config = make_config("sft", steps=1)
    del config["model"]
    result = aligner.train(config, model=model, tokenizer=tokenizer)
    assert yaml.safe_load((result.output_dir / "config.yaml").read_text())["model"]["path"] == "models/sft: v1"
