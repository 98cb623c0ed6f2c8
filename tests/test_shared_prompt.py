"""Preference pairs run with their prompt once: the same log-probs and gradients as two rows per pair."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from aligner import train
from aligner.data.batching import collate
from aligner.modeling.logprobs import (
    can_share_prompts,
    chunked_completion_logprobs,
    decoder_and_head,
    forward_layout,
)
from aligner.modeling.segment_attention import ENV as SEGMENTS_ENV
from aligner.modeling.shared_prompt import pack_pairs

VOCAB = 300
PAD = 0


@pytest.fixture(params=["segments", "dense"])
def attention_path(request, monkeypatch) -> str:
    """Packed rows with segment-by-segment attention (no mask; the CPU default) or a dense 4D mask."""
    monkeypatch.setenv(SEGMENTS_ENV, "1" if request.param == "segments" else "0")
    return request.param


def _model(attn: str = "sdpa", family: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.config._attn_implementation = attn
    return model


def _examples() -> list[dict]:
    """Pairs with prompts of 1 to 7 tokens and chosen/rejected completions of unequal lengths."""
    generator = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    shapes = [(5, 4, 7), (1, 6, 2), (7, 3, 3), (2, 1, 9)]  # (prompt, chosen, rejected) lengths
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "row_id": i}
            for i, (p, c, r) in enumerate(shapes)]


def _run(model: torch.nn.Module, batch: dict, weights: torch.Tensor):
    parts = decoder_and_head(model)
    out = chunked_completion_logprobs(*parts, batch, token_level=True)
    model.zero_grad(set_to_none=True)
    (out.logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("attn,family", [("sdpa", "llama"), ("eager", "llama"), ("sdpa", "qwen2")])
def test_shared_prompt_gives_the_two_row_values_and_gradients(attn, family, attention_path):
    model = _model(attn, family)
    examples = _examples()
    two_rows = collate(examples, "preference", PAD)
    shared = collate(examples, "preference", PAD, share_prompt=True)
    assert shared["share_prompt"] and "share_prompt" not in two_rows
    packed = pack_pairs(shared, decoder_and_head(model)[0])
    assert packed is not None and (packed.segments is not None) == (attention_path == "segments")
    weights = torch.linspace(-2.0, 3.0, 8)
    expected, expected_grads = _run(model, two_rows, weights)
    got, got_grads = _run(model, shared, weights)
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.token_logps, expected.token_logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.mask, expected.mask) and torch.equal(got.num_tokens, expected.num_tokens)
    assert set(got_grads) == set(expected_grads) and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rejected_tokens_never_see_the_chosen_ones(attention_path):
    model = _model().eval()
    examples = _examples()
    parts = decoder_and_head(model)
    before = chunked_completion_logprobs(*parts, collate(examples, "preference", PAD, share_prompt=True))
    for e in examples:
        e["chosen_ids"] = [(t * 7 + 1) % VOCAB for t in e["chosen_ids"]]
    after = chunked_completion_logprobs(*parts, collate(examples, "preference", PAD, share_prompt=True))
    assert not torch.allclose(before.logps[:4], after.logps[:4])  # chosen changed
    torch.testing.assert_close(before.logps[4:], after.logps[4:], atol=1e-6, rtol=0)  # rejected did not


def test_the_packed_layout_holds_each_prompt_once_and_pads_only_to_the_longest_pair():
    model = _model()
    examples = _examples()
    batch = collate(examples, "preference", PAD, share_prompt=True)
    packed = pack_pairs(batch, decoder_and_head(model)[0])
    totals = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    assert packed.input_ids.shape == (4, max(totals))
    first = examples[0]
    assert packed.input_ids[0, :16].tolist() == first["prompt_ids"] + first["chosen_ids"] + first["rejected_ids"]
    assert packed.position_ids[0, :16].tolist() == list(range(9)) + list(range(5, 12))
    # on CPU: (prompt, (chosen, rejected)) per pair for segment-by-segment attention, and no dense mask
    assert packed.attention_mask is None
    assert packed.segments.rows == ((5, (4, 7)), (1, (6, 2)), (7, (3, 3)), (2, (1, 9)))
    assert forward_layout(model, batch) == (sum(totals), 4 * max(totals))
    two_rows = collate(examples, "preference", PAD)
    assert forward_layout(model, two_rows) == (int(two_rows["attention_mask"].sum()), two_rows["input_ids"].numel())


def test_batches_it_does_not_apply_to_use_two_rows():
    model = _model()
    decoder = decoder_and_head(model)[0]
    examples = _examples()
    batch = collate(examples, "preference", PAD, share_prompt=True)
    odd = {k: (v[:7] if isinstance(v, torch.Tensor) and k != "row_ids" else v) for k, v in batch.items()}
    assert pack_pairs(odd, decoder) is None  # not whole pairs
    different = dict(batch, input_ids=batch["input_ids"].clone())
    different["input_ids"][5, 0] += 1  # the rejected row of pair 1 has another prompt
    assert pack_pairs(different, decoder) is None
    model.config.sliding_window = 8  # a packed row is longer than the window: the custom mask would be wrong
    assert pack_pairs(batch, decoder) is None
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"  # takes no arbitrary mask
    assert pack_pairs(batch, decoder) is None and not can_share_prompts(model)
    # and the log-probs then still come from the two-row layout
    model.config._attn_implementation = "sdpa"
    assert can_share_prompts(model)


def test_lora_model_shares_prompts_with_the_same_gradients(attention_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj", "lm_head"]))
    assert can_share_prompts(model)
    weights = torch.linspace(-2.0, 3.0, 8)
    expected, expected_grads = _run(model, collate(_examples(), "preference", PAD), weights)
    got, got_grads = _run(model, collate(_examples(), "preference", PAD, share_prompt=True), weights)
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)
    assert set(got_grads) == set(expected_grads) and all("lora" in n for n in got_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dpo_run_with_and_without_shared_prompts_trains_the_same(make_config, tmp_path, monkeypatch):
    """The same batches (no length grouping, so both see one order): the same per-step losses."""
    import json

    import aligner.modeling.logprobs

    packed_batches = []

    def counting(batch, decoder):
        packed = pack_pairs(batch, decoder)
        packed_batches.append(packed is not None)
        return packed

    monkeypatch.setattr(aligner.modeling.logprobs, "pack_pairs", counting)
    losses = {}
    for share in (True, False):
        config = make_config("dpo", steps=3, reference={"name": "frozen_copy"})
        config["output_dir"] = str(tmp_path / f"run-{share}")
        config["stages"][0]["train"].update(share_prompt=share, group_by_length=False)
        result = train(config)
        lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        losses[share] = [m["loss"] for m in lines if "loss" in m]
        padding = result.metrics["dpo"]["train/padding_fraction"]
        assert 0.0 <= padding < 0.6
        # with sharing every forward (reference pass, training steps) ran packed; without, none did
        assert (len(packed_batches) > 0 and all(packed_batches)) if share else not any(packed_batches)
        packed_batches.clear()
    assert len(losses[True]) == 3
    for a, b in zip(losses[True], losses[False], strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_reward_model_scores_and_gradients_match_its_own_forward(lora, attention_path):
    from transformers import LlamaForSequenceClassification

    from aligner.modeling.reward_scores import decoder_and_score, sequence_scores

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=PAD))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]))
    assert decoder_and_score(model) is not None
    shared = collate(_examples(), "preference", PAD, share_prompt=True)
    assert forward_layout(model, shared, "reward")[1] < shared["input_ids"].numel()  # packed rows counted
    assert forward_layout(model, shared)[1] == shared["input_ids"].numel()  # not an LM: no packed LM forward
    weights = torch.linspace(-1.0, 2.0, 8)
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        scores = sequence_scores(model, collate(_examples(), "preference", PAD, share_prompt=share))
        (scores * weights).sum().backward()
        results.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (got, got_grads) = results
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert set(got_grads) == set(expected_grads) and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_reward_model_training_runs_pairs_packed_and_reports_that_layout(make_config, caplog):
    import logging

    config = make_config("reward_model", steps=2)
    with caplog.at_level(logging.INFO, logger="aligner"):
        result = train(config)
    assert "each preference pair runs as one row holding its prompt once" in caplog.text
    assert 0.0 <= result.metrics["reward_model"]["train/padding_fraction"] < 0.5
