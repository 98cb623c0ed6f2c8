"""The ``hf`` generation engine (the default): the policy module being trained samples its own rollouts
through aligner's sampler (``aligner.online.sampler``): left-padded batches, the KV cache, each
prompt prefilled once for its whole group, decoding stopped once every row has ended."""

from __future__ import annotations

from typing import Any

import torch

from aligner.hookspecs import hookimpl
from aligner.online.engines import GenerationEngine, GenerationRequest, Generations
from aligner.online.sampler import sample


class HFEngine(GenerationEngine):
    """Generation by the trained module itself: always on-policy, nothing to synchronise."""

    name = "hf"

    def generate(self, policy: torch.nn.Module, tokenizer: Any, request: GenerationRequest) -> Generations:
        """Sample with ``aligner.online.sampler.sample``."""
        samples = sample(policy, tokenizer, request.prompt_ids, max_new_tokens=request.max_new_tokens,
                         temperature=request.temperature, top_p=request.top_p, batch_size=request.batch_size,
                         samples_per_prompt=request.samples_per_prompt, seed=request.seed)
        return Generations(samples.completions, samples.logprobs)


@hookimpl
def register_generation_engines(register):
    """Register the ``hf`` engine."""
    register(HFEngine)
