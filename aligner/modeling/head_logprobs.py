"""Log-probabilities of target tokens through a frozen linear LM head, chunk by chunk, without
recomputing the head in the backward pass.

``log p(t | h) = (W h + b)[t] - logsumexp(W h + b)`` depends on one hidden state ``h`` only, so
its gradient with respect to ``h`` is the upstream scalar for that token times a fixed vector,
``W^T (onehot(t) - softmax(W h + b))``. When the head's weights do not train (LoRA and every other
adapter method leave the LM head frozen), that vector is computed in the forward pass, while the
chunk's logits exist anyway, and kept ([tokens, hidden], the size of the hidden states); the backward
pass only scales it. Activation checkpointing of the chunks, the alternative that also keeps memory
at one chunk of logits, runs the head's vocabulary-sized matrix product a third time in the backward
pass; at a 152k-token vocabulary that product is a large share of a LoRA step.

A head whose weights train (full fine-tuning, tied embeddings that train) needs the upstream
gradients to form its own gradient, so callers use checkpointed chunks for it
(``frozen_linear_head`` says which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frozen_linear_head(head: torch.nn.Module) -> bool:
    """Whether ``head`` is a plain ``nn.Linear`` none of whose parameters require a gradient.

    Subclasses are excluded on purpose: quantised layers (bitsandbytes' ``Linear4bit``) and adapter
    layers subclass or wrap ``nn.Linear`` with a different forward.
    """
    if type(head) is not torch.nn.Linear:
        return False
    return not any(parameter.requires_grad for parameter in head.parameters())


# Rows per logsumexp call: its temporary is this many rows of the vocabulary, not the whole chunk.
_LOGSUMEXP_ROWS = 8


def _logsumexp_by_rows(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, -1, keepdim=True)``, a few rows at a time (the same values: each row
    is reduced on its own)."""
    return torch.cat([torch.logsumexp(logits[row:row + _LOGSUMEXP_ROWS], dim=-1, keepdim=True)
                      for row in range(0, logits.shape[0], _LOGSUMEXP_ROWS)])


def _logprobs_and_direction(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, chunk: int,
                            with_direction: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target log-probs ([M], float32) and, if asked, d log p / d hidden ([M, H]), chunk by chunk."""
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    direction = torch.empty_like(hidden) if with_direction else None
    for begin in range(0, hidden.shape[0], chunk):
        end = min(begin + chunk, hidden.shape[0])
        target = targets[begin:end].unsqueeze(-1)
        # One [chunk, vocabulary] float32 buffer, worked on in place: logits, then softmax, then
        # softmax - onehot (d(-log p)/dlogits).
        buffer = F.linear(hidden[begin:end], weight, bias).float()
        normaliser = _logsumexp_by_rows(buffer)
        # The formula of aligner.modeling.logprobs' other path, so that a frozen reference and the
        # policy it was copied from give bit-identical values on CPU (before training, margins are 0).
        logps[begin:end] = buffer.gather(-1, target).squeeze(-1) - normaliser.squeeze(-1)
        if direction is not None:
            residual = buffer.sub_(normaliser).exp_()
            residual.scatter_add_(-1, target, torch.full(target.shape, -1.0, device=target.device))
            direction[begin:end] = -(residual.to(weight.dtype) @ weight).to(hidden.dtype)
        del buffer
    return logps, direction


class _FrozenHeadLogProbs(torch.autograd.Function):
    """Target log-probs through a frozen linear head; d/dhidden formed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        logps, direction = _logprobs_and_direction(hidden, weight, bias, targets, chunk, with_direction=True)
        ctx.save_for_backward(direction)
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kept direction has no history: no double backward
    def backward(ctx, grad_logps: torch.Tensor):
        (direction,) = ctx.saved_tensors
        return direction * grad_logps.unsqueeze(-1).to(direction.dtype), None, None, None, None


def frozen_head_logprobs(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int) -> torch.Tensor:
    """Float32 log-prob of each ``targets[i]`` given ``hidden[i]`` ([M, H] -> [M]) through the frozen
    linear ``head``, ``chunk_tokens`` tokens of logits at a time; differentiable in ``hidden``."""
    chunk = max(1, chunk_tokens)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        # No backward will come (reference passes, evaluation): the values alone.
        return _logprobs_and_direction(hidden, head.weight, head.bias, targets, chunk, with_direction=False)[0]
    return _FrozenHeadLogProbs.apply(hidden, head.weight, head.bias, targets, chunk)
