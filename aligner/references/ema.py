"""``ema``: a reference that follows the policy, TR-DPO style (Gorbatovski et al., 2024, "Learn Your
Reference Model for Real Good Alignment").

Every ``sync_steps`` (tau) optimizer updates the reference's weights move toward the policy's:

    ref <- alpha * policy + (1 - alpha) * ref

``alpha: 1.0`` is TR-DPO's hard update (the reference becomes the current policy every tau updates),
``0 < alpha < 1`` its soft update (an exponential moving average, taken every tau updates). Until the
first sync the reference is the policy as the stage started, exactly as ``frozen_copy``.

Design (memory). Only the weights that train can differ between the policy and its reference, so
only those are copied: with LoRA-style adapters the adapter weights (a few MB), with full fine-tuning
every parameter (one more copy of the weights, as ``frozen_copy``), with ``bitfit`` the biases. The
copy is held in the parameters' own dtype and device. A reference pass runs the live policy module
itself, without gradient and in eval mode, with the copy *swapped in*: each trainable parameter's
storage is exchanged with its copy's (a pointer swap, no tensor is copied or allocated) for the
duration of the pass and swapped back after, also when the pass fails. So there is no second model,
no second adapter, and no extra memory beyond the copy and the pass's activations.

The copy is part of every checkpoint (``reference_state.safetensors``, with the count of syncs in
``trainer_state.json``): a resumed run continues from the checkpointed reference, bit for bit as an
uninterrupted one. The update is counted by the LR schedule's count of applied updates (updates the
non-finite guard skipped do not count; PPO's several updates per step each do).

Refused (a config error naming ``stages[i].reference``): FSDP and DeepSpeed, whose sharded
parameters cannot be swapped for a whole copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import Field

from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.protocols import Options, ReferenceContext, ReferenceStep, SequenceLogProbs
from aligner.training.checkpoint_manifest import CheckpointError
from aligner.training.distributed import sharded_launch


class EMAReference:
    """The policy's trainable weights, copied at the start and moved toward the policy every
    ``sync_steps`` updates; reference passes run the live policy with the copy swapped in."""

    name = "ema"

    class Options(Options):
        """How fast the reference follows the policy."""

        alpha: float = Field(0.6, gt=0, le=1, description=(
            "weight of the policy at each sync: ref = alpha * policy + (1 - alpha) * ref; 1.0 is a hard "
            "sync (TR-DPO's hard update: the reference becomes the current policy)"))
        sync_steps: int = Field(512, ge=1, description="optimizer updates between syncs (TR-DPO's tau)")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.model: torch.nn.Module | None = None
        self.logprobs_fn: Any = None
        self.weights: dict[str, torch.Tensor] = {}  # parameter name -> the reference's value
        self.syncs = 0
        self.stage_key = "stages[?].reference"

    def setup(self, context: ReferenceContext) -> None:
        """Copy the policy's trainable weights (before any update); keep a handle on the live policy."""
        stage = context.stage
        if stage is not None and getattr(stage, "index", None) is not None:
            self.stage_key = f"stages[{stage.index}].reference"
        sharded = sharded_launch()
        if sharded:
            raise ConfigError(f"reference 'ema' ('{self.stage_key}') runs on one process or DDP, not {sharded}: "
                              "its weights are sharded and cannot be swapped for a whole copy; use reference "
                              "'frozen_copy' or 'disabled_adapter' there")
        self.model = context.policy
        self.logprobs_fn = context.logprobs_fn
        with torch.no_grad():
            self.weights = {name: p.detach().clone() for name, p in context.policy.named_parameters()
                            if p.requires_grad}
        if not self.weights:
            raise ConfigError(f"reference 'ema' ('{self.stage_key}'): the PEFT backend "
                              f"'{getattr(context.peft_backend, 'name', '?')}' left no trainable weights to follow")
        self.syncs = 0

    def after_optimizer_step(self, step: ReferenceStep) -> None:
        """Every ``sync_steps`` updates: ``ref = alpha * policy + (1 - alpha) * ref`` (a copy for ``alpha: 1``)."""
        if step.updates % self.options.sync_steps != 0:
            return
        alpha = self.options.alpha
        params = dict(step.policy.named_parameters())
        with torch.no_grad():
            for name in list(self.weights):
                live = params.get(name)
                if live is None or live.shape != self.weights[name].shape:
                    raise RuntimeError(f"reference 'ema': the policy's parameter {name!r} is "
                                       f"{'gone' if live is None else f'of shape {tuple(live.shape)}'} since setup "
                                       f"(was {tuple(self.weights[name].shape)}); sharded training (FSDP, DeepSpeed) "
                                       "is not supported")
                ref = self._beside(name, live)
                if alpha == 1.0:
                    ref.copy_(live)
                else:
                    ref.mul_(1 - alpha).add_(live.to(ref.dtype), alpha=alpha)
        self.syncs += 1

    def _beside(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The copy of ``name`` on ``param``'s device and in its dtype. The copy is taken at setup, before
        the run moves the model to its device (or casts it): it follows the parameter there once."""
        ref = self.weights[name]
        if ref.device != param.device or ref.dtype != param.dtype:
            ref = self.weights[name] = ref.to(device=param.device, dtype=param.dtype)
        return ref

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[torch.nn.Module]:
        """The live policy, in eval mode, with the reference's weights in place of its trainable ones;
        everything (weights, train/eval mode of every module) is put back on exit."""
        assert self.model is not None, "setup() was not called"
        params = dict(self.model.named_parameters())
        modes = [(m, m.training) for m in self.model.modules()]
        swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            for name in self.weights:
                param = params[name]
                swapped.append((param, param.data))
                param.data = self._beside(name, param)
            self.model.eval()
            yield self.model
        finally:
            for param, live in swapped:
                param.data = live
            for module, training in modes:
                module.training = training

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Any], token_level: bool = False) -> SequenceLogProbs:
        """Reference log-probs of the batch's completions (per token too when ``token_level``, for PPO)."""
        with self.swapped_in() as model:
            result = self.logprobs_fn(model, batch, token_level=token_level)
        return result.detach()

    def state_dict(self) -> dict[str, Any]:
        """The reference's weights (into ``reference_state.safetensors``), the number of syncs and the options."""
        return {"weights": dict(self.weights), "syncs": self.syncs, "alpha": self.options.alpha,
                "sync_steps": self.options.sync_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's reference (refusing one without it, or for other weights)."""
        saved = state.get("weights") if state else None
        if not saved:
            raise CheckpointError(f"reference 'ema' ('{self.stage_key}'): the checkpoint holds no ema reference "
                                  "state (it was written with another reference); resuming would restart the "
                                  "reference from the stage's starting weights. Resume with the reference the "
                                  "checkpoint was trained with, or start the stage again")
        if set(saved) != set(self.weights):
            missing, extra = sorted(set(self.weights) - set(saved)), sorted(set(saved) - set(self.weights))
            raise CheckpointError(f"reference 'ema' ('{self.stage_key}'): the checkpoint's reference weights do not "
                                  f"match the policy's trainable ones (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, ref in self.weights.items():
                value = saved[name]
                if value.shape != ref.shape:
                    raise CheckpointError(f"reference 'ema' ('{self.stage_key}'): checkpoint weight {name!r} has "
                                          f"shape {tuple(value.shape)}, the policy's {tuple(ref.shape)}")
                ref.copy_(value)
        self.syncs = int(state.get("syncs", 0))


@hookimpl
def register_reference_policies(register):
    """Register ``ema``."""
    register(EMAReference)
