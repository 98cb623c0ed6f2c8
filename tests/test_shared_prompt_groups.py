"""Rollout groups run with their prompt once: the same log-probs and gradients as one row per sample."""

from __future__ import annotations

import pytest
import torch

from aligner.modeling.logprobs import (
    chunked_completion_logprobs,
    decoder_and_head,
    forward_layout,
    token_window_start,
)
from aligner.modeling.segment_attention import ENV as SEGMENTS_ENV
from aligner.modeling.shared_prompt import group_packing, pack_groups
from aligner.online.rollout import rollout_batch, rows_of

from .test_shared_prompt import PAD, VOCAB, _model

EOS = VOCAB - 1

# (prompt length, completion lengths) of each prompt's samples: groups of 3 and 4 with unequal
# completions, an empty completion (collated as one pad token), a partial group of 2 and a prompt
# sampled once.
GROUPS = [(5, [3, 7, 1, 0]), (2, [6, 2, 4]), (8, [1, 5, 5, 2]), (3, [4, 3]), (4, [5])]


def _rollout(groups: list[tuple[int, list[int]]] = GROUPS, seed: int = 3) -> dict:
    """A rollout batch as ``Rollout.batch`` makes it, marked for group packing; some completions end at EOS."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, EOS, (n,), generator=generator).tolist()

    prompts, completions = [], []
    for prompt_length, lengths in groups:
        prompt = ids(prompt_length)
        for i, n in enumerate(lengths):
            prompts.append(list(prompt))
            completion = ids(n)
            if completion and i % 2 == 0:
                completion[-1] = EOS  # ended at end-of-sequence; the others hit the length limit
            completions.append(completion)
    batch = rollout_batch(prompts, completions, PAD, row_ids=list(range(len(prompts))))
    batch["window_start"] = token_window_start(batch)
    batch["share_prompt_groups"] = True
    return batch


@pytest.fixture(params=["segments", "dense"])
def attention_path(request, monkeypatch) -> str:
    """Packed rows with segment-by-segment attention (no mask; the CPU default) or a dense 4D mask."""
    monkeypatch.setenv(SEGMENTS_ENV, "1" if request.param == "segments" else "0")
    return request.param


def _unmarked(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "share_prompt_groups"}


class _DecoderInputs:
    """Records the shape of every ``input_ids`` the decoder runs over."""

    def __init__(self, decoder: torch.nn.Module):
        self.shapes: list[tuple[int, ...]] = []
        self.handle = decoder.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))


def _run(model: torch.nn.Module, batch: dict, weights: torch.Tensor):
    parts = decoder_and_head(model)
    out = chunked_completion_logprobs(*parts, batch, token_level=True)
    model.zero_grad(set_to_none=True)
    (out.logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(model: torch.nn.Module, batch: dict, expected_shape: tuple[int, int] | None) -> None:
    """Packed (``expected_shape``: the decoder's packed input) and unpacked runs agree in every output."""
    weights = torch.linspace(-2.0, 3.0, batch["input_ids"].shape[0])
    inputs = _DecoderInputs(decoder_and_head(model)[0])
    expected, expected_grads = _run(model, _unmarked(batch), weights)
    got, got_grads = _run(model, batch, weights)
    inputs.handle.remove()
    unpacked = tuple(batch["input_ids"].shape)
    assert inputs.shapes == [unpacked, expected_shape or unpacked]  # the packed layout really ran (or not)
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.token_logps, expected.token_logps, atol=1e-5, rtol=1e-5)
    # position t predicts token t + 1: the columns from the window's start to the second-to-last
    assert got.token_logps.shape == (unpacked[0], unpacked[1] - 1 - batch["window_start"])
    assert torch.equal(got.mask, expected.mask) and torch.equal(got.num_tokens, expected.num_tokens)
    assert set(got_grads) == set(expected_grads) and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _packed_shape(groups: list[tuple[int, list[int]]]) -> tuple[int, int]:
    # an empty completion is collated as one pad token
    totals = [p + sum(max(n, 1) for n in lengths) for p, lengths in groups]
    return len(groups), max(totals)


@pytest.mark.parametrize("attn,family", [("sdpa", "llama"), ("eager", "llama"), ("sdpa", "qwen2"),
                                         ("eager", "qwen2")])
def test_groups_give_the_unpacked_values_and_gradients(attn, family, attention_path):
    _assert_same(_model(attn, family), _rollout(), _packed_shape(GROUPS))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minibatches_with_partial_and_reordered_groups(attn, attention_path):
    """Minibatches taken with ``rows_of`` (as the policy update does) keep the rollout's window; runs are
    found from the rows they hold: group cuts, shuffled rows and prompts repeated out of order."""
    model = _model(attn)
    batch = _rollout()
    # rows 2-6: the last two samples of group 0 (one token each), then all of group 1
    _assert_same(model, rows_of(batch, torch.arange(2, 7)), (2, max(5 + 1 + 1, 2 + 6 + 2 + 4)))
    # groups: rows 0-3, 4-6, 7-10, 11-12, 13. Runs follow the rows' order, whatever the rollout
    # said: (9), (3, 0, 1), (11, 12), (7, 8), and row 2 again on its own.
    order = torch.tensor([9, 3, 0, 1, 11, 12, 7, 8, 2])
    sub = rows_of(batch, order)
    assert sub["window_start"] == batch["window_start"] and sub["share_prompt_groups"]
    packing = group_packing(sub, decoder_and_head(model)[0])
    assert packing.pack.tolist() == [0, 1, 1, 1, 2, 2, 3, 3, 4]
    assert packing.slot.tolist() == [0, 0, 1, 2, 0, 1, 0, 1, 0]
    _assert_same(model, sub, (5, int(packing.totals().max())))


