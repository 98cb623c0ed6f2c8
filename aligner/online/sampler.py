"""The one sampler: completions for prompts from a causal LM, used by rollouts, ``eval.generate`` and
``aligner label``.

Prompts are left-padded into batches and generated with the KV cache; generation of a batch stops
once every row has produced its end-of-sequence token. Sampling is plain ancestral sampling at
``temperature`` with optional nucleus ``top_p`` and no top-k cut (an RL rollout must sample the
policy's own distribution); ``temperature: 0`` is greedy decoding.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from aligner.tracking import Progress


@torch.no_grad()
def sample_completions(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
                       temperature: float, top_p: float, batch_size: int, seed: int | None = None,
                       progress: str | None = None) -> list[list[int]]:
    """One sampled completion per prompt, as token ids cut after the first EOS (which is kept).

    ``seed`` samples from a private RNG stream seeded with it and leaves the global one untouched
    (evaluation must not change the training run); without it the global RNG is used and advanced.
    ``progress`` names a progress display (for long runs such as ``aligner label``).
    """
    device = next(model.parameters()).device
    forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
        else contextlib.nullcontext()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    completions: list[list[int]] = []
    bar = Progress(progress, len(prompt_ids)) if progress else None
    was_training = model.training
    model.eval()
    try:
        with forked:
            if seed is not None:
                torch.manual_seed(seed)
            for begin in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[begin:begin + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, eos_token_id=eos, use_cache=True, **sampling)
                for row in out[:, width:].tolist():
                    completions.append(row[: row.index(eos) + 1] if eos in row else row)
                if bar is not None:
                    bar.update(len(completions))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return completions


def decode(tokenizer: Any, completions: list[list[int]]) -> list[str]:
    """Completion texts without special tokens."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
