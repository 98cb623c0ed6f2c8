"""Segment-by-segment attention over packed rows (``aligner.modeling.segment_attention``): no dense mask,
the values and gradients of the unpacked rows, also under gradient checkpointing and LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aligner.data.batching import collate
from aligner.data.packing import pack_sequences
from aligner.modeling.loading import set_gradient_checkpointing
from aligner.modeling.logprobs import chunked_completion_logprobs, decoder_and_head
from aligner.modeling.segment_attention import (
    ENV,
    IMPLEMENTATION,
    SegmentLayout,
    packed_attention,
    register,
    segment_attention_forward,
    segments_apply,
)
from aligner.modeling.shared_prompt import pack_groups, pack_pairs

from .test_shared_prompt import PAD, VOCAB, _model
from .test_shared_prompt import _examples as _pairs
from .test_shared_prompt_groups import _rollout, _unmarked

# (prompt, completion) lengths of SFT rows
SFT_SHAPES = [(5, 12), (1, 3), (7, 2), (2, 9), (3, 4), (4, 1)]


@pytest.fixture(autouse=True)
def _segments_on(monkeypatch):
    monkeypatch.setenv(ENV, "1")


def _sft_examples() -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [{"prompt_ids": torch.randint(1, VOCAB, (p,), generator=generator).tolist(),
             "completion_ids": torch.randint(1, VOCAB, (c,), generator=generator).tolist(), "row_id": i}
            for i, (p, c) in enumerate(SFT_SHAPES)]


def _dense_reference(query, key, value, layout: SegmentLayout, scaling: float) -> torch.Tensor:
    """The layout as one dense boolean mask (padding queries see every real key), through plain SDPA."""
    rows, width = query.shape[0], query.shape[2]
    allowed = torch.zeros(rows, width, width, dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, (prompt, segments) in enumerate(layout.rows):
        segment = torch.full((width,), -1)
        segment[:prompt] = 0
        start = prompt
        for i, n in enumerate(segments):
            segment[start:start + n] = i + 1
            start += n
        real = segment >= 0
        q, k = segment[:, None], segment[None, :]
        allowed[r] = causal & real[None, :] & ((k == 0) | (k == q) | ~real[:, None])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling).transpose(1, 2)


@pytest.mark.parametrize("rows", [
    ((0, (4, 1, 6)),),  # SFT packing: independent sequences, then padding
    ((5, (3, 6, 2)), (2, (6,))),  # shared prompts: short completions (masked), long ones (replayed)
    ((7, (7, 1)), (0, (3, 3)), (1, ())),  # a completion as long as its prompt; a row that is all prompt
])
def test_the_attention_function_equals_the_dense_mask_in_values_and_gradients(rows):
    layout = SegmentLayout(rows=rows, width=16)
    torch.manual_seed(0)
    shape = (len(rows), 4, 16, 8)
    query = torch.randn(shape, requires_grad=True)
    key, value = (torch.randn(len(rows), 2, 16, 8, requires_grad=True) for _ in range(2))
    real = torch.zeros(len(rows), 16, dtype=torch.bool)
    for r, total in enumerate(layout.totals()):
        real[r, :total] = True
    weights = torch.randn(len(rows), 16, 4, 8) * real[:, :, None, None]  # padding outputs are never read

    def run(fn):
        out = fn()
        grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
        return out * real[:, :, None, None], grads

    got, got_grads = run(lambda: segment_attention_forward(None, query, key, value, None, scaling=0.3,
                                                           aligner_segments=layout)[0])
    expected, expected_grads = run(lambda: _dense_reference(query, key, value, layout, 0.3))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def _grads_and_logps(model: torch.nn.Module, batch: dict, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = chunked_completion_logprobs(*decoder_and_head(model), batch, token_level=True)
    (out.logps * weights).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_run(model: torch.nn.Module, unpacked: dict, packed: dict) -> None:
    weights = torch.linspace(-2.0, 3.0, unpacked["input_ids"].shape[0])
    expected, expected_grads = _grads_and_logps(model, unpacked, weights)
    got, got_grads = _grads_and_logps(model, packed, weights)
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.token_logps, expected.token_logps, atol=1e-5, rtol=1e-5)
    assert set(got_grads) == set(expected_grads) and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _layouts() -> dict[str, tuple[dict, dict]]:
    """(unpacked, packed) batches of each layout: SFT packing, preference pairs, rollout groups."""
    sft = _sft_examples()
    rollout = _rollout()
    return {"sft": (collate(sft, "sft", PAD), collate(sft, "sft", PAD, packing=True)),
            "pairs": (collate(_pairs(), "preference", PAD), collate(_pairs(), "preference", PAD, share_prompt=True)),
            "groups": (_unmarked(rollout), rollout)}


@pytest.mark.parametrize("layout", ["sft", "pairs", "groups"])
@pytest.mark.parametrize("attn,family", [("sdpa", "llama"), ("eager", "qwen2")])
def test_gradient_checkpointing_recomputes_with_segments(layout, attn, family):
    """The backward pass replays each layer after the forward restored the model's config: the replay
    must run segment by segment too (a replay over the whole row would give other gradients)."""
    model = _model(attn, family).train()
    set_gradient_checkpointing(model, True)
    calls = []
    original = segment_attention_forward

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    from transformers import AttentionInterface

    register()
    AttentionInterface.register(IMPLEMENTATION, counting)
    try:
        _assert_same_run(model, *_layouts()[layout])
    finally:
        AttentionInterface.register(IMPLEMENTATION, segment_attention_forward)
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers  # every layer's forward, then its replay in the backward pass
    assert model.config._attn_implementation == attn  # restored


def test_lora_with_gradient_checkpointing_and_qwen2():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("sdpa", "qwen2"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj", "lm_head"]))
    model.train()
    set_gradient_checkpointing(model, True)
    for unpacked, packed in _layouts().values():
        _assert_same_run(model, unpacked, packed)


def test_no_dense_mask_reaches_the_layers_and_the_config_is_restored():
    model = _model()
    decoder = decoder_and_head(model)[0]
    seen = []
    decoder.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["attention_mask"].shape, module.self_attn.config
                                                  ._attn_implementation)), with_kwargs=True)
    batch = collate(_pairs(), "preference", PAD, share_prompt=True)
    packed = pack_pairs(batch, decoder)
    chunked_completion_logprobs(*decoder_and_head(model), batch)
    # the 4D placeholder holds no element: [rows, 1, 0, width]
    assert seen == [((4, 1, 0, packed.width), IMPLEMENTATION)]
    assert model.config._attn_implementation == "sdpa"


def test_a_stock_attention_given_the_placeholder_fails_loudly():
    """If a layer ever ran another attention function over the packed row (which would attend across
    segments), the empty placeholder mask makes it fail instead of computing wrong values."""
    for attn in ("sdpa", "eager"):
        model = _model(attn)
        decoder = decoder_and_head(model)[0]
        ids = torch.randint(1, VOCAB, (2, 6))
        with pytest.raises(RuntimeError):
            decoder(input_ids=ids, attention_mask=torch.zeros(2, 1, 0, 6, dtype=torch.bool))


def test_a_failing_forward_restores_the_config_and_checkpoint_functions():
    model = _model().train()
    set_gradient_checkpointing(model, True)
    decoder = decoder_and_head(model)[0]
    functions = [layer._gradient_checkpointing_func for layer in decoder.layers]
    batch = collate(_sft_examples(), "sft", PAD, packing=True)
    packed = pack_sequences(batch, decoder)
    broken = SegmentLayout(rows=((0, (packed.width + 5,)),), width=packed.width)  # longer than the row
    with pytest.raises(ValueError, match="does not fit"):
        type(packed)(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                     packing=packed.packing, segments=broken).hidden_states(decoder).sum().backward()
    assert model.config._attn_implementation == "sdpa"
    assert [layer._gradient_checkpointing_func for layer in decoder.layers] == functions


def test_when_segments_apply(monkeypatch):
    decoder = decoder_and_head(_model())[0]
    monkeypatch.setenv(ENV, "auto")
    assert segments_apply(decoder, torch.device("cpu")) and not segments_apply(decoder, torch.device("cuda"))
    monkeypatch.setenv(ENV, "1")
    assert segments_apply(decoder, torch.device("cuda"))
    monkeypatch.setenv(ENV, "0")
    assert not segments_apply(decoder, torch.device("cpu"))
    monkeypatch.setenv(ENV, "1")
    decoder.config._attn_implementation = "flash_attention_2"  # keeps its own varlen path
    assert not segments_apply(decoder, torch.device("cpu"))


def test_the_config_key_wins_over_the_environment_variable_only_when_it_is_not_auto(monkeypatch):
    decoder = decoder_and_head(_model())[0]
    monkeypatch.setenv(ENV, "0")
    with packed_attention("segments"):
        assert segments_apply(decoder, torch.device("cuda"))
    with packed_attention("auto"):
        assert not segments_apply(decoder, torch.device("cpu"))  # auto defers to the variable
    monkeypatch.setenv(ENV, "1")
    with packed_attention("mask"):
        assert not segments_apply(decoder, torch.device("cpu"))
    assert segments_apply(decoder, torch.device("cpu"))  # restored after the block
    with pytest.raises(ValueError, match="packed attention"):
        with packed_attention("on"):
            pass


@pytest.mark.parametrize("choice", ["segments", "mask"])
def test_model_packed_attention_chooses_the_layout_of_a_training_run_with_the_same_losses(
        choice, make_config, monkeypatch):
    import json

    import aligner

    from .conftest import sft_rows

    monkeypatch.delenv(ENV, raising=False)
    calls = []
    register()
    from transformers import AttentionInterface

    original = AttentionInterface._global_mapping[IMPLEMENTATION]
    monkeypatch.setitem(AttentionInterface._global_mapping, IMPLEMENTATION,
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    config = make_config("sft", rows=sft_rows(8), steps=2)
    config["stages"][0]["data"]["packing"] = True
    config["model"]["packed_attention"] = choice
    result = aligner.train(config)
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert bool(calls) == (choice == "segments")
    # the same maths either way: the losses of the unpacked run
    config = make_config("sft", rows=sft_rows(8), steps=2)
    config["output_dir"] += "-unpacked"
    unpacked = aligner.train(config)
    expected = [json.loads(line)["loss"] for line in (unpacked.output_dir / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]
    assert losses == pytest.approx(expected, abs=1e-4)


def test_groups_keep_a_mask_free_layout_with_the_prompt_once():
    decoder = decoder_and_head(_model())[0]
    packed = pack_groups(_rollout(), decoder)
    # GROUPS: (5, [3, 7, 1, 0]) ... an empty completion is collated as one pad token
    assert packed.segments.rows == ((5, (3, 7, 1, 1)), (2, (6, 2, 4)), (8, (1, 5, 5, 2)), (3, (4, 3)), (4, (5,)))
    assert packed.attention_mask is None
