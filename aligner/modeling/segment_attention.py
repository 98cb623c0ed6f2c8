"""Attention over packed rows computed segment by segment, without a dense mask.

Two layouts put several sequences in one row: SFT packing (``aligner.data.packing``: independent
sequences one after the other) and the shared-prompt layout (``aligner.modeling.shared_prompt``: a
prompt once, then completions that each see the prompt and themselves). A dense 4D mask describes
either, but attention then computes every masked block anyway, and on CPU the mask costs
``rows x width^2`` elements (the CPU kernels hold a boolean mask as floats, 4 bytes an element; issue
17 measured one 5950-token two-completion row at 334 MiB in one layer, 65 MiB without a mask).

Here a row is described by a ``SegmentLayout`` instead: per packed row, the prompt length ``P`` and
the lengths ``L`` of the segments after it. Attention runs one ``scaled_dot_product_attention`` call
per segment, each with exactly the keys its tokens see in their own unpacked row:

- a segment without a prompt (SFT packing): causal over itself (``is_causal``, no mask);
- a segment after a prompt at least as long as the prompt (``L >= P``): ``[prompt, segment]`` replayed
  as one causal sequence (``is_causal``, no mask; ``(P + L)^2 / 2`` work, the cost of the segment's own
  row), of which the segment's outputs are kept; the first such replay also gives the prompt's outputs;
- a shorter segment (``L < P``): its queries against the keys ``[prompt, segment]`` with an additive
  mask of its own size, ``L x (P + L)`` (every prompt key, then causal), built once per forward and
  shared by every layer (``L (P + L)`` work instead of ``(P + L)^2 / 2``);
- the prompt's own outputs, where no replay gave them: causal over itself;
- padding after a row's last segment: zeros (never read, but finite, so no NaN reaches a gradient).

No work is spent on the blocks a dense mask would remove, and nothing of size ``width^2`` is
allocated. Measured on CPU (``bench/shared_prompt_memory.py``, one pair of prompt 3950 + chosen 1000
+ rejected 1000 tokens, forward and backward, peak resident memory over the step's start): one layer
204 MiB with the dense mask, 63 MiB segment by segment (two unpacked rows: 59 MiB); four layers 688
against 160 MiB (two rows: 190 MiB), since the dense mask was converted and kept for backward in
every layer. SFT packing (``bench/sft_packing.py``) now packs a micro-batch into one row without
padding, as a varlen kernel does (see docs/configuration.md, ``data.packing``, for the speed).

How the layout reaches the attention function: the function is registered with transformers'
``AttentionInterface`` as ``"aligner_segments"`` (no mask function is registered for that name, so
transformers' mask builders return ``None`` without building anything). ``run_decoder`` switches the
decoder's ``config._attn_implementation`` to that name for the duration of its forward and passes the
layout as the keyword argument ``aligner_segments``, which every decoder layer forwards to its
attention function (Llama, Qwen2 and the other plain-head families; under a LoRA-style PEFT wrapper
the decoder is the base model's, called directly). Gradient checkpointing recomputes a layer during
the backward pass, after the forward has restored the config: ``run_decoder`` therefore wraps each
checkpointed layer's checkpoint function for the forward, so that the replay switches the
implementation again (the layout itself is among the replayed call's arguments). As a safety net,
the decoder gets a 4D placeholder mask of shape ``[rows, 1, 0, width]``: transformers passes a 4D mask
through unchanged, and any other attention function given it fails loudly instead of attending
over the whole row. While ``run_decoder`` runs, the model's config names ``"aligner_segments"``: another
thread must not run the same model meanwhile (aligner runs its forwards one at a time).

When it is used (``segments_apply``): for a decoder whose implementation is ``sdpa`` or ``eager``
(the ones that take the dense mask otherwise), on CPU by default. The config key
``model.packed_attention`` chooses (``segments``: on every device, ``mask``: never, the dense mask
then serves both layouts; ``auto``: on CPU); training sets it for its duration with
``packed_attention``. Code that calls these functions directly (benchmarks, tests) can set the
environment variable ``ALIGNER_SEGMENT_ATTENTION`` (``1``, ``0``, ``auto``) instead; a config value
other than ``auto`` wins over it. The
kernels are torch's SDPA either way, so an ``eager`` model gets SDPA's numerics for packed rows (the
same values within float rounding; no attention weights are returned). FlashAttention-style kernels
keep their own variable-length path. Requires a decoder whose layers forward extra keyword arguments
to the attention function (transformers' ``TransformersKwargs`` models: Llama, Mistral, Qwen2/3,
Phi-3, OLMo-2, SmolLM3, the plain-head list of ``aligner.modeling.plain_head``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# The name registered with transformers' AttentionInterface, and the keyword that carries the layout.
IMPLEMENTATION = "aligner_segments"
LAYOUT_KWARG = "aligner_segments"
# Implementations whose dense-mask path this one replaces.
REPLACES = frozenset({"sdpa", "eager"})
ENV = "ALIGNER_SEGMENT_ATTENTION"  # "auto" (default: on CPU), "1" (every device) or "0" (never)
# The run's ``model.packed_attention`` while it trains ("auto", "segments" or "mask"); None outside a run.
_CONFIGURED: ContextVar[str | None] = ContextVar("aligner_packed_attention", default=None)
PACKED_ATTENTION_CHOICES = ("auto", "segments", "mask")


@contextlib.contextmanager
def packed_attention(choice: str) -> Iterator[None]:
    """Use ``choice`` (``model.packed_attention``: ``auto``, ``segments`` or ``mask``) for packed rows
    while the block runs."""
    if choice not in PACKED_ATTENTION_CHOICES:
        raise ValueError(f"packed attention must be one of {PACKED_ATTENTION_CHOICES}, got {choice!r}")
    token = _CONFIGURED.set(choice)
    try:
        yield
    finally:
        _CONFIGURED.reset(token)


@dataclass(frozen=True)
class SegmentLayout:
    """Per packed row: ``(prompt length, lengths of the segments after it)``; segments are contiguous
    from the end of the prompt on, and positions after the last one are padding."""

    rows: tuple[tuple[int, tuple[int, ...]], ...]
    width: int
    # (prompt, length, dtype, device) -> additive mask; built once per forward, shared by every layer
    # (autograd then saves one tensor for all of them, not one per layer).
    _masks: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def totals(self) -> list[int]:
        """Real tokens of each packed row."""
        return [prompt + sum(segments) for prompt, segments in self.rows]

    def mask(self, prompt: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """``[length, prompt + length]`` additive mask (``like``'s dtype): 0 on every prompt key and on
        the segment's own keys up to the query, ``-inf`` after it."""
        key = (prompt, length, like.dtype, like.device)
        if key not in self._masks:
            allowed = torch.ones(length, prompt + length, dtype=torch.bool, device=like.device).tril(prompt)
            self._masks[key] = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
                ~allowed, float("-inf"))
        return self._masks[key]


