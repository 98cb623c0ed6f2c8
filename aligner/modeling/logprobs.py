"""Completion log-probabilities from one causal-LM forward pass.

Only positions that predict a completion token are needed. Two ways to get them:

- the chunked path (``chunked_completion_logprobs``), used whenever the model's structure is known
  (a plain decoder + LM head, also under a LoRA-style PEFT wrapper): the decoder runs once, its
  hidden states at completion positions only are gathered, and the LM head, log-softmax and gather
  run over them a chunk of tokens at a time: through a frozen linear head (every adapter method) the
  gradient is formed while the chunk's logits exist (``aligner.modeling.head_logprobs``), through a
  head that trains each chunk runs under activation checkpointing. No full-vocabulary logits exist
  for the prompt or padding, and at most one chunk's logits exist at any moment, in the forward and
  in the backward pass: memory grows with the chunk size, not with the number of positions times
  the vocabulary. Preference pairs collated with ``share_prompt`` run as one row
  per pair that holds the prompt once, and a batch marked ``share_prompt_groups`` (rollout rows,
  where consecutive rows sample the same prompt) as one row per run of rows with the same prompt
  (``aligner.modeling.shared_prompt``), and an SFT batch collated with ``data.packing`` as its sequences
  concatenated into as few rows as fit (``aligner.data.packing``). Under DDP this path runs as the
  wrapper's forward (``aligner.modeling.ddp_forward``), so gradients still sync;
- the plain path, for every other model (prompt/prefix tuning, which prepend virtual tokens inside
  the PEFT wrapper; FSDP/DeepSpeed, whose sharded weights are gathered by their own forward;
  heads that transform logits after the projection, such as soft-capping): the model's own forward
  with ``logits_to_keep`` from the first completion position of the batch on, then
  ``selective_log_softmax``.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import selective_log_softmax

from aligner.data.packing import PACK_KEY, pack_sequences, sequence_packing
from aligner.modeling.ddp_forward import ddp_inner, run_as_forward, unwrap_ddp
from aligner.modeling.head_logprobs import frozen_head_logprobs, frozen_linear_head
from aligner.modeling.plain_head import plain_head_model
from aligner.modeling.reward_scores import decoder_and_score
from aligner.modeling.shared_prompt import (
    PackedRows,
    attention_kind,
    group_packing,
    pack_groups,
    pack_pairs,
    pair_packing,
)
from aligner.protocols import SequenceLogProbs

# Logit elements (tokens x vocabulary) per chunk: 2**24 float32 values are 64 MiB, i.e. 110 tokens
# of a 151,936-token vocabulary or 8,192 tokens of a 2,048-token one. Smaller chunks save little
# memory and cost much time: at 27 tokens per chunk a 152k-vocabulary head ran at under half the
# speed of 110 on one CPU thread (the matrix products are too thin to be efficient).
DEFAULT_CHUNK_ELEMENTS = int(os.environ.get("ALIGNER_LOGPROB_CHUNK_ELEMENTS", 2**24))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost model whose ``forward`` declares its arguments (DDP and peft wrap it)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


@functools.lru_cache(maxsize=32)
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder and LM head to call separately, or ``None`` where the plain path must be used."""
    model = plain_head_model(model)
    if model is None:
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is model:
        return None
    if type(getattr(head, "weight", None)).__name__ == "DTensor":
        return None  # FSDP2 shards in place: its root forward hook gathers the head, so call the model
    return decoder, head


def token_window_start(batch: dict[str, Any]) -> int:
    """First position whose logit per-token values are reported from: one before the batch's earliest
    completion token, or the batch's ``window_start`` (rows taken from a larger batch, such as a
    rollout's minibatches, keep its columns so that stored per-token values line up)."""
    if "window_start" in batch:
        return int(batch["window_start"])
    return max(int(batch["prompt_lengths"].min()) - 1, 0)


