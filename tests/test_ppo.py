"""PPO: GAE, the clipped losses, KL estimators and controllers against hand-computed values; a LoRA
PPO stage that trains only adapter and value-head weights; config errors before any model loads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aligner.errors import ConfigError
from aligner.online.advantages import AdvantageInputs, masked_mean, masked_whiten, token_level_rewards
from aligner.online.advantages.gae import gae
from aligner.online.critic import explained_variance, value_loss
from aligner.online.kl import AdaptiveKLController, FixedKLController, kl_per_token
from aligner.online.policy_loss import policy_gradient_loss
from aligner.online.rewards import adjust_scores

from .conftest import tiny_model, write_jsonl
from .quickstart_sft import quickstart_rows, train_sft_model


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> str:
    """A small SFT'd quickstart model, trained once for this module."""
    return train_sft_model(tmp_path_factory.mktemp("sft"))


def test_gae_ignores_prompt_and_padding_columns():
    # Column 0 is prompt, column 3 padding: their values (9) must not leak into the completion's advantages.
    rewards = torch.tensor([[5.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 9.0]])
    mask = torch.tensor([[False, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2: 1 - 0.6 = 0.4 (episode ends); t=1: 0.9*0.6 - 0.5 + 0.45*0.4 = 0.22
    assert advantages.tolist()[0] == pytest.approx([0.0, 0.22, 0.4, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.0, 0.72, 1.0, 0.0])


def test_clipped_policy_loss_matches_hand_computed_value():
    logps = torch.log(torch.tensor([[0.5, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.9]]))
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    per_token, metrics = policy_gradient_loss(logps, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    loss = masked_mean(per_token, mask)
    # token 0: ratio 2, max(-2, -1.2) = -1.2 (clipped); token 1: ratio 1, loss 1; mean -0.1
    assert loss.item() == pytest.approx(-0.1)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    # k3 of KL(old || new) per token: (1/2 - 1) + log 2 on token 0, 0 on token 1
    assert metrics["approx_kl"].item() == pytest.approx((-0.5 + math.log(2)) / 2)


def test_clipped_value_loss_matches_hand_computed_value():
    values = torch.tensor([[1.0, 0.0]])
    old_values = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: clipped value 0.7 -> max(1.0, 1.69) = 1.69; token 1: 1.0; 0.5 * mean = 0.6725
    assert loss.item() == pytest.approx(0.6725)
    assert metrics["value_clip_fraction"].item() == pytest.approx(0.5)


def test_kl_estimators_match_hand_computed_values():
    policy = torch.log(torch.tensor([[0.5, 0.2]]))
    reference = torch.log(torch.tensor([[0.25, 0.2]]))
    mask = torch.tensor([[True, True]])
    log2 = math.log(2)
    assert kl_per_token(policy, reference, mask, "k1").tolist()[0] == pytest.approx([log2, 0.0])
    assert kl_per_token(policy, reference, mask, "k2").tolist()[0] == pytest.approx([log2**2 / 2, 0.0])
    # k3 = (ref/pi - 1) - log(ref/pi) = (0.5 - 1) + log 2
    assert kl_per_token(policy, reference, mask, "k3").tolist()[0] == pytest.approx([log2 - 0.5, 0.0], abs=1e-6)
    assert kl_per_token(policy, reference, torch.tensor([[False, True]]), "k1").tolist()[0] == [0.0, 0.0]


def test_adaptive_controller_moves_the_coefficient_towards_the_target():
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    controller.update(current_kl=3.0, n_steps=10)  # too far: error clipped to +0.2 -> coef * 1.02
    assert controller.value == pytest.approx(0.102)
    controller.update(current_kl=1.0, n_steps=10)  # on target: unchanged
    assert controller.value == pytest.approx(0.102)
    controller.update(current_kl=0.95, n_steps=50)  # a little below: error -0.05 -> coef * 0.975
    assert controller.value == pytest.approx(0.102 * 0.975)
    fixed = FixedKLController(0.1)
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.1


def test_rewards_put_the_score_on_the_last_completion_token():
    kl = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    inputs = AdvantageInputs(scores=torch.tensor([1.0, 2.0]), mask=mask, group_ids=torch.tensor([0, 1]),
                             token_rewards=-0.1 * kl)
    rewards = token_level_rewards(inputs)
    assert torch.allclose(rewards, torch.tensor([[0.0, -0.05, 0.95, 0.0], [0.0, 1.9, 0.0, 0.0]]))


def test_score_penalties_clipping_and_whitening():
    scores = torch.tensor([1.0, 1.0, 3.0])
    adjusted = adjust_scores(scores, torch.tensor([2, 4, 2]), torch.tensor([True, False, True]), length_penalty=0.1,
                             missing_eos_penalty=1.0, clip=2.0, whiten=False)
    assert adjusted.tolist() == pytest.approx([0.8, -0.4, 2.0])
    whitened = adjust_scores(scores, torch.tensor([1, 1, 1]), torch.tensor([True] * 3), length_penalty=0.0,
                             missing_eos_penalty=None, clip=None, whiten=True)
    assert whitened.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened.std().item() == pytest.approx(1.0, abs=1e-4)


def test_whitening_and_explained_variance_use_only_masked_positions():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    whitened = masked_whiten(values, mask)
    assert whitened[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened[0, 3].item() == 0.0
    returns = torch.tensor([[1.0, 2.0, 3.0, -50.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def _ppo_config(tmp_path, peft=None, judge=None, steps=2, reference="frozen_copy"):
    from .conftest import QUICKSTART_DATA

    prompts = [json.loads(line) for line in (QUICKSTART_DATA / "prompts_train.jsonl").read_text().splitlines()[:16]]
    held_out = [json.loads(line) for line in (QUICKSTART_DATA / "prompts_eval.jsonl").read_text().splitlines()[:8]]
    stage = {
        "name": "ppo",
        "data": {"train": str(write_jsonl(tmp_path / "prompts.jsonl", prompts)),
                 "eval": str(write_jsonl(tmp_path / "prompts_eval.jsonl", held_out)),
                 "template": "plain", "max_length": 48},
        "algorithm": {"name": "ppo", "judge": judge or {"name": "rule", "regex": "e"}, "max_new_tokens": 8,
                      "ppo_epochs": 2, "mini_batch_size": 4, "sample_every": 1},
        "reference": {"name": reference},
        "train": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-2},
        "eval": {"generate": {"judge": {"name": "rule", "regex": "e"}, "num_prompts": 8, "max_new_tokens": 8}},
    }
    if peft:
        stage["peft"] = peft
    return {"output_dir": str(tmp_path / "run"), "seed": 0, "model": tiny_model(), "tokenizer": "builtin",
            "stages": [stage]}


def _save_reward_model(directory) -> str:
    """A randomly initialised tiny sequence classifier and its tokenizer, saved like a trained one."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _weight_watcher(snapshots: dict) -> type:
    """A plugin class that stores every weight at the stage's start and end into ``snapshots``."""
    from aligner import hookimpl

    class Watch:
        @hookimpl
        def on_run_start(self, run):
            snapshots["start"] = {k: v.detach().clone() for k, v in run.model.named_parameters()}

        @hookimpl
        def on_run_end(self, run, metrics):
            snapshots["end"] = {k: v.detach().clone() for k, v in run.model.named_parameters()}

    return Watch


@pytest.mark.parametrize("reference", ["frozen_copy", "auto"])
def test_lora_ppo_changes_only_adapter_and_value_head_weights(tmp_path, reference):
    """LoRA PPO scored by a reward_model judge loaded from disk: only adapters and the value head train.

    ``auto`` resolves to ``disabled_adapter`` for online LoRA training: no second copy of the base.
    """
    from aligner.api import train
    from aligner.plugins import temporary_plugin

    snapshots: dict = {}
    Watch = _weight_watcher(snapshots)

    with temporary_plugin(Watch(), "watch"):
        judge = {"name": "reward_model", "path": _save_reward_model(tmp_path / "rm")}
        result = train(_ppo_config(tmp_path, peft={"name": "lora", "r": 4}, judge=judge, reference=reference))
    start, end = snapshots["start"], snapshots["end"]
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    adapters = {k for k in start if "lora_" in k}
    heads = {k for k in start if k.startswith("value_head.")}
    assert changed, "no weight changed"
    assert changed <= adapters | heads, f"frozen weights changed: {sorted(changed - adapters - heads)[:3]}"
    assert changed & adapters and changed & heads

    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if "policy_loss" in r]
    assert len(train_steps) == 2
    for key in ("reward/mean", "reward/std", "kl", "kl_coef", "entropy", "policy_loss", "value_loss",
                "clip_fraction", "approx_kl", "explained_variance", "response_length"):
        assert key in train_steps[-1], key
    assert any("eval/judge_score" in r for r in records)
    stage_dir = result.output_dir / "ppo"
    assert (stage_dir / "samples" / "rollout-step-1.jsonl").is_file()
    assert (stage_dir / "final" / "value_head.safetensors").is_file()
    assert (stage_dir / "final" / "adapter_model.safetensors").is_file()


def test_a_bad_judge_fails_before_any_model_loads(tmp_path):
    from aligner.config import load_config
    from aligner.training.stages import prepare_stages

    config = load_config(_ppo_config(tmp_path, judge={"name": "rule", "regexp": "x"}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.algorithm\.judge.*regexp"):
        prepare_stages(config)
    config = load_config(_ppo_config(tmp_path, judge={"name": "nope"}))
    with pytest.raises(ConfigError, match=r"unknown judge 'nope' at 'stages\[0\]\.algorithm\.judge'"):
        prepare_stages(config)


def test_ppo_with_a_rule_judge_raises_the_held_out_behaviour_score(sft_model, tmp_path):
    """A short PPO stage from a small SFT'd quickstart model: the held-out judge score rises, KL stays bounded."""
    from aligner.api import train

    judge = {"name": "rule", "callable": "aligner.quickstart.task:behaviour_score"}
    stage = {
        "name": "ppo",
        "data": {"train": str(write_jsonl(tmp_path / "p.jsonl", quickstart_rows("prompts_train.jsonl", 512))),
                 "eval": str(write_jsonl(tmp_path / "e.jsonl", quickstart_rows("prompts_eval.jsonl", 100))),
                 "template": "plain", "max_length": 48},
        "algorithm": {"name": "ppo", "judge": judge, "max_new_tokens": 12, "kl_coef": 0.1, "kl_target": 1.0,
                      "kl_horizon": 256, "ppo_epochs": 2, "mini_batch_size": 16, "max_approx_kl": 0.05,
                      "sample_every": 100},
        "reference": {"name": "frozen_copy"},
        "train": {"max_steps": 10, "batch_size": 64, "learning_rate": 1e-4, "lr_scheduler": "constant"},
        "eval": {"generate": {"judge": judge, "num_prompts": 100, "max_new_tokens": 12}},
    }
    result = train({"output_dir": str(tmp_path / "run"), "seed": 0, "model": {"path": sft_model},
                    "tokenizer": "builtin", "stages": [stage]})
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    scores = [r["eval/judge_score"] for r in records if "eval/judge_score" in r]
    kls = [r["kl"] for r in records if "kl" in r]
    print("held-out score", scores, "kl", [round(k, 2) for k in kls])
    assert scores[-1] >= scores[0] + 0.2
    assert max(kls) < 5.0


def test_a_reference_without_per_token_logprobs_is_refused(tmp_path):
    from aligner import hookimpl
    from aligner.api import train
    from aligner.plugins import temporary_plugin
    from aligner.references.frozen_copy import FrozenCopyReference

    class SequenceOnly(FrozenCopyReference):
        name = "sequence_only"

        def logprobs(self, batch):
            return super().logprobs(batch)

    class Plugin:
        @hookimpl
        def register_reference_policies(self, register):
            register(SequenceOnly)

    config = _ppo_config(tmp_path)
    config["stages"][0]["reference"] = {"name": "sequence_only"}
    with temporary_plugin(Plugin(), "sequence-only"), pytest.raises(ConfigError, match="per-token"):
        train(config)


def test_ppo_stage_ends_like_every_stage_metrics_from_hooks_and_a_model_card(tmp_path):
    """PPO shares the loop's evaluation logging and final save: hook-added metrics are written."""
    from aligner import hookimpl
    from aligner.api import train
    from aligner.plugins import temporary_plugin

    class AddMetric:
        @hookimpl
        def on_evaluate(self, run, step, metrics):
            metrics["eval/extra"] = float(step)

    with temporary_plugin(AddMetric(), "add-metric"):
        result = train(_ppo_config(tmp_path, steps=1))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/extra" in r] == [0, 1]
    card = (result.final_model_dir / "README.md").read_text()
    assert "**Algorithm:** ppo" in card
    assert (result.final_model_dir / "value_head.safetensors").is_file()


def test_prompts_leave_room_for_generation_within_max_length(tmp_path):
    """Prompt + max_new_tokens never exceed data.max_length; no room at all is a config error."""
    from aligner.api import tokenize_stage, train
    from aligner.config import load_config
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
    from aligner.training.stages import prepare_stages

    config = _ppo_config(tmp_path)
    config["stages"][0]["data"]["max_length"] = 14  # 8 generated tokens leave 6 for the prompt
    (stage,) = prepare_stages(load_config(config))
    tokenize_stage(stage, load_builtin_tokenizer())
    lengths = [len(e["prompt_ids"]) for e in stage.train_data.examples]
    assert max(lengths) == 6 and stage.train_data.truncated_rows > 0
    config["stages"][0]["data"]["max_length"] = 8
    with pytest.raises(ConfigError, match=r"max_new_tokens 8 leaves no room for a prompt within "
                                          r"'stages\[0\]\.data\.max_length' \(8\)"):
        train(config)
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_qlora_ppo_trains_adapters_and_value_head_only(tmp_path):
    """PPO on a 4-bit base (QLoRA): rollouts, the disabled-adapter reference and updates all run in
    eval/train mode switches that trigger bitsandbytes' CPU repacking; the guard keeps gradients."""
    pytest.importorskip("bitsandbytes")
    from aligner.api import train
    from aligner.plugins import temporary_plugin

    snapshots: dict = {}
    Watch = _weight_watcher(snapshots)

    with temporary_plugin(Watch(), "watch"):
        result = train(_ppo_config(tmp_path, peft={"name": "qlora", "r": 4}, reference="auto", steps=3))
    start, end = snapshots["start"], snapshots["end"]
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    adapters = {k for k in start if "lora_" in k}
    heads = {k for k in start if k.startswith("value_head.")}
    assert changed <= adapters | heads, f"frozen weights changed: {sorted(changed - adapters - heads)[:3]}"
    # every LoRA B matrix (zero at the start) has moved: gradients reached every adapter through the 4-bit layers
    assert {k for k in adapters if "lora_B" in k} <= changed
    assert heads <= changed
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["policy_loss"]) for r in records if "policy_loss" in r)


def test_data_check_applies_the_same_prompt_room_as_training(tmp_path):
    from aligner.data.check import check_data

    config = _ppo_config(tmp_path)
    config["stages"][0]["data"]["max_length"] = 14  # 8 generated tokens leave 6 for the prompt
    train_report = check_data(config)[0]
    assert train_report.truncated > 0 and train_report.max_prompt_length == 6
    config["stages"][0]["data"]["max_length"] = 8
    assert any("leaves no room for a prompt" in p for p in check_data(config)[0].problems)