def segments_apply(decoder: torch.nn.Module, device: torch.device) -> bool:
    """Whether packed rows of ``decoder`` on ``device`` run segment by segment (else a dense mask)."""
    configured = _CONFIGURED.get()
    if configured in ("segments", "mask"):
        setting = "1" if configured == "segments" else "0"
    else:
        setting = os.environ.get(ENV, "auto").strip().lower()
    if setting in ("0", "false", "off", "no"):
        return False
    implementation = getattr(getattr(decoder, "config", None), "_attn_implementation", None) or "eager"
    if implementation not in REPLACES:
        return False
    return setting in ("1", "true", "on", "yes") or torch.device(device).type == "cpu"


def segment_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; the layout comes as ``aligner_segments``.

    ``query`` is ``[rows, heads, width, dim]``, ``key``/``value`` ``[rows, kv_heads, width, dim]``;
    returns ``[rows, width, heads, dim]`` and no attention weights. ``attention_mask`` (the placeholder)
    is not read.
    """
    layout: SegmentLayout | None = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} needs the {LAYOUT_KWARG!r} keyword "
                           "(call the decoder through aligner.modeling.segment_attention.run_decoder)")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"segment attention does not support {unsupported!r}")
    totals = layout.totals()
    if len(totals) != query.shape[0] or max(totals, default=0) > query.shape[2]:
        raise ValueError(f"the segment layout ({len(totals)} rows, longest {max(totals, default=0)} tokens) does "
                         f"not fit the packed rows ({query.shape[0]} x {query.shape[2]})")
    window = kwargs.get("sliding_window")
    if window is not None and max(totals, default=0) > int(window):
        raise ValueError(f"a packed row is longer than the sliding window ({window})")
    attend = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling,
                               enable_gqa=query.shape[1] != key.shape[1])
    width = query.shape[2]
    outputs = []
    # Rows by split, not by slicing (see _independent_segments).
    per_row = list(zip(query.split(1), key.split(1), value.split(1), strict=True))
    for (prompt, segments), (q, k, v) in zip(layout.rows, per_row, strict=True):
        if not prompt:  # independent sequences (SFT packing)
            outputs.append(_independent_segments(attend, q, k, v, segments, width))
            continue
        pieces: list[torch.Tensor] = []
        prompt_out = None
        start = prompt
        for length in segments:
            end = start + length
            if length >= prompt:
                # Replay: [prompt, segment] as one causal sequence; the first replay's prompt rows are the
                # prompt's own outputs, later ones are dropped. Costs (P + L)^2 / 2, no mask.
                ids = [slice(0, prompt), slice(start, end)]
                out = attend(*(torch.cat([t[:, :, i] for i in ids], dim=2) for t in (q, k, v)), is_causal=True)
                if prompt_out is None:
                    prompt_out = out[:, :, :prompt]
                pieces.append(out[:, :, prompt:])
            else:
                # The segment's queries against [prompt, segment] keys, with an additive mask of their own
                # size, shared by every layer of the forward. Costs L (P + L).
                keys, values = (torch.cat([t[:, :, :prompt], t[:, :, start:end]], dim=2) for t in (k, v))
                pieces.append(attend(q[:, :, start:end], keys, values, attn_mask=layout.mask(prompt, length, q)))
            start = end
        if prompt_out is None:
            prompt_out = attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], is_causal=True)
        pieces.insert(0, prompt_out)
        if start < width:  # padding: finite zeros, never read
            pieces.append(q.new_zeros(1, q.shape[1], width - start, value.shape[-1]))
        outputs.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out.transpose(1, 2).contiguous(), None


def _independent_segments(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          segments: tuple[int, ...], width: int) -> torch.Tensor:
    """One packed row of independent causal sequences (``[1, heads, width, dim]`` each), padded to
    ``width``. ``split`` rather than one slice per sequence: the backward pass of a slice writes its
    gradient into a zero tensor as large as the whole row, once per sequence; a split's backward
    concatenates the pieces once."""
    used = sum(segments)
    sizes = list(segments) + ([width - used] if used < width else [])
    pieces = [attend(*parts, is_causal=True)
              for parts in zip(*(t.split(sizes, dim=2)[:len(segments)] for t in (q, k, v)), strict=True)]
    if used < width:  # padding: finite zeros, never read
        pieces.append(q.new_zeros(1, q.shape[1], width - used, v.shape[-1]))
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]


_registered = False


def register() -> None:
    """Register ``segment_attention_forward`` with transformers, once (no mask function, on purpose)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(IMPLEMENTATION, segment_attention_forward)
        _registered = True