def _chunk_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target token: LM head, then log-softmax at the target only (float32)."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _checkpointed_head_logprobs(head: torch.nn.Module, selected: torch.Tensor, targets: torch.Tensor,
                                chunk: int) -> torch.Tensor:
    """Target log-probs through any head, chunk by chunk; under autograd each chunk is checkpointed, so
    only its inputs are kept and its logits are recomputed in the backward pass. When every position
    fits in one chunk, autograd keeps that chunk's logits instead: no more memory than the chunk's
    recomputation would take, and one vocabulary-sized product fewer."""
    # The head's own weights may train over a frozen decoder (hidden states without grad).
    trains = selected.requires_grad or any(p.requires_grad for p in head.parameters())
    grad = torch.is_grad_enabled() and trains and selected.shape[0] > chunk
    pieces = [checkpoint(_chunk_token_logps, head, selected[begin:begin + chunk], targets[begin:begin + chunk],
                         use_reentrant=False) if grad
              else _chunk_token_logps(head, selected[begin:begin + chunk], targets[begin:begin + chunk])
              for begin in range(0, selected.shape[0], chunk)]
    return torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)


def _packed(batch: dict[str, Any], decoder: torch.nn.Module) -> PackedRows | None:
    """The packed layout ``batch`` asks for (SFT sequences, or shared prompts: groups before pairs),
    or ``None`` for its own rows."""
    if batch.get(PACK_KEY):
        return pack_sequences(batch, decoder)
    if batch.get("share_prompt_groups"):
        return pack_groups(batch, decoder)
    if batch.get("share_prompt"):
        return pack_pairs(batch, decoder)
    return None


