"""KTO, ORPO, reward models and weighted loss mixtures through the real loop: quality, saving, wiring, errors.

The quality gates train on subsets of the quickstart task (the shipped configs in ``configs/`` use
more rows) and assert held-out accuracy on all 200 held-out pairs, whose subjects never appear in
training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from aligner.api import train
from aligner.config import load_config
from aligner.errors import ConfigError, DataError
from aligner.training.stages import prepare_stage

from .conftest import QUICKSTART_DATA, ROOT, preference_rows, write_jsonl

SMALL = {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 172}}
THRESHOLD = 0.9


def stage(name: str, data: str, losses: list[dict], rows: int, train: dict, eval_file: str | None = None,
          **more) -> dict:
    data_config = {"train": str(QUICKSTART_DATA / data), "template": "plain", "max_length": 48, "max_rows": rows}
    if eval_file:
        data_config["eval"] = str(QUICKSTART_DATA / eval_file)
    return {"name": name, "data": data_config, "losses": losses, "train": train, **more}


def run(tmp_path: Path, stages: list[dict], model: dict | None = None):
    config = {"output_dir": str(tmp_path / "run"), "seed": 0, "model": model or SMALL, "tokenizer": "builtin",
              "stages": stages}
    return train(config)


def metrics_lines(result) -> list[dict]:
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


# --- quality gates on the quickstart task ---------------------------------------------------------


def test_kto_reaches_held_out_preference_accuracy(tmp_path):
    result = run(tmp_path, [
        stage("sft", "sft_train.jsonl", [{"name": "sft"}], 320,
              {"epochs": 1, "batch_size": 32, "learning_rate": 3e-3, "warmup_ratio": 0.05}, eval={"at_start": False}),
        # Paired rows, unpaired on the fly: chosen = desirable, rejected = undesirable.
        stage("kto", "preference_train.jsonl", [{"name": "kto", "beta": 0.1}], 256,
              {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3}, "preference_eval.jsonl",
              reference={"name": "frozen_copy"}),
    ])
    accuracy = result.final_metrics["eval/rewards/accuracies"]
    print(f"KTO held-out preference accuracy: {accuracy:.3f}")
    assert accuracy >= THRESHOLD


def test_orpo_reaches_held_out_preference_accuracy_without_a_reference(tmp_path):
    # reference 'auto' resolves to 'none', whose logprobs() raises: any reference pass would fail this run.
    result = run(tmp_path, [
        stage("orpo", "preference_train.jsonl", [{"name": "orpo", "beta": 0.5}], 768,
              {"epochs": 1, "batch_size": 32, "learning_rate": 2e-3, "warmup_ratio": 0.05,
               "lr_scheduler": "cosine"}, "preference_eval.jsonl"),
    ])
    before = metrics_lines(result)[0]
    accuracy = result.final_metrics["eval/rewards/accuracies"]
    print(f"ORPO held-out preference accuracy: {before['eval/rewards/accuracies']:.3f} -> {accuracy:.3f}")
    assert accuracy >= THRESHOLD
    assert result.final_metrics["eval/nll_loss"] < before["eval/nll_loss"]


def test_reward_model_reaches_pairwise_accuracy_and_loads_with_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = run(tmp_path, [
        stage("reward_model", "preference_train.jsonl", [{"name": "reward_model"}], 384,
              {"epochs": 1, "batch_size": 32, "learning_rate": 1e-3, "warmup_ratio": 0.05, "lr_scheduler": "cosine"},
              "preference_eval.jsonl"),
    ])
    accuracy = result.final_metrics["eval/accuracy"]
    print(f"reward model held-out pairwise accuracy: {accuracy:.3f}")
    assert accuracy >= THRESHOLD

    # What PPO or a judge would do: load the saved model with plain transformers and score text.
    model = AutoModelForSequenceClassification.from_pretrained(result.final_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_model_dir)
    pair = json.loads((QUICKSTART_DATA / "preference_eval.jsonl").read_text().splitlines()[0])
    texts = [f"{pair['prompt']} {pair[key]}" for key in ("chosen", "rejected")]
    with torch.no_grad():
        scores = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert model.config.num_labels == 1
    assert scores[0] > scores[1]


# --- wiring ---------------------------------------------------------------------------------------


def test_weighted_sft_term_composes_with_a_preference_loss(make_config):
    config = make_config("dpo", steps=2)
    config["stages"][0]["losses"] = [{"name": "dpo", "beta": 0.1}, {"name": "sft", "weight": 0.2}]
    result = train(config)
    steps = [m for m in metrics_lines(result) if "dpo/loss" in m]
    assert steps, "no training step logged"
    for m in steps:
        assert {"dpo/rewards/accuracies", "sft/nll", "sft/loss"} <= set(m)
        assert m["loss"] == pytest.approx(m["dpo/loss"] + 0.2 * m["sft/loss"], rel=1e-5)
        assert m["sft/nll"] == m["sft/loss"]


def test_kto_composes_with_sft_on_unpaired_data_and_warns_about_balance(make_config, tmp_path, caplog):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in preference_rows(2)]
    rows += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in preference_rows(16)]
    config = make_config("kto", rows=rows, steps=2)
    config["stages"][0]["losses"] = [{"name": "kto"}, {"name": "sft", "weight": 0.5}]
    config["stages"][0]["data"]["format"] = "unpaired"
    with caplog.at_level(logging.WARNING, logger="aligner"):
        result = train(config)
    assert any("far outside the paper's recommended" in r.message and "2 / (1.0 * 16)" in r.message
               for r in caplog.records)
    logged = [m for m in metrics_lines(result) if "kto/kl" in m]
    assert logged and {"kto/rewards/label_accuracy", "sft/nll", "loss"} <= set(logged[-1])
    for m in logged:
        assert m["loss"] == pytest.approx(m["kto/loss"] + 0.5 * m["sft/loss"], rel=1e-5)


def test_kto_with_batch_size_one_trains_and_explains_the_kl_estimate(make_config, caplog):
    config = make_config("kto", steps=2)
    config["stages"][0]["train"]["batch_size"] = 1
    with caplog.at_level(logging.WARNING, logger="aligner"):
        result = train(config)
    messages = [r.message for r in caplog.records]
    assert any("batch_size 1" in m and "KL reference point" in m for m in messages)
    assert all(m["kl"] == 0.0 for m in metrics_lines(result) if "kl" in m)


def test_orpo_resolves_auto_reference_to_none(make_config):
    prepared = prepare_stage(load_config(make_config("orpo")), 0)
    assert prepared.reference_name == "none"
    assert not prepared.losses_need_reference


def test_reward_losses_cannot_mix_with_language_model_losses(make_config):
    config = make_config("reward_model")
    config["stages"][0]["losses"] = [{"name": "reward_model"}, {"name": "sft"}]
    with pytest.raises(ConfigError, match="different model forwards.*reward_model: reward.*sft: logprobs"):
        prepare_stage(load_config(config), 0)


def test_a_run_cannot_switch_from_language_model_to_reward_model(make_config, tmp_path):
    config = make_config("sft")
    reward_stage = {**config["stages"][0], "name": "rm", "losses": [{"name": "reward_model"}],
                    "data": {**config["stages"][0]["data"],
                             "train": str(write_jsonl(tmp_path / "p.jsonl", preference_rows(8)))}}
    config["stages"].append(reward_stage)
    with pytest.raises(ConfigError, match="same kind of model"):
        train(config)


def test_reward_model_with_lora_trains_adapters_and_the_score_head(make_config):
    from safetensors.torch import load_file

    config = make_config("reward_model", steps=2)
    config["stages"][0]["peft"] = {"name": "lora", "r": 4}
    result = train(config)
    # A LoRA stage saves its adapter; peft's SEQ_CLS task keeps the new score head in it, trained in full.
    adapter = json.loads((result.final_model_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    weights = load_file(str(result.final_model_dir / "adapter_model.safetensors"))
    assert any("lora_A" in key for key in weights)
    assert any(key.endswith("score.weight") for key in weights)


def test_margin_column_must_be_numeric(make_config, tmp_path):
    rows = preference_rows(4)
    rows[2] = {**rows[2], "margin": "big"}
    config = make_config("reward_model", rows=rows)
    with pytest.raises(DataError, match=r"line 3.*'margin' must be a number"):
        prepare_stage(load_config(config), 0)


def test_shipped_configs_load_and_start_with_their_command():
    for name in ("kto", "orpo", "reward_model", "dpo_sft"):
        path = ROOT / "configs" / f"{name}.yaml"
        assert path.read_text().splitlines()[0] == f"# aligner train configs/{name}.yaml"
        config = load_config(path)
        for index in range(len(config.stages)):
            prepare_stage(config, index)  # plugins resolve, options validate, data validates
        assert yaml.safe_load(path.read_text())["stages"]

