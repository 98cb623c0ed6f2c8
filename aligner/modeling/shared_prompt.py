"""Rows that start with the same prompt, scored in one row that holds the prompt once.

Sequences that share a prompt — a preference pair's chosen and rejected sequences, or the ``G``
completions an online rollout samples for one prompt — are usually laid out one per row, so the
decoder runs over the prompt once per sequence and shorter rows are padded to the longest. Here each
set of such rows becomes one packed row, ``prompt + c1 + c2 + ... + ck``, with

- position ids that restart at the end of the prompt for every completion, and
- an attention mask in which a completion token sees the prompt and the tokens of its own
  completion before it, never another completion's (for the first completion causality already
  gives that; for the others the mask removes the earlier completions).

Every token therefore attends to the same keys at the same positions as in its own row, so the
log-probs are those of the one-row-per-sequence layout (up to the order of float sums), but the
prompt's activations are computed once, and its gradient collects every completion's contribution.

Two batch layouts are packed (``RowPacking`` says which packed row each row goes to, ``pack_rows``
builds the packed tensors for either):

- preference pairs (``pack_pairs``): a batch collated with ``share_prompt`` has rows
  (chosen..., rejected...), so pair ``i`` is rows ``i`` and ``pairs + i``, packed as
  ``prompt + chosen + rejected``. Rows are grouped by their total length
  (``TokenizedData.lengths(shared_prompt=True)``), so little padding is left;
- groups (``pack_groups``): a batch marked ``share_prompt_groups`` (rollout rows, where the samples
  of one prompt are consecutive) packs each run of consecutive rows with identical prompt tokens.
  The runs are found from the data, so partial groups, groups of different sizes and rows sharing
  their prompt with no neighbour (a run of one, packed alone) all work. A batch without any run of
  two or more rows is left as it is.

Packed rows are in the order of their first rows, right-padded to the longest. Packing needs the
``sdpa`` or ``eager`` attention implementation; FlashAttention-style kernels that only know causal
or packed masks keep one row per sequence, as does a model whose sliding attention window is
shorter than a packed row. How the packed rows' attention runs (``pack_rows``):

- on CPU (by default; see ``aligner.modeling.segment_attention`` for the switch), segment by segment
  without any mask: ``PackedRows.segments`` describes each row (the prompt, then the completions),
  ``attention_mask`` is ``None``, and ``PackedRows.hidden_states`` runs the decoder with the
  segment attention function. Attention then costs per completion what its own row costs at most,
  and nothing of size ``width^2`` is built (a 5950-token pair: 63 MiB peak in one layer instead of
  204 MiB with the dense mask);
- elsewhere, or with ``ALIGNER_SEGMENT_ATTENTION=0``, a dense 4D mask (``sdpa``: boolean, ``eager``:
  additive) in which a completion token sees the prompt and the tokens of its own completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aligner.modeling.segment_attention import SegmentLayout, run_decoder, segments_apply

# attention implementation -> how it reads a custom 4D mask ("bool": True = may attend; "additive":
# 0 or the dtype's minimum added to the scores)
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


@dataclass
class RowPacking:
    """Where each row of a right-padded batch goes in the packed layout.

    The rows of one packed row share their prompt; their completions follow it in ``slot`` order.
    """

    pack: torch.Tensor  # [N]: the packed row each row goes to
    slot: torch.Tensor  # [N]: its place in that packed row (0: first; its prompt tokens are the ones written)
    shift: torch.Tensor  # [N]: how far right its completion moves (completion tokens of the rows before it)
    prompt_lengths: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N]: real tokens of the row (prompt + completion)

    @property
    def packs(self) -> int:
        """Number of packed rows."""
        return int(self.pack.max()) + 1 if self.pack.numel() else 0

    def totals(self) -> torch.Tensor:
        """``[packs]``: real tokens of each packed row (the prompt once, then every completion)."""
        # A row's completion ends at shift + length in its packed row; the last row's end is the total.
        return self.lengths.new_zeros(self.packs).scatter_reduce(0, self.pack, self.shift + self.lengths, "amax")

    def flat_index(self, rows: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
        """Where position ``(row, col)`` of the unpacked batch is in packed rows of ``width``, flattened."""
        moved = cols >= self.prompt_lengths[rows]
        return self.pack[rows] * width + cols + moved * self.shift[rows]


@dataclass
class PackedRows:
    """The packed layout of a batch (``RowPacking``'s tensors), and how to find a token in it."""

    input_ids: torch.Tensor  # [packs, width]
    position_ids: torch.Tensor  # [packs, width]
    attention_mask: torch.Tensor | None  # [packs, 1, width, width]; None with ``segments`` or a varlen kernel
    packing: RowPacking
    # Set where attention runs segment by segment (``aligner.modeling.segment_attention``): no dense mask.
    segments: SegmentLayout | None = None

    @property
    def width(self) -> int:
        """Positions per packed row."""
        return int(self.input_ids.shape[1])

    def flat_index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Where position ``(row, col)`` of the unpacked batch is in the packed rows, flattened.

        Prompt columns map to the packed row's one copy of the prompt; completion columns move right
        past the completions packed before the row's own.
        """
        return self.packing.flat_index(rows, cols, self.width)

    def hidden_states(self, decoder: torch.nn.Module) -> torch.Tensor:
        """``decoder``'s last hidden states over the packed rows ``[packs, width, hidden]``: segment by
        segment where ``segments`` is set, else with ``attention_mask`` (a dense mask, or none for a
        varlen kernel)."""
        if self.segments is not None:
            return run_decoder(decoder, self.input_ids, self.position_ids, self.segments,
                               use_cache=False).last_hidden_state
        return decoder(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                       use_cache=False).last_hidden_state


# The pair layout was the first one packed; the name stays for code written against it.
PackedPairs = PackedRows


def attention_kind(decoder: torch.nn.Module) -> str | None:
    """How ``decoder``'s attention takes a custom 4D mask, or ``None`` if it cannot."""
    config = getattr(decoder, "config", None)
    return MASK_KINDS.get(getattr(config, "_attn_implementation", None) or "eager")


def _row_lengths(batch: dict[str, Any]) -> torch.Tensor | None:
    """Real tokens per row if ``batch`` is right-padded and every row holds its whole prompt, else ``None``."""
    attention, prompt_lengths = batch["attention_mask"].bool(), batch["prompt_lengths"]
    lengths = attention.sum(-1)
    position = torch.arange(attention.shape[1], device=attention.device)
    if not torch.equal(attention, position < lengths[:, None]) or bool((lengths < prompt_lengths).any()):
        return None
    return lengths


def _same_prompt(batch: dict[str, Any], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a)]``: whether rows ``a[i]`` and ``b[i]`` have equal prompt lengths and prompt tokens."""
    ids, prompt_lengths = batch["input_ids"], batch["prompt_lengths"]
    in_prompt = torch.arange(ids.shape[1], device=ids.device) < prompt_lengths[a][:, None]
    return (prompt_lengths[a] == prompt_lengths[b]) & ((ids[a] == ids[b]) | ~in_prompt).all(-1)


def _fits(packing: RowPacking, decoder: torch.nn.Module) -> bool:
    """Whether ``decoder`` can run ``packing``'s rows with a custom mask.

    A sliding attention window shorter than a packed row would cut keys by their distance in the
    packed row, not in the row the token came from, so the mask would be wrong.
    """
    if attention_kind(decoder) is None:
        return False
    window = getattr(getattr(decoder, "config", None), "sliding_window", None)
    return window is None or int(packing.totals().max()) <= int(window)


def pair_lengths(batch: dict[str, Any], decoder: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
    """``(prompt, chosen, rejected)`` token counts per pair if ``batch`` can be packed, else ``None``.

    ``None`` for a batch whose rows are not (chosen..., rejected...) pairs with equal prompts, for an
    attention implementation without custom masks, and where a sliding attention window shorter
    than a packed row would make the custom mask wrong.
    """
    packing = pair_packing(batch, decoder)
    if packing is None:
        return None
    pairs = packing.packs
    prompt, completion = packing.prompt_lengths[:pairs], packing.lengths - packing.prompt_lengths
    return prompt, completion[:pairs], completion[pairs:]


def pair_packing(batch: dict[str, Any], decoder: torch.nn.Module) -> RowPacking | None:
    """Pair ``i`` of a (chosen..., rejected...) batch as packed row ``i``: the chosen completion first,
    then the rejected one. ``None`` where it does not apply (see ``pair_lengths``)."""
    rows = batch["input_ids"].shape[0]
    if attention_kind(decoder) is None or rows % 2 or rows == 0:
        return None
    lengths = _row_lengths(batch)
    pairs = rows // 2
    chosen = torch.arange(pairs, device=batch["input_ids"].device)
    if lengths is None or not bool(_same_prompt(batch, chosen, chosen + pairs).all()):
        return None
    prompt_lengths = batch["prompt_lengths"]
    index = torch.arange(rows, device=lengths.device)
    slot = (index >= pairs).long()
    # the rejected completion moves right past the chosen one
    shift = slot * (lengths[:pairs] - prompt_lengths[:pairs]).repeat(2)
    packing = RowPacking(pack=index % pairs, slot=slot, shift=shift, prompt_lengths=prompt_lengths, lengths=lengths)
    return packing if _fits(packing, decoder) else None


def group_packing(batch: dict[str, Any], decoder: torch.nn.Module) -> RowPacking | None:
    """Each run of consecutive rows with identical prompt tokens as one packed row, in row order.

    ``None`` where no run holds two or more rows (nothing would be saved), for a batch that is not
    right-padded, for an attention implementation without custom masks, and where a sliding
    attention window is shorter than a packed row.
    """
    rows = batch["input_ids"].shape[0]
    if attention_kind(decoder) is None or rows < 2:
        return None
    lengths = _row_lengths(batch)
    if lengths is None:
        return None
    prompt_lengths = batch["prompt_lengths"]
    index = torch.arange(rows, device=lengths.device)
    # Row r continues the run of row r - 1 when their prompts match; an empty prompt shares nothing.
    continues = _same_prompt(batch, index[1:], index[:-1]) & (prompt_lengths[1:] > 0)
    starts = torch.cat([continues.new_ones(1), ~continues])
    if bool(starts.all()):
        return None
    pack = starts.long().cumsum(0) - 1
    first_row = index[starts][pack]
    completion = lengths - prompt_lengths
    before = completion.cumsum(0) - completion  # completion tokens of all earlier rows
    packing = RowPacking(pack=pack, slot=index - first_row, shift=before - before[first_row],
                         prompt_lengths=prompt_lengths, lengths=lengths)
    if not _fits(packing, decoder):
        return None
    # Segment by segment, a completion attends to its prompt and itself only: never more than its own row.
    if segments_apply(decoder, batch["input_ids"].device) or _attention_pays_off(packing, batch):
        return packing
    return None


def _attention_pays_off(packing: RowPacking, batch: dict[str, Any]) -> bool:
    """Whether the packed rows' attention (and mask) is no larger than the batch's own.

    Packing always runs fewer tokens through the linear layers, but attention, and the dense 4D mask
    it needs, grow with the square of a row's width: a group of many long completions under a short
    prompt packs into one very wide row. Packing is used only where ``packs x width^2`` does not
    exceed ``rows x batch width^2``, so it can never cost more attention or mask memory than the
    unpacked layout. Segment-by-segment attention (no mask) never needs this check.
    """
    packed_width = int(packing.totals().max())
    rows, width = batch["input_ids"].shape
    return packing.packs * packed_width**2 <= rows * width**2


def segment_layout(packing: RowPacking, width: int) -> SegmentLayout:
    """``packing``'s rows as segments: per packed row its prompt length (that of its first row; 0 for
    SFT packing) and its rows' completion lengths in slot order (empty completions left out)."""
    pack, slot = packing.pack.tolist(), packing.slot.tolist()
    prompts, lengths = packing.prompt_lengths.tolist(), packing.lengths.tolist()
    prompt = [0] * packing.packs
    completions: list[list[tuple[int, int]]] = [[] for _ in range(packing.packs)]
    for p, s, first, total in zip(pack, slot, prompts, lengths, strict=True):
        if s == 0:
            prompt[p] = first
        completions[p].append((s, total - first))
    rows = tuple((prompt[p], tuple(n for _, n in sorted(completions[p]) if n > 0)) for p in range(packing.packs))
    return SegmentLayout(rows=rows, width=width)


