"""Rollout generation: the sampler draws what ``transformers``' ``generate`` draws, prefills each prompt
once per group, stops when every row has ended and returns the model's log-probs; generation engines
are a plugin kind; the trainer/generator log-prob gap is logged and can be corrected for."""

from __future__ import annotations

import json
import math

import pytest
import torch

import aligner
from aligner.errors import ConfigError
from aligner.online import sampler
from aligner.online.engines import GenerationEngine, Generations
from aligner.online.engines.hf import HFEngine
from aligner.online.policy_loss import logp_gap, truncated_importance_weights
from aligner.plugins import temporary_plugin

from .test_online_algorithms import online_config, train_steps


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from aligner.config import TinyModelConfig
    from aligner.modeling.loading import build_tiny_model
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
                             tokenizer, torch.float32)
    return model, tokenizer


def random_prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 200, (int(length),), generator=g).tolist()
            for length in torch.randint(3, 15, (n,), generator=g)]


def reference_generate(model, tokenizer, prompts: list[list[int]], repeats: int, **sampling) -> list[list[int]]:
    """``transformers``' own ``generate`` on the prompts repeated ``repeats`` times, cut after EOS."""
    rows = [p for p in prompts for _ in range(repeats)]
    width = max(len(p) for p in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, do_sample=True, top_k=0, **sampling)
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, width:].tolist()]


@pytest.mark.parametrize("repeats", [1, 4])
def test_the_sampler_draws_the_tokens_generate_draws_with_the_same_seed(model_and_tokenizer, repeats):
    model, tokenizer = model_and_tokenizer
    prompts = random_prompts(5)
    torch.manual_seed(3)
    expected = reference_generate(model, tokenizer, prompts, repeats, max_new_tokens=12, temperature=0.8, top_p=0.9)
    torch.manual_seed(3)
    got = sampler.sample(model, tokenizer, prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, batch_size=64,
                         samples_per_prompt=repeats)
    assert got.completions == expected
    if repeats > 1:
        assert len({tuple(c) for c in got.completions}) > len(prompts)  # sampled, not one answer per prompt


