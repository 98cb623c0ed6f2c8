"""Generation engines: how an online stage samples its rollouts, a registrable plugin kind.

An engine is chosen per stage by the algorithm's ``engine: {name: ..., <options>}`` (default ``hf``)
and registered with the ``register_generation_engines`` hook. Built in, one module each:

- ``hf``: the policy module itself, through aligner's sampler (prompt prefilled once per group,
  KV cache, stops when every row has ended);
- ``openai_server``: an OpenAI-compatible completions server (``vllm serve``, SGLang), with the
  policy's weights or LoRA adapter pushed to it after every update where the server supports it;
- ``vllm``: vLLM colocated in the training process (GPU only, optional extra).

Every engine returns the generator's own log-probability of each token it sampled (raw logits, before
temperature and nucleus filtering: the distribution the trainer scores); algorithms log how far the
trainer's log-probs of the same tokens are from them and can correct for the gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from aligner.protocols import Options


@dataclass
class GenerationRequest:
    """What to sample: ``samples_per_prompt`` completions of at most ``max_new_tokens`` tokens for each
    prompt (token ids, no padding).

    ``policy_version`` counts the optimizer updates applied to the policy so far: an engine that holds
    its own copy of the weights (a server, vLLM) refreshes it when the version has changed.
    ``batch_size`` is how many rows a local engine decodes together.
    """

    prompt_ids: list[list[int]]
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    policy_version: int = 0
    seed: int | None = None


@dataclass
class Generations:
    """An engine's answer, prompt-major (a prompt's samples are consecutive): each completion's token
    ids cut after its first EOS (kept), and the generator's log-probability of every token."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]]


class GenerationEngine:
    """Base class of generation engines, with defaults for the optional members.

    A subclass sets ``name`` (and ``Options`` if it has settings) and implements ``generate``.
    ``__init__`` must not connect, load or write anything: an engine is also built once, and thrown
    away, while the config is validated. Do that work at the first ``generate``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options):
        self.options = options

    def check_stage(self, stage: Any) -> None:
        """Refuse a stage this engine cannot serve (``ConfigError`` naming the key); runs before any model
        loads. Default: every stage."""

    def generate(self, policy: torch.nn.Module, tokenizer: Any, request: GenerationRequest) -> Generations:
        """Sample the completions ``request`` asks for from ``policy`` (the unwrapped module being trained)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds (connections, a colocated engine); called when the stage ends."""


def build_engine(choice: dict[str, Any]) -> GenerationEngine:
    """Instantiate an engine from ``{name: ..., **options}``; a ``ValueError`` names the bad key."""
    from aligner.plugins import build_from_mapping

    return build_from_mapping("generation engine", choice, "engine", "{name: hf}")
