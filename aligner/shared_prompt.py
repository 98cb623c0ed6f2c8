"""A preference pair scored in one row that holds its prompt once.

A pair's chosen and rejected sequences start with the same prompt. Laid out as two rows (the usual
"concatenated forward"), the decoder runs over the prompt twice and the shorter row is padded to
the longer. Here each pair becomes one row, ``prompt + chosen + rejected``, with

- position ids that restart at the end of the prompt for the rejected completion, and
- an attention mask in which a rejected token sees the prompt and the rejected tokens before it,
  never the chosen ones (a chosen token sees the prompt and earlier chosen tokens, as causality
  already gives).

Every token therefore attends to the same keys at the same positions as in its own row, so the
log-probs are those of the two-row layout (up to the order of float sums), but the prompt's
activations are computed once, and its gradient collects both completions' contributions. Rows are
grouped by their total length (``TokenizedData.lengths(shared_prompt=True)``), so little padding
is left.

It needs an attention implementation that takes an arbitrary 4D mask (``sdpa``: boolean, ``eager``:
additive); FlashAttention-style kernels that only know causal or packed masks use the two-row layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# attention implementation -> how it reads a custom 4D mask ("bool": True = may attend; "additive":
# 0 or the dtype's minimum added to the scores)
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


@dataclass
class PackedPairs:
    """The one-row-per-pair layout of a preference batch, and how to find a token in it."""

    input_ids: torch.Tensor  # [pairs, width]
    position_ids: torch.Tensor  # [pairs, width]
    attention_mask: torch.Tensor  # [pairs, 1, width, width]
    prompt_lengths: torch.Tensor  # [pairs]
    chosen_lengths: torch.Tensor  # [pairs]: completion tokens of the chosen sequence

    @property
    def width(self) -> int:
        """Positions per packed row."""
        return int(self.input_ids.shape[1])

    def flat_index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Where position ``(row, col)`` of the two-row batch is in the packed rows, flattened.

        Row ``i`` (chosen) of pair ``i`` keeps its columns; row ``pairs + i`` (rejected) keeps its
        prompt columns and has its completion moved right past the chosen completion.
        """
        pairs = self.input_ids.shape[0]
        pair = rows % pairs
        moved = (rows >= pairs) & (cols >= self.prompt_lengths[pair])
        return pair * self.width + cols + moved * self.chosen_lengths[pair]


def attention_kind(decoder: torch.nn.Module) -> str | None:
    """How ``decoder``'s attention takes a custom 4D mask, or ``None`` if it cannot."""
    config = getattr(decoder, "config", None)
    return MASK_KINDS.get(getattr(config, "_attn_implementation", None) or "eager")


def pair_lengths(batch: dict[str, Any], decoder: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
    """``(prompt, chosen, rejected)`` token counts per pair if ``batch`` can be packed, else ``None``.

    ``None`` for a batch whose rows are not (chosen..., rejected...) pairs with equal prompts, for an
    attention implementation without custom masks, and where a sliding attention window shorter
    than a packed row would make the custom mask wrong.
    """
    ids, attention, prompt_lengths = batch["input_ids"], batch["attention_mask"].bool(), batch["prompt_lengths"]
    if attention_kind(decoder) is None or ids.shape[0] % 2:
        return None
    pairs, columns = ids.shape[0] // 2, ids.shape[1]
    lengths = attention.sum(-1)
    position = torch.arange(columns, device=ids.device)
    if not torch.equal(attention, position < lengths[:, None]):
        return None  # not right padding
    prompt = prompt_lengths[:pairs]
    if not torch.equal(prompt, prompt_lengths[pairs:]):
        return None
    in_prompt = position < prompt[:, None]
    if not bool(((ids[:pairs] == ids[pairs:]) | ~in_prompt).all()):
        return None
    chosen, rejected = lengths[:pairs] - prompt, lengths[pairs:] - prompt
    window = getattr(getattr(decoder, "config", None), "sliding_window", None)
    if window is not None and int((prompt + chosen + rejected).max()) > int(window):
        return None
    return prompt, chosen, rejected


def pack_pairs(batch: dict[str, Any], decoder: torch.nn.Module) -> PackedPairs | None:
    """The packed layout of a right-padded preference batch, or ``None`` where it does not apply
    (see ``pair_lengths``)."""
    counts = pair_lengths(batch, decoder)
    if counts is None:
        return None
    prompt, chosen, rejected = counts
    ids = batch["input_ids"]
    pairs, columns = ids.shape[0] // 2, ids.shape[1]
    total = prompt + chosen + rejected
    width = int(total.max())
    t = torch.arange(width, device=ids.device)[None, :]
    first_part = t < (prompt + chosen)[:, None]  # prompt and chosen completion
    real = t < total[:, None]
    pair_index = torch.arange(pairs, device=ids.device)[:, None]
    source_row = torch.where(first_part, pair_index, pair_index + pairs)
    source_column = torch.where(first_part, t, t - chosen[:, None])
    input_ids = ids[source_row, source_column.clamp(max=columns - 1)]
    # Padding positions get position 0: never past the model's range, and their outputs are unused.
    position_ids = torch.where(real, source_column, 0)

    chosen_key = first_part & ~(t < prompt[:, None])
    rejected_query = real & ~first_part
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
    # Padding queries (after a row's end) see every real key before them, so no row of the mask
    # is empty (an all-masked softmax is NaN); their outputs are never read.
    allowed = causal[None] & real[:, None, :] & ~(rejected_query[:, :, None] & chosen_key[:, None, :])
    allowed = allowed[:, None]
    if attention_kind(decoder) == "additive":
        dtype = decoder.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return PackedPairs(input_ids=input_ids, position_ids=position_ids, attention_mask=allowed,
                       prompt_lengths=prompt, chosen_lengths=chosen)