def test_lora_model_packs_groups_with_the_same_gradients(attention_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj", "lm_head"]))
    weights = torch.linspace(-2.0, 3.0, _rollout()["input_ids"].shape[0])
    inputs = _DecoderInputs(decoder_and_head(model)[0])
    expected, expected_grads = _run(model, _unmarked(_rollout()), weights)
    got, got_grads = _run(model, _rollout(), weights)
    assert inputs.shapes[1] == _packed_shape(GROUPS)
    torch.testing.assert_close(got.logps, expected.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.token_logps, expected.token_logps, atol=1e-5, rtol=1e-5)
    assert set(got_grads) == set(expected_grads) and all("lora" in n for n in got_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_packed_row_holds_the_prompt_once_then_every_completion():
    model = _model()
    batch = _rollout()
    packed = pack_groups(batch, decoder_and_head(model)[0])
    assert packed.input_ids.shape == _packed_shape(GROUPS)
    ids, lengths = batch["input_ids"], batch["attention_mask"].sum(-1)
    prompt = ids[0, :5].tolist()
    completions = [ids[r, 5:lengths[r]].tolist() for r in range(4)]
    total = 5 + sum(len(c) for c in completions)
    assert packed.input_ids[0, :total].tolist() == prompt + [t for c in completions for t in c]
    expected_positions = list(range(5)) + [p for c in completions for p in range(5, 5 + len(c))]
    assert packed.position_ids[0, :total].tolist() == expected_positions
    # the padded tail of a packed row shorter than the longest
    assert packed.position_ids[1, 2 + 12:].eq(0).all()
    assert forward_layout(model, batch) == (sum(int(packed.packing.totals()[i]) for i in range(5)),
                                            packed.input_ids.numel())
    assert forward_layout(model, _unmarked(batch)) == (int(batch["attention_mask"].sum()), ids.numel())
    assert forward_layout(model, batch, "reward")[1] == ids.numel()  # the reward forward packs pairs only


def test_a_completion_never_sees_another_completion_of_its_group(attention_path):
    model = _model().eval()
    parts = decoder_and_head(model)
    batch = _rollout()
    before = chunked_completion_logprobs(*parts, batch, token_level=True)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][1, 5:] = (changed["input_ids"][1, 5:] * 7 + 1) % EOS  # the second sample of group 0
    after = chunked_completion_logprobs(*parts, changed, token_level=True)
    assert pack_groups(changed, parts[0]).packing.packs == 5  # still packed the same way
    moved = torch.zeros(after.logps.shape, dtype=torch.bool)
    moved[1] = True
    assert not torch.allclose(before.logps[1], after.logps[1])
    torch.testing.assert_close(before.logps[~moved], after.logps[~moved], atol=1e-6, rtol=0)
    torch.testing.assert_close(before.token_logps[~moved], after.token_logps[~moved], atol=1e-6, rtol=0)


def test_a_batch_without_shared_prompts_runs_its_own_rows():
    model = _model()
    distinct = _rollout([(5, [3]), (2, [6]), (8, [1]), (3, [4])])
    assert group_packing(distinct, decoder_and_head(model)[0]) is None
    _assert_same(model, distinct, None)
    # a prompt that is a prefix of its neighbour's (same tokens, one shorter) is another prompt
    prefix = _rollout([(4, [3, 2])])
    prefix["prompt_lengths"][1] = 3
    prefix["completion_mask"][1, 3] = 1
    assert group_packing(prefix, decoder_and_head(model)[0]) is None


def test_group_packing_falls_back_where_pair_packing_does():
    model = _model()
    decoder = decoder_and_head(model)[0]
    batch = _rollout()
    left_padded = dict(batch, attention_mask=batch["attention_mask"].flip(-1))
    assert group_packing(left_padded, decoder) is None
    model.config.sliding_window = 20  # shorter than the longest packed row: the custom mask would be wrong
    assert group_packing(batch, decoder) is None
    _assert_same(model, batch, None)
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"  # takes no arbitrary mask
    assert group_packing(batch, decoder) is None and forward_layout(model, batch)[1] == batch["input_ids"].numel()


def test_a_group_is_not_packed_when_its_packed_row_would_cost_more_attention(attention_path):
    """With a dense mask, a short prompt with many long completions packs into one row wider than the
    whole batch's attention: 1 x (2 + 6 x 20)^2 > 6 x 22^2, so the rows run as they are (same values).
    Segment by segment, each completion attends to its prompt and itself only: packed all the same."""
    model = _model()
    wide = _rollout([(2, [20] * 6)])
    if attention_path == "dense":
        assert group_packing(wide, decoder_and_head(model)[0]) is None
        _assert_same(model, wide, None)
    else:
        _assert_same(model, wide, (1, 2 + 6 * 20))
    narrow = _rollout([(12, [2] * 6)])  # 1 x 24^2 <= 6 x 14^2: packed
    assert group_packing(narrow, decoder_and_head(model)[0]) is not None
