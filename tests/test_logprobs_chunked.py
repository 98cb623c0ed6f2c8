"""The chunked completion log-prob path: same values and gradients as the plain path, bounded memory."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from aligner import train
from aligner.modeling.logprobs import (
    chunked_completion_logprobs,
    completion_logprobs,
    decoder_and_head,
    plain_completion_logprobs,
)

VOCAB = 300


def _model(vocab: int = VOCAB, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))


def _batch(vocab: int = VOCAB, rows: int = 4, length: int = 12) -> dict:
    """Right-padded rows with different prompt lengths; row 2 is shorter (padding at its end)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0
    prompts = torch.tensor([5, 3, 5, 6][:rows])
    completion = (torch.arange(length)[None] >= prompts[:, None]).long() * attention
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "prompt_lengths": prompts}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model: torch.nn.Module, chunk_elements: int) -> None:
    batch = _batch()
    plain = plain_completion_logprobs(model, batch, token_level=True)
    (plain.logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    parts = decoder_and_head(model)
    assert parts is not None
    chunked = chunked_completion_logprobs(*parts, batch, token_level=True, chunk_elements=chunk_elements)
    (chunked.logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    got = _grads(model)
    torch.testing.assert_close(chunked.logps, plain.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.mask, plain.mask)
    assert torch.equal(chunked.num_tokens, plain.num_tokens)
    assert set(got) == set(expected) and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1000])
def test_chunked_equals_plain_values_and_gradients(chunk_tokens):
    _compare(_model(tied=False), chunk_elements=chunk_tokens * VOCAB)


def test_chunked_equals_plain_with_tied_embeddings():
    _compare(_model(tied=True), chunk_elements=4 * VOCAB)


def test_chunked_equals_plain_under_lora_including_the_lm_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tied=False), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           target_modules=["q_proj", "v_proj", "lm_head"]))
    assert "lora" in type(decoder_and_head(model)[1]).__module__  # the head call goes through the adapter
    _compare(model, chunk_elements=2 * VOCAB)
    # with adapters disabled (the disabled_adapter reference) both paths still agree
    with model.disable_adapter(), torch.no_grad():
        batch = _batch()
        torch.testing.assert_close(completion_logprobs(model, batch).logps,
                                   plain_completion_logprobs(model, batch).logps, atol=1e-5, rtol=1e-5)


def test_structures_it_cannot_see_through_use_the_plain_path():
    from peft import PrefixTuningConfig, get_peft_model

    prefix = get_peft_model(_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert decoder_and_head(prefix) is None  # virtual tokens are added by the wrapper's forward

    class Wrapper(torch.nn.Module):  # like DDP: its forward must run for gradient sync
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert decoder_and_head(Wrapper(_model())) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    assert decoder_and_head(gpt2) is None  # not on the list of plain-head model types
    batch = _batch()
    torch.testing.assert_close(completion_logprobs(gpt2, batch).logps, plain_completion_logprobs(gpt2, batch).logps)


def test_no_vocabulary_sized_tensor_kept_for_backward_and_head_sees_one_chunk_at_a_time():
    """Memory does not grow with positions x vocabulary: nothing vocab-wide is saved for backward,
    and every LM-head call (forward and the recomputation in backward) covers at most one chunk."""
    vocab, chunk_tokens = 5000, 4
    model = _model(vocab=vocab, tied=False)
    batch = _batch(vocab=vocab, rows=4, length=40)
    head_rows: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: head_rows.append(out.reshape(-1, vocab).shape[0]))

    def saved_sizes(fn) -> list[int]:
        sizes: list[int] = []

        def pack(t):
            sizes.append(t.numel() if t.dim() and t.shape[-1] == vocab else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.logps.sum().backward()
        return sizes

    plain_saved = saved_sizes(lambda: plain_completion_logprobs(model, batch))
    head_rows.clear()
    parts = decoder_and_head(model)
    chunked_saved = saved_sizes(lambda: chunked_completion_logprobs(*parts, batch, chunk_elements=chunk_tokens * vocab))
    handle.remove()
    completion_tokens = int(batch["completion_mask"][:, 1:].sum())
    assert max(plain_saved) >= completion_tokens * vocab  # the plain path keeps whole-sequence logits
    assert max(chunked_saved) == 0  # the weight is [vocab, hidden] (last dim hidden); no logits kept
    assert max(head_rows) <= chunk_tokens
    # every completion token is projected twice (forward, then recomputed in backward), nothing else
    assert sum(head_rows) == 2 * completion_tokens


def test_training_reports_the_padding_fraction(make_config):
    result = train(make_config("dpo", steps=2))
    fraction = result.metrics["dpo"]["train/padding_fraction"]
    assert 0.0 <= fraction < 0.5
