"""The one sampler: completions for prompts from a causal LM, used by the ``hf`` generation engine
(rollouts), ``eval.generate`` and ``aligner label``.

Prompts are left-padded into batches and decoded with the KV cache by a lean loop of our own:

- each distinct prompt is prefilled once, and its cache is repeated for its ``samples_per_prompt``
  samples (a GRPO group of 8 prefills its prompt once, not 8 times);
- decoding stops as soon as every row has produced its end-of-sequence token;
- every sampled token's log-probability under the model (the raw logits, before temperature or
  nucleus filtering: the distribution the trainer scores) is returned with it, so a trainer can
  compare its own log-probs with the generator's.

Sampling is plain ancestral sampling at ``temperature`` with optional nucleus ``top_p`` and no top-k
cut (an RL rollout must sample the policy's own distribution); ``temperature: 0`` is greedy. The
operations and their order are those of ``transformers``' ``generate`` (temperature, then top-p,
softmax, one ``multinomial`` per step over the batch), so the same seed draws the same tokens.
Models the loop cannot drive (PEFT prompt learning, which prepends virtual tokens inside the
wrapper's ``forward``; models without a position-id or cache interface) use ``generate`` itself,
still with the per-token log-probs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from aligner.reporting.metrics import Progress


@dataclass
class Samples:
    """Sampled completions, prompt-major (the samples of one prompt are consecutive), cut after the
    first EOS (which is kept), with each token's log-probability under the sampling model."""

    completions: list[list[int]]
    logprobs: list[list[float]]


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
           temperature: float, top_p: float, batch_size: int, samples_per_prompt: int = 1, seed: int | None = None,
           progress: str | None = None) -> Samples:
    """``samples_per_prompt`` sampled completions per prompt and their log-probs.

    ``batch_size`` is the number of rows (samples) decoded together; a batch always holds whole
    groups of one prompt's samples. ``seed`` samples from a private RNG stream seeded with it and
    leaves the global one untouched (evaluation must not change the training run); without it the
    global RNG is used and advanced. ``progress`` names a progress display (for ``aligner label``).
    """
    device = next(model.parameters()).device
    forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
        else contextlib.nullcontext()
    prompts_per_batch = max(1, batch_size // samples_per_prompt)
    cache_argument = _cache_argument(model)
    decode_batch = functools.partial(_decode_batch, cache_argument=cache_argument) if cache_argument \
        else _generate_batch
    result = Samples([], [])
    bar = Progress(progress, len(prompt_ids) * samples_per_prompt) if progress else None
    was_training = model.training
    model.eval()
    try:
        with forked:
            if seed is not None:
                torch.manual_seed(seed)
            for begin in range(0, len(prompt_ids), prompts_per_batch):
                chunk = prompt_ids[begin:begin + prompts_per_batch]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                tokens, logps = decode_batch(model, ids, mask, samples_per_prompt, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, eos=tokenizer.eos_token_id,
                                             pad=tokenizer.pad_token_id)
                _append_cut(result, tokens.tolist(), logps.tolist(), tokenizer.eos_token_id)
                if bar is not None:
                    bar.update(len(result.completions))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return result


def sample_completions(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
                       temperature: float, top_p: float, batch_size: int, seed: int | None = None,
                       progress: str | None = None) -> list[list[int]]:
    """One sampled completion per prompt (``sample`` without the log-probs)."""
    return sample(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  batch_size=batch_size, seed=seed, progress=progress).completions


def decode(tokenizer: Any, completions: list[list[int]]) -> list[str]:
    """Completion texts without special tokens."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``logits`` ``[B, V]``; return it and its raw log-probability."""
    logits = logits.float()
    if temperature > 0:
        scores = logits / temperature if temperature != 1.0 else logits
        if top_p < 1.0:
            scores = _nucleus(scores, top_p)
        chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    else:
        chosen = logits.argmax(-1)
    logps = logits.gather(-1, chosen[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return chosen, logps


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def cut_after_eos(ids: list[int], logps: list[float], eos: int | None) -> tuple[list[int], list[float]]:
    """A completion up to and including its first ``eos``, with its log-probs (every engine returns
    completions cut this way; decoding, or a server that ignores stop tokens, may have gone on)."""
    if eos is not None and eos in ids:
        end = ids.index(eos) + 1
        return ids[:end], logps[:end]
    return ids, logps


def _append_cut(result: Samples, tokens: list[list[int]], logps: list[list[float]], eos: int) -> None:
    for row, values in zip(tokens, logps, strict=True):
        completion, completion_logps = cut_after_eos(row, values, eos)
        result.completions.append(completion)
        result.logprobs.append(completion_logps)


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which ``model``'s forward takes the KV cache (``cache`` in transformers 5,
    ``past_key_values`` before), or ``None`` if ``_decode_batch`` cannot drive it: a model without a
    cache or position ids, or PEFT prompt learning (whose virtual tokens only its own ``generate`` adds)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return None
    parameters = inspect.signature(type(_inner(model)).forward).parameters
    if "position_ids" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _decode_batch(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, repeats: int, *,
                  max_new_tokens: int, temperature: float, top_p: float, eos: int, pad: int,
                  cache_argument: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill each left-padded prompt once, repeat its cache ``repeats`` times, then decode one token
    per step for every row until all rows have ended; return ``[rows, steps]`` tokens and log-probs
    (pad and 0 after a row's EOS)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(_inner(model)).forward).parameters \
        else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    cache, logits = _returned_cache(out), out.logits[:, -1]
    if not hasattr(cache, "batch_repeat_interleave"):
        # A legacy tuple cache (some remote-code models) cannot be repeated per sample: generate() instead.
        return _generate_batch(model, ids, mask, repeats, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, eos=eos, pad=pad)
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask = logits.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    position = positions[:, -1].repeat_interleave(repeats, 0)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=ids.device)
    tokens, logps = [], []
    for step in range(max_new_tokens):
        chosen, chosen_logps = next_tokens(logits, temperature, top_p)
        chosen = chosen.masked_fill(done, pad)
        tokens.append(chosen)
        logps.append(chosen_logps.masked_fill(done, 0.0))
        done = done | (chosen == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None],
                    use_cache=True, **{cache_argument: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def _generate_batch(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, repeats: int, *,
                    max_new_tokens: int, temperature: float, top_p: float, eos: int,
                    pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_decode_batch`` through the model's own ``generate`` (each prompt repeated, prefilled per row)."""
    ids, mask = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                         eos_token_id=eos, use_cache=True, output_logits=True, return_dict_in_generate=True,
                         **sampling)
    tokens = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, dim=1).float()  # [rows, steps, V], raw
    logps = logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return tokens, logps


def _returned_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out.past_key_values


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
