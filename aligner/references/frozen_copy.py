"""``frozen_copy``: a frozen copy of the policy as it was at the start of the stage."""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.protocols import Options, ReferenceContext, SequenceLogProbs


class FrozenCopyReference:
    """Deep-copies the starting policy, freezes it, and runs it without gradient.

    ``device: cpu`` keeps the copy off the accelerator (slower, frees its memory).
    """

    name = "frozen_copy"
    # ``reference: auto``'s last resort: works for every stage that needs a reference (the default
    # ``usable_for``), at the cost of a second copy of the weights.
    auto_priority = 10

    class Options(Options):
        """Where the copy lives."""

        device: str | None = Field(None, description="device for the copy; default: the policy's")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.model: torch.nn.Module | None = None
        self.logprobs_fn: Any = None
        self.device: torch.device | None = None

    def setup(self, context: ReferenceContext) -> None:
        """Copy and freeze the policy."""
        self.device = torch.device(self.options.device) if self.options.device else context.device
        self.model = copy.deepcopy(context.policy).to(self.device).eval()
        self.model.requires_grad_(False)
        self.logprobs_fn = context.logprobs_fn

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Any], token_level: bool = False) -> SequenceLogProbs:
        """Reference log-probs of the batch's completions (per token too when ``token_level``, for PPO)."""
        assert self.model is not None, "setup() was not called"
        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        result = self.logprobs_fn(self.model, moved, token_level=token_level)
        device = batch["input_ids"].device
        return SequenceLogProbs(
            result.logps.to(device), result.num_tokens.to(device),
            token_logps=None if result.token_logps is None else result.token_logps.to(device),
            mask=None if result.mask is None else result.mask.to(device),
        )


@hookimpl
def register_reference_policies(register):
    """Register ``frozen_copy``."""
    register(FrozenCopyReference)