def test_each_prompt_is_prefilled_once_per_group(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = random_prompts(3)
    inputs: list[tuple[int, int]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: inputs.append(tuple(args[0].shape)))
    try:
        sampler.sample(model, tokenizer, prompts, max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=64,
                       samples_per_prompt=8)
    finally:
        hook.remove()
    width = max(len(p) for p in prompts)
    assert inputs[0] == (3, width)  # the prefill: 3 prompts, not 24 rows
    assert all(shape == (24, 1) for shape in inputs[1:])  # then one token per sample and step


def test_the_returned_logprobs_are_the_models_own(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = random_prompts(4)
    got = sampler.sample(model, tokenizer, prompts, max_new_tokens=10, temperature=1.3, top_p=0.8, batch_size=3,
                         samples_per_prompt=2)
    for i, (completion, logps) in enumerate(zip(got.completions, got.logprobs, strict=True)):
        prompt = prompts[i // 2]
        with torch.no_grad():
            scores = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        # Raw log-probs (temperature and top-p change what is drawn, not what is reported).
        expected = [float(scores[len(prompt) - 1 + t, token]) for t, token in enumerate(completion)]
        assert logps == pytest.approx(expected, abs=1e-4)


def test_decoding_stops_once_every_row_has_ended(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(1))
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[eos] = 1e4  # every row ends at its first token
    try:
        got = sampler.sample(model, tokenizer, random_prompts(4), max_new_tokens=20, temperature=1.0, top_p=1.0,
                             batch_size=64, samples_per_prompt=2)
    finally:
        hook.remove()
        model.lm_head.bias = None
    assert got.completions == [[eos]] * 8
    assert len(calls) == 1  # the prefill only: no step after every row has ended


def test_greedy_sampling_is_deterministic(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = random_prompts(3)
    first = sampler.sample(model, tokenizer, prompts, max_new_tokens=8, temperature=0.0, top_p=1.0, batch_size=64,
                           samples_per_prompt=3)
    assert all(first.completions[i] == first.completions[i - i % 3] for i in range(9))


def test_logp_gap_and_truncated_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    generator = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # |0.5|, |-1|, 0, |1|, 0 over the 5 masked tokens
    assert float(logp_gap(trainer, generator, mask)["logp_diff"]) == pytest.approx(2.5 / 5)
    weights, metrics = truncated_importance_weights(trainer, generator, mask, level="token", cap=2.0)
    assert weights[0].tolist() == pytest.approx([math.exp(0.5), math.exp(-1.0), 1.0])
    assert weights[1, :2].tolist() == pytest.approx([2.0, 1.0])  # e^1 truncated at the cap
    assert float(metrics["is_truncated_fraction"]) == pytest.approx(1 / 5)
    weights, _ = truncated_importance_weights(trainer, generator, mask, level="sequence", cap=2.0)
    assert weights[0].tolist() == pytest.approx([math.exp(-0.5)] * 3)  # 0.5 - 1 + 0: one weight per row
    assert weights[1].tolist() == pytest.approx([2.0] * 3)  # e^1 truncated; the masked token is ignored


class ShiftedEngine(GenerationEngine):
    """The hf engine's samples with the reported log-probs shifted by ``shift``."""

    name = "shifted"

    class Options(aligner.protocols.Options):
        shift: float = 0.5

    requests: list = []

    def generate(self, policy, tokenizer, request):
        ShiftedEngine.requests.append(request)
        sampled = HFEngine(HFEngine.Options()).generate(policy, tokenizer, request)
        return Generations(sampled.completion_ids, [[lp - self.options.shift for lp in row] for row in sampled.logprobs])


class EnginePlugin:
    @aligner.hookimpl
    def register_generation_engines(self, register):
        register(ShiftedEngine)


def test_register_generation_engines_adds_an_engine_a_stage_samples_with(tmp_path):
    ShiftedEngine.requests.clear()
    algorithm = {"name": "grpo", "group_size": 4, "engine": {"name": "shifted", "shift": 0.5}}
    with temporary_plugin(EnginePlugin(), "shifted"):
        result = aligner.train(online_config(tmp_path, algorithm, steps=2, batch_size=2))
    assert [(len(r.prompt_ids), r.samples_per_prompt, r.policy_version) for r in ShiftedEngine.requests] == \
        [(2, 4, 0), (2, 4, 1)]
    steps = train_steps(result)
    # The trainer's log-probs are the hf engine's, so the gap is exactly the engine's shift.
    assert [s["rollout/logp_diff"] for s in steps] == pytest.approx([0.5, 0.5], abs=1e-4)


def test_the_hf_engine_agrees_with_the_trainer_and_importance_correction_trains(tmp_path):
    algorithm = {"name": "grpo", "group_size": 4, "importance_correction": "sequence"}
    steps = train_steps(aligner.train(online_config(tmp_path, algorithm, steps=2, batch_size=2)))
    assert all(s["rollout/logp_diff"] < 1e-4 for s in steps)
    assert all(s["rollout/is_weight"] == pytest.approx(1.0, abs=1e-3) for s in steps)


def test_importance_correction_downweights_tokens_the_generator_overrated(tmp_path):
    """With a generator whose log-probs are 1 nat too high, every token's ratio is e^-1: the truncated
    IS weights scale the policy loss (and its gradient) by that factor."""
    losses = {}
    for correction in ("none", "token"):
        algorithm = {"name": "grpo", "group_size": 4, "engine": {"name": "shifted", "shift": -1.0},
                     "importance_correction": correction}
        with temporary_plugin(EnginePlugin(), "shifted"):
            steps = train_steps(aligner.train(online_config(tmp_path / correction, algorithm, steps=1,
                                                            batch_size=2)))
        losses[correction] = steps[0]
    assert losses["token"]["rollout/is_weight"] == pytest.approx(math.exp(-1.0), rel=1e-3)
    assert losses["token"]["loss"] == pytest.approx(losses["none"]["loss"] * math.exp(-1.0), rel=1e-3, abs=1e-7)
    assert losses["token"]["grad_norm"] == pytest.approx(losses["none"]["grad_norm"] * math.exp(-1.0), rel=1e-3)


def test_engine_config_errors_name_the_key(tmp_path):
    from aligner.config import load_config
    from aligner.training.stages import prepare_stages

    cases = [({"name": "grpo", "engine": {"name": "hff"}}, r"generation engine 'hff' at 'stages\[0\]\.algorithm\.engine' \(did you mean 'hf'\?\)"),
             ({"name": "grpo", "engine": {"name": "hf", "speed": 2}}, r"stages\[0\]\.algorithm.*engine\.speed"),
             ({"name": "grpo", "engine": "hf"}, r"stages\[0\]\.algorithm\.engine.*valid dictionary")]
    for algorithm, message in cases:
        with pytest.raises(ConfigError, match=message):
            prepare_stages(load_config(online_config(tmp_path, algorithm)))


def test_rollout_samples_record_what_the_engine_returned(tmp_path):
    algorithm = {"name": "grpo", "group_size": 2, "sample_every": 1}
    result = aligner.train(online_config(tmp_path, algorithm, steps=1, batch_size=2))
    rows = [json.loads(line) for line in (result.output_dir / "grpo" / "samples" / "rollout-step-1.jsonl")
            .read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"]


@pytest.mark.parametrize("algorithm", [{"name": "online_dpo"}, {"name": "ppo", "ppo_epochs": 1, "mini_batch_size": 4}])
def test_every_online_algorithm_logs_the_trainer_generator_gap(tmp_path, algorithm):
    config = online_config(tmp_path, algorithm, steps=1, batch_size=4)
    if algorithm["name"] == "online_dpo":
        config["stages"][0]["losses"] = [{"name": "dpo"}]
    (step,) = train_steps(aligner.train(config))
    assert 0 <= step["rollout/logp_diff"] < 1e-4  # the hf engine: the trainer scores what it sampled
