"""Training end to end on tiny models: weights move, masks hold, stages chain, outputs load."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import aligner
from aligner.config import load_config
from aligner.modeling.loading import build_tiny_model, load_tokenizer
from aligner.modeling.logprobs import completion_logprobs

from .conftest import preference_rows, sft_rows, tiny_model


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_sft_trains_and_writes_a_loadable_model_config_and_metrics(make_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = aligner.train(make_config("sft", steps=3, eval_rows=sft_rows(4)))
    out = result.output_dir
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["stages"][0]["train"]["max_steps"] == 3 and resolved["stages"][0]["train"]["learning_rate"] == 1e-3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert {"learning_rate", "tokens_per_second", "nll", "grad_norm"} <= set(steps[0])
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    model = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_model_dir)
    assert model.config.hidden_size == 32 and tokenizer.eos_token == "</s>"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["sft"]["train/loss"] == result.final_metrics["train/loss"]


def test_loss_depends_only_on_completion_tokens():
    config = load_config({"model": tiny_model(), "tokenizer": "builtin",
                          "stages": [{"name": "s", "data": {"train": __file__}, "losses": [{"name": "sft"}]}]})
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = build_tiny_model(config.model.tiny, tokenizer, torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 1]]), "prompt_lengths": torch.tensor([3])}
    fast = completion_logprobs(model, batch)
    logits = model(input_ids=ids).logits.log_softmax(-1)
    by_hand = sum(logits[0, t - 1, ids[0, t]] for t in (3, 4, 5))
    assert fast.logps.item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert fast.num_tokens.item() == 3
    # Padding after the completion changes nothing.
    padded = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 6 + [0, 0]]),
              "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]]), "prompt_lengths": torch.tensor([3])}
    assert completion_logprobs(model, padded).logps.item() == pytest.approx(fast.logps.item(), abs=1e-5)


def test_dpo_moves_the_policy_and_not_the_frozen_reference(make_config):
    from aligner.references.frozen_copy import FrozenCopyReference

    snapshots = {}
    original_setup = FrozenCopyReference.setup

    def spy(self, context):
        original_setup(self, context)
        snapshots["reference"] = self.model
        snapshots["start"] = {k: v.clone() for k, v in self.model.state_dict().items()}

    FrozenCopyReference.setup = spy
    try:
        result = aligner.train(make_config("dpo", steps=3, reference={"name": "frozen_copy"},
                                           eval_rows=preference_rows(8)))
    finally:
        FrozenCopyReference.setup = original_setup
    after = weights(result.final_model_dir)
    reference_now = snapshots["reference"].state_dict()
    assert all(torch.equal(reference_now[k], v) for k, v in snapshots["start"].items())
    changed = [k for k in after if not torch.equal(after[k], snapshots["start"][k])]
    assert changed, "the policy did not change"
    metrics = result.final_metrics
    assert metrics["train/rewards/margins"] > 0
    assert {"eval/rewards/accuracies", "eval/logps/chosen", "train/learning_rate"} <= set(metrics)


def test_ipo_runs_with_auto_reference(make_config):
    result = aligner.train(make_config("ipo", steps=2))
    assert result.final_metrics["train/loss"] > 0


def test_two_stages_chain_from_sft_to_dpo(make_config, tmp_path):
    from .conftest import write_jsonl

    config = make_config("dpo", steps=2)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    sft_stage = {"name": "sft", "data": {"train": str(sft_data), "template": "plain"}, "losses": [{"name": "sft"}],
                 "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2}}
    config["stages"].insert(0, sft_stage)
    result = aligner.train(config)
    sft_final = weights(result.output_dir / "sft" / "final")
    dpo_final = weights(result.output_dir / "dpo" / "final")
    assert set(result.metrics) == {"sft", "dpo"}
    assert any(not torch.equal(sft_final[k], dpo_final[k]) for k in sft_final)


def test_a_model_saved_to_a_directory_trains_from_its_path(make_config, tmp_path):
    config = load_config({"model": tiny_model(), "tokenizer": "builtin",
                          "stages": [{"name": "s", "data": {"train": __file__}, "losses": [{"name": "sft"}]}]})
    tokenizer = load_tokenizer(config)
    model = build_tiny_model(config.model.tiny, tokenizer, torch.float32)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run = make_config("sft", steps=2)
    run["model"] = {"path": str(tmp_path / "base")}
    run.pop("tokenizer")
    result = aligner.train(run)
    before, after = weights(tmp_path / "base"), weights(result.final_model_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lora_stage_trains_only_adapters(make_config):
    config = make_config("dpo", steps=2, peft={"name": "lora", "r": 4, "alpha": 8})
    result = aligner.train(config)
    saved = load_file(str(result.final_model_dir / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_gradient_accumulation_takes_several_micro_batches_per_step(make_config):
    from aligner.losses.sft import SFTLoss
    from aligner.plugins import temporary_plugin

    rows_seen: list[int] = []

    class CountingSFT(SFTLoss):
        name = "counting_sft"

        def compute(self, inputs):
            rows_seen.append(len(inputs.batch["row_ids"]))
            return super().compute(inputs)

    class Plugin:
        @aligner.hookimpl
        def register_losses(self, register):
            register(CountingSFT)

    config = make_config("sft", losses=[{"name": "counting_sft"}],
                         train={"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 3})
    with temporary_plugin(Plugin(), "counting"):
        result = aligner.train(config)
    assert rows_seen == [2] * 9  # 3 steps x 3 micro-batches of 2 rows
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_the_logged_learning_rate_is_the_one_the_step_used(make_config):
    """Linear warmup over 2 of 4 steps, then linear decay: the schedule steps after each update, so the
    rates the four updates use are 0, lr/2, lr, lr/2; metrics must show those, not the next step's."""
    config = make_config("sft", steps=4)
    config["stages"][0]["train"].update(lr_scheduler="linear", warmup_ratio=0.5, learning_rate=1e-3)
    result = aligner.train(config)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["learning_rate"] for r in records if "learning_rate" in r]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
