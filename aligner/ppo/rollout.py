"""Sampling completions for prompts, and turning (prompt, completion) token ids into a batch."""

from __future__ import annotations

from typing import Any

import torch

from aligner.data.batching import collate
from aligner.protocols import SFT
from aligner.tracking import Progress


@torch.no_grad()
def sample_completions(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
                       temperature: float, top_p: float, batch_size: int,
                       progress: str | None = None) -> list[list[int]]:
    """One sampled completion per prompt, as token ids cut after the first EOS (which is kept).

    Prompts are left-padded into batches of ``batch_size`` and generated with the KV cache;
    ``progress`` names a progress display (for long runs such as ``aligner label``).
    """
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    completions: list[list[int]] = []
    bar = Progress(progress, len(prompt_ids)) if progress else None
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[begin:begin + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 pad_token_id=pad, eos_token_id=eos, use_cache=True)
            for row in out[:, width:].tolist():
                completions.append(row[: row.index(eos) + 1] if eos in row else row)
            if bar is not None:
                bar.update(len(completions))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return completions


def rollout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded tensors for (prompt, completion) pairs, exactly as SFT batches are collated.

    An empty completion keeps one pad token so that every row has a completion position.
    """
    examples = [{"row_id": i, "prompt_ids": p, "completion_ids": c or [pad_token_id]}
                for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True))]
    return collate(examples, data_format=SFT, pad_token_id=pad_token_id)