def pack_rows(batch: dict[str, Any], decoder: torch.nn.Module, packing: RowPacking) -> PackedRows:
    """The packed tensors of a right-padded batch laid out by ``packing``: with a dense 4D mask, or with
    a ``SegmentLayout`` and no mask where ``segments_apply`` (``aligner.modeling.segment_attention``)."""
    ids = batch["input_ids"]
    device = ids.device
    packs, width = packing.packs, int(packing.totals().max())
    columns = torch.arange(ids.shape[1], device=device)[None, :].expand_as(ids)
    rows = torch.arange(ids.shape[0], device=device)[:, None].expand_as(ids)
    in_completion = columns >= packing.prompt_lengths[:, None]
    # Every real token is written once: the prompt by the first row of its packed row, each
    # completion by its own row.
    write = (columns < packing.lengths[:, None]) & (in_completion | (packing.slot == 0)[:, None])
    flat = packing.flat_index(rows[write], columns[write], width)
    # Padding gets token 0 and position 0 (never past the model's range); its outputs are unused.
    input_ids = ids.new_zeros(packs * width).index_put((flat,), ids[write])
    position_ids = torch.zeros_like(input_ids).index_put((flat,), columns[write])
    # Segment of each packed position: 0 for the prompt, slot + 1 for a completion, -1 for padding.
    segment = torch.full_like(input_ids, -1).index_put((flat,), ((packing.slot[:, None] + 1) * in_completion)[write])
    input_ids, position_ids, segment = (t.view(packs, width) for t in (input_ids, position_ids, segment))

    if segments_apply(decoder, device):
        return PackedRows(input_ids=input_ids, position_ids=position_ids, attention_mask=None, packing=packing,
                          segments=segment_layout(packing, width))
    real = segment >= 0
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    # Padding queries (after a row's end) see every real key before them, so no row of the mask is
    # empty (an all-masked softmax is NaN); their outputs are never read.
    allowed = causal[None] & real[:, None, :] & ((key == 0) | (key == query) | ~real[:, :, None])
    allowed = allowed[:, None]
    if attention_kind(decoder) == "additive":
        dtype = decoder.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return PackedRows(input_ids=input_ids, position_ids=position_ids, attention_mask=allowed, packing=packing)


def pack_pairs(batch: dict[str, Any], decoder: torch.nn.Module) -> PackedRows | None:
    """The packed layout of a right-padded preference batch, or ``None`` where it does not apply
    (see ``pair_lengths``)."""
    packing = pair_packing(batch, decoder)
    return None if packing is None else pack_rows(batch, decoder, packing)


def pack_groups(batch: dict[str, Any], decoder: torch.nn.Module) -> PackedRows | None:
    """The packed layout of a right-padded batch whose consecutive rows may share prompts (rollout
    groups), or ``None`` where it does not apply (see ``group_packing``)."""
    packing = group_packing(batch, decoder)
    return None if packing is None else pack_rows(batch, decoder, packing)