def chunked_completion_logprobs(decoder: torch.nn.Module, head: torch.nn.Module, batch: dict[str, Any],
                                token_level: bool = False,
                                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> SequenceLogProbs:
    """Completion log-probs with the LM head applied to completion positions only, chunk by chunk.

    A preference batch collated with ``share_prompt`` runs each pair as one row holding its prompt
    once, a batch marked ``share_prompt_groups`` each run of consecutive rows with the same prompt
    (``aligner.modeling.shared_prompt``), and an SFT batch marked by ``data.packing`` its sequences
    concatenated into as few rows as fit (``aligner.data.packing``), where the attention
    implementation allows it. Values, per-token values and gradients are those of the unpacked rows
    either way.
    """
    input_ids = batch["input_ids"]
    completion_mask = batch["completion_mask"]
    # Position t predicts token t+1: hidden state t is needed exactly where token t+1 is scored.
    scored = completion_mask[:, 1:].bool()
    rows = scored.nonzero(as_tuple=True)
    targets = input_ids[:, 1:][rows]
    packed = _packed(batch, decoder)
    if packed is None:
        hidden = decoder(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        selected = hidden[:, :-1][rows]  # [M, H]: the completion positions of every sequence, flattened
    else:
        hidden = packed.hidden_states(decoder)  # a dense mask, or segment by segment without one
        selected = hidden.flatten(0, 1)[packed.flat_index(*rows)]
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    chunk = max(1, chunk_elements // max(vocab, 1))
    if frozen_linear_head(head):
        # The gradient through a frozen head is formed while each chunk's logits exist: no recompute.
        flat = frozen_head_logprobs(head, selected, targets, chunk)
    else:
        flat = _checkpointed_head_logprobs(head, selected, targets, chunk)
    logps = flat.new_zeros(input_ids.shape[0]).index_add(0, rows[0], flat)
    token_logps = mask = None
    if token_level:
        # The same [N, T] layout as the plain path: from the batch's first scored position on.
        start = token_window_start(batch)
        full = flat.new_zeros(scored.shape).index_put((rows[0], rows[1]), flat)
        token_logps, mask = full[:, start:], scored[:, start:]
    return SequenceLogProbs(logps=logps, num_tokens=completion_mask.sum(-1), token_logps=token_logps, mask=mask)


def plain_completion_logprobs(model: torch.nn.Module, batch: dict[str, Any], token_level: bool = False) -> SequenceLogProbs:
    """Completion log-probs through the model's own forward (works for any causal LM)."""
    input_ids = batch["input_ids"]
    completion_mask = batch["completion_mask"]
    length = input_ids.shape[1]
    # Position t predicts token t+1, so the first needed logit is one before the earliest completion token.
    start = token_window_start(batch)
    keep = length - start
    kwargs: dict[str, Any] = {"use_cache": False}
    trimmed = _accepts_logits_to_keep(type(_unwrap(model)))
    if trimmed:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], **kwargs).logits
    # Count positions from the end: prompt tuning and P-tuning prepend virtual tokens, so the logits
    # can be longer than input_ids, and the real positions are always the last ones.
    logits = logits[:, logits.shape[1] - keep:]
    logits = logits[:, :-1]
    targets = input_ids[:, start + 1:]
    mask = completion_mask[:, start + 1:].to(logits.dtype if logits.is_floating_point() else torch.float32)
    token_logps = selective_log_softmax(logits, targets).float() * mask.float()
    return SequenceLogProbs(
        logps=token_logps.sum(-1),
        num_tokens=completion_mask.sum(-1),
        token_logps=token_logps if token_level else None,
        mask=mask.bool() if token_level else None,
    )


def completion_logprobs(model: torch.nn.Module, batch: dict[str, Any], token_level: bool = False) -> SequenceLogProbs:
    """Sum of log-probs of each sequence's completion tokens (and per-token values if asked).

    Uses the chunked path when the model's structure allows it, else the model's own forward. A
    DDP-wrapped model runs the chunked path as the wrapper's forward, so gradients still sync.
    """
    inner = ddp_inner(model)
    parts = decoder_and_head(inner if inner is not None else model)
    if parts is None:
        return plain_completion_logprobs(model, batch, token_level)
    compute = functools.partial(chunked_completion_logprobs, *parts, batch, token_level=token_level)
    return compute() if inner is None else run_as_forward(model, compute)


def _sharing_decoder(model: torch.nn.Module, forward_kind: str) -> torch.nn.Module | None:
    """The decoder a shared-prompt forward of ``model`` would call, or ``None`` if it cannot run one.

    ``forward_kind`` ``"reward"`` means a sequence-classification model's score forward.
    """
    if forward_kind == "reward":
        parts = decoder_and_score(unwrap_ddp(model))
    else:
        parts = decoder_and_head(unwrap_ddp(model))
    return parts[0] if parts is not None and attention_kind(parts[0]) is not None else None


def forward_layout(model: torch.nn.Module, batch: dict[str, Any], forward_kind: str = "logprobs") -> tuple[int, int]:
    """``(real tokens, positions)`` of the rows the policy's forward pass runs for ``batch``.

    With shared prompts these are the packed rows (each prompt counted once), with ``data.packing``
    the packed SFT rows, else the batch's own. Groups (``share_prompt_groups``) and SFT sequences are
    packed by the log-prob forward only, pairs by both.
    """
    if batch.get(PACK_KEY) and forward_kind != "reward":
        parts = decoder_and_head(unwrap_ddp(model))
        sequences = sequence_packing(batch, parts[0]) if parts is not None else None
        if sequences is not None:
            total = sequences.totals()
            return int(total.sum()), int(total.max()) * int(total.shape[0])
    groups = bool(batch.get("share_prompt_groups")) and forward_kind != "reward"
    decoder = _sharing_decoder(model, forward_kind) if groups or batch.get("share_prompt") else None
    packing = None
    if decoder is not None:
        packing = group_packing(batch, decoder) if groups else pair_packing(batch, decoder)
    if packing is None:
        return int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())
    total = packing.totals()
    return int(total.sum()), int(total.max()) * int(total.shape[0])


def can_share_prompts(model: torch.nn.Module, forward_kind: str = "logprobs") -> bool:
    """Whether ``model``'s forward (``"logprobs"`` or ``"reward"``) can run preference pairs with
    their prompt once (the log-prob forward then runs groups of rows packed too)."""
    return _sharing_decoder(model, forward_kind) is not None
