"""Log-probs through a frozen LM head with the gradient formed in the forward pass: the same values
and gradients as autograd through the full logits, one chunk of logits at a time, and the head's
vocabulary-sized product never run again in the backward pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from aligner.modeling.head_logprobs import frozen_head_logprobs, frozen_linear_head
from aligner.modeling.logprobs import chunked_completion_logprobs, decoder_and_head, plain_completion_logprobs

VOCAB, HIDDEN = 500, 16


def _head(bias: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias).to(dtype)
    head.requires_grad_(False)
    return head


def _reference(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Autograd through the whole [tokens, vocabulary] logits."""
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_autograd_through_the_full_logits(chunk, bias):
    head = _head(bias)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, HIDDEN, generator=generator) * 3  # peaked softmaxes too
    targets = torch.randint(0, VOCAB, (10,), generator=generator)
    weights = torch.randn(10, generator=generator)  # a different upstream gradient for every token

    expected_hidden = hidden.clone().requires_grad_(True)
    expected = _reference(head, expected_hidden, targets)
    (expected * weights).sum().backward()
    got_hidden = hidden.clone().requires_grad_(True)
    got = frozen_head_logprobs(head, got_hidden, targets, chunk)
    (got * weights).sum().backward()

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_hidden.grad, expected_hidden.grad, atol=1e-5, rtol=1e-5)


def test_bfloat16_head_matches_within_bfloat16_rounding():
    head = _head(dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, HIDDEN, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (6,), generator=generator)
    expected_hidden, got_hidden = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    _reference(head, expected_hidden, targets).sum().backward()
    got = frozen_head_logprobs(head, got_hidden, targets, 4)
    got.sum().backward()
    assert got_hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, _reference(head, hidden, targets), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_hidden.grad.float(), expected_hidden.grad.float(), atol=2e-2, rtol=2e-2)


def test_values_are_bit_identical_to_the_checkpointed_path_so_a_frozen_copy_matches_its_policy():
    """A frozen reference copied from a policy whose head trains must give exactly the policy's values
    before training (held-out margins 0, not float noise), with autograd on or off."""
    from aligner.modeling.logprobs import _checkpointed_head_logprobs

    head = _head()
    trainable = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    trainable.weight.data.copy_(head.weight)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(23, HIDDEN, generator=generator) * 4
    targets = torch.randint(0, VOCAB, (23,), generator=generator)
    for chunk in (1, 5, 23, 100):
        with torch.no_grad():
            expected = _checkpointed_head_logprobs(trainable, hidden, targets, chunk)
            assert torch.equal(frozen_head_logprobs(head, hidden, targets, chunk), expected)
        assert torch.equal(frozen_head_logprobs(head, hidden.clone().requires_grad_(True), targets, chunk).detach(),
                           expected)


def test_without_autograd_nothing_is_kept_and_no_gradient_product_runs():
    head = _head()
    hidden = torch.randn(5, HIDDEN, requires_grad=True)
    products = _VocabularyTensors()
    with torch.no_grad(), products:
        out = frozen_head_logprobs(head, hidden, torch.zeros(5, dtype=torch.long), 2)
    assert out.grad_fn is None and out.shape == (5,)
    # only the logits' products (3 chunks); the [rows, vocabulary] x [vocabulary, hidden] gradient
    # product is skipped when no backward can come
    assert sum(products.product_rows) == 5 and products.products == 3
    with products:
        frozen_head_logprobs(head, hidden, torch.zeros(5, dtype=torch.long), 2)
    assert products.products == 3 + 6  # with autograd: both products per chunk


def test_double_backward_is_refused_not_silently_wrong():
    head = _head()
    hidden = torch.randn(4, HIDDEN, requires_grad=True)
    out = frozen_head_logprobs(head, hidden, torch.zeros(4, dtype=torch.long), 2)
    (grad,) = torch.autograd.grad(torch.nn.functional.logsigmoid(out).sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
        grad.pow(2).sum().backward()


def test_only_a_plain_frozen_linear_head_takes_this_path():
    assert frozen_linear_head(_head())
    trainable = torch.nn.Linear(HIDDEN, VOCAB)
    assert not frozen_linear_head(trainable)  # its weight needs the upstream gradients
    trainable.weight.requires_grad_(False)
    assert not frozen_linear_head(trainable)  # the bias still trains

    class QuantisedLinear(torch.nn.Linear):  # like bitsandbytes' Linear4bit: a different forward
        pass

    assert not frozen_linear_head(QuantisedLinear(HIDDEN, VOCAB).requires_grad_(False))


class _VocabularyTensors(TorchDispatchMode):
    """Records the leading size of every op output (not views) whose last dimension is the
    vocabulary, and of the matrix products among them (the head's projection)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []
        self.product_rows: list[int] = []
        self.products = 0  # every matrix product, whatever its shape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.products += func.overloadpacket.__name__ in ("mm", "addmm", "matmul", "linear")
        if func.is_view:  # e.g. the transposed head weight
            return out
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == VOCAB:
            self.rows.append(out.shape[0])
            if func.overloadpacket.__name__ in ("mm", "addmm", "matmul", "linear"):
                self.product_rows.append(out.shape[0])
        return out


def _lora_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))


def _batch() -> dict:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 14), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0
    prompts = torch.tensor([4, 6, 3])
    completion = (torch.arange(14)[None] >= prompts[:, None]).long() * attention
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "prompt_lengths": prompts}


def test_lora_training_uses_it_with_the_same_gradients_and_no_head_product_in_backward():
    model, batch = _lora_model(), _batch()
    weights = torch.tensor([1.0, -2.0, 0.5])
    plain = plain_completion_logprobs(model, batch, token_level=True)
    (plain.logps * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    decoder, head = decoder_and_head(model)
    assert frozen_linear_head(head)  # LoRA on the attention only: the (tied) head is frozen
    chunk_tokens = 4
    forward_pass = _VocabularyTensors()
    with forward_pass:
        chunked = chunked_completion_logprobs(decoder, head, batch, token_level=True,
                                              chunk_elements=chunk_tokens * VOCAB)
    backward_pass = _VocabularyTensors()
    with backward_pass:
        (chunked.logps * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(chunked.logps, plain.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    assert set(got) == set(expected) and all("lora_" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    scored = int(batch["completion_mask"][:, 1:].sum())
    # the head's product ran once per scored token, a chunk at a time, and nothing vocabulary-wide ran
    # in the backward pass
    assert sum(forward_pass.product_rows) == scored
    assert max(forward_pass.rows) <= chunk_tokens
    assert backward_pass.rows == []