@contextlib.contextmanager
def _implementation(config: Any, name: str) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _replay_with_segments(checkpoint_function: Callable, config: Any, function: Callable, *args: Any,
                          **kwargs: Any) -> Any:
    """A layer's checkpoint function whose recomputation (in the backward pass) runs under segment attention too."""
    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        with _implementation(config, IMPLEMENTATION):
            return function(*inner_args, **inner_kwargs)

    return checkpoint_function(run, *args, **kwargs)


@contextlib.contextmanager
def _checkpoints_replay_segments(decoder: torch.nn.Module, config: Any) -> Iterator[None]:
    layers = [m for m in decoder.modules()
              if getattr(m, "gradient_checkpointing", False) and callable(getattr(m, "_gradient_checkpointing_func", None))]
    originals = [m._gradient_checkpointing_func for m in layers]
    for layer, original in zip(layers, originals, strict=True):
        layer._gradient_checkpointing_func = functools.partial(_replay_with_segments, original, config)
    try:
        yield
    finally:
        for layer, original in zip(layers, originals, strict=True):
            layer._gradient_checkpointing_func = original


def run_decoder(decoder: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: SegmentLayout,
                **kwargs: Any) -> Any:
    """``decoder(...)`` over packed rows with segment attention: the decoder's output, no dense mask built."""
    register()
    config = decoder.config
    placeholder = torch.zeros(input_ids.shape[0], 1, 0, input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
    with _implementation(config, IMPLEMENTATION), _checkpoints_replay_segments(decoder, config):
        return decoder(input_ids=input_ids, attention_mask=placeholder, position_ids=position_ids,
                       **{LAYOUT_KWARG: layout}, **kwargs)
