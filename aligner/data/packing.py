"""SFT packing: a micro-batch's sequences concatenated into as few rows as fit (``data.packing``).

A collated SFT batch stays one right-padded row per sequence (the losses, token counts and metrics
read it that way); only the policy's forward pass runs the packed layout:

- every sequence keeps its own position ids (0, 1, 2, ... from its first token), and
- a token attends only to the earlier tokens of its own sequence. With ``sdpa`` or ``eager`` on CPU
  (the default; ``aligner.modeling.segment_attention``) the whole micro-batch is one row without
  padding and without a mask, and attention runs sequence by sequence (one causal SDPA call each);
  elsewhere, or with ``ALIGNER_SEGMENT_ATTENTION=0``, the packed rows get a block-diagonal causal
  mask (``sdpa``: boolean, ``eager``: additive, built by ``aligner.modeling.shared_prompt.pack_rows``).
  With a FlashAttention-style kernel the whole micro-batch is one row without a mask too, whose
  restarting position ids transformers turns into the kernel's variable-length (varlen) boundaries.

Each token therefore sees the same keys at the same positions as in its own row, and its log-prob
and gradient are those of the unpacked layout up to the order of float sums.

With a dense mask, rows go to packed rows first-fit decreasing. ``data.packing: true`` packs into
rows as wide as the micro-batch's longest sequence: attention and the mask can never cost more than
the padded batch's, and the linear layers skip the padding. ``data.packing: N`` packs into rows of
``N`` tokens (at least the longest sequence): fewer, wider rows, which pays off where the linear
layers dominate attention. Segment by segment (and varlen), attention costs per sequence whatever
the row's width, so every value of ``data.packing`` gives one row.
"""

from __future__ import annotations

from typing import Any

import torch

from aligner.errors import ConfigError
from aligner.modeling.segment_attention import segments_apply
from aligner.modeling.shared_prompt import PackedRows, RowPacking, attention_kind, pack_rows
from aligner.protocols import SFT

# Attention implementations that read sequence boundaries from restarting position ids when no mask
# is passed (transformers' ``_is_packed_sequence``: one row only).
VARLEN_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3"})

# The batch key collate sets: the ``data.packing`` value (``True`` or a packed-row width).
PACK_KEY = "pack_sequences"


def check_packing(stage: Any) -> None:
    """Refuse ``data.packing`` on a stage that does not train on SFT rows, naming the key.

    Packing concatenates independent sequences; preference pairs already run as one row per pair
    (``train.share_prompt``), and online algorithms build their own rollout batches.
    """
    if stage.config.data.packing is False or stage.data_format == SFT:
        return
    raise ConfigError(
        f"'stages[{stage.index}].data.packing' packs sft rows only, but stage '{stage.name}' trains "
        f"{stage.data_format} rows with algorithm '{stage.algorithm.name}'; remove it (preference pairs run as "
        f"one row per pair with 'train.share_prompt')")


def attention_mode(decoder: torch.nn.Module) -> str | None:
    """``"varlen"`` (no mask, one row), ``"bool"``/``"additive"`` (a 4D mask), or ``None``: cannot pack."""
    implementation = getattr(getattr(decoder, "config", None), "_attn_implementation", None)
    if implementation in VARLEN_ATTENTION:
        return "varlen"
    return attention_kind(decoder)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[int]:
    """The packed row of each sequence: longest first, each into the first row it fits.

    ``capacity`` below a sequence's length still gives that sequence a row of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # ties by index: deterministic
    room: list[int] = []
    pack = [0] * len(lengths)
    for i in order:
        fits = [p for p, free in enumerate(room) if lengths[i] <= free]
        if fits:
            target = fits[0]
        else:
            target = len(room)
            room.append(max(capacity, lengths[i]))
        room[target] -= lengths[i]
        pack[i] = target
    return pack


def sequence_packing(batch: dict[str, Any], decoder: torch.nn.Module) -> RowPacking | None:
    """Where each row of a right-padded SFT batch goes in its packed rows, or ``None`` for its own rows.

    ``None`` for a batch not marked for packing, an attention implementation that takes neither a
    custom mask nor varlen boundaries, a batch that is not right-padded, and a sliding attention
    window shorter than a sequence (a custom mask replaces the model's own window).
    """
    width_setting = batch.get(PACK_KEY)
    mode = attention_mode(decoder)
    if not width_setting or mode is None:
        return None
    attention = batch["attention_mask"].bool()
    lengths = attention.sum(-1)
    position = torch.arange(attention.shape[1], device=attention.device)
    if not torch.equal(attention, position < lengths[:, None]):
        return None
    window = getattr(getattr(decoder, "config", None), "sliding_window", None)
    if window is not None and int(lengths.max()) > int(window):
        return None
    listed = lengths.tolist()
    if mode == "varlen" or segments_apply(decoder, lengths.device):
        # The kernel's (or the segment-by-segment attention's) cost is per sequence: one row, no padding at all.
        capacity = sum(listed)
    else:
        capacity = max(listed) if width_setting is True else int(width_setting)
    pack = torch.tensor(first_fit_decreasing(listed, capacity), dtype=torch.long, device=lengths.device)
    # Inside a packed row, sequences follow in row order; each moves right past those before it.
    same = pack[:, None] == pack[None, :]
    earlier = torch.ones_like(same).tril(-1)
    before = same & earlier
    shift = (before * lengths[None, :]).sum(-1)
    # No shared prompt: every token is a "completion" token, so each sequence is its own segment.
    return RowPacking(pack=pack, slot=before.sum(-1), shift=shift,
                      prompt_lengths=torch.zeros_like(lengths), lengths=lengths)


def pack_sequences(batch: dict[str, Any], decoder: torch.nn.Module) -> PackedRows | None:
    """The packed tensors of a batch marked for packing, or ``None`` where it runs its own rows."""
    packing = sequence_packing(batch, decoder)
    if packing is None:
        return None
    if attention_mode(decoder) != "varlen":
        return pack_rows(batch, decoder, packing)
    ids = batch["input_ids"]
    columns = torch.arange(ids.shape[1], device=ids.device)[None, :].expand_as(ids)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    real = columns < packing.lengths[:, None]
    width = int(packing.lengths.sum())
    flat = packing.flat_index(rows[real], columns[real], width)
    input_ids = ids.new_zeros(width).index_put((flat,), ids[real])[None]
    position_ids = torch.zeros_like(input_ids[0]).index_put((flat,), columns[real])[None]
    # No mask: transformers finds each sequence where its position ids restart at 0.
    return PackedRows(input_ids=input_ids, position_ids=position_ids, attention_mask=None,  # type: ignore[arg-type]
                      packing=packing)
