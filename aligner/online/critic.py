"""The critic of actor-critic methods (PPO): a value head on the policy's last hidden state, its
clipped loss and how well it explains the returns."""

from __future__ import annotations

from typing import Any

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from aligner.modeling.logprobs import token_window_start
from aligner.online.advantages import masked_mean, masked_var


class PolicyWithValueHead(torch.nn.Module):
    """``policy`` (a causal LM, possibly peft-wrapped) and ``value_head``, a linear map to one value.

    One forward gives both, from the same hidden states, so the critic costs one small matmul. The
    head starts at zero so the first value estimates are 0 rather than noise.
    """

    def __init__(self, policy: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-token log-probs, entropies and values of each completion token (``[N, T]``, masked).

        Column ``t`` is the token at ``start + 1 + t`` where ``start`` is one before the batch's
        earliest completion token; its value is the critic's estimate of the state before it.
        """
        input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
        # A minibatch of a rollout keeps the rollout's window (``window_start``) so that its columns
        # line up with the rollout's stored log-probs, values and advantages.
        start = token_window_start(batch)
        out = self.policy(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False,
                          output_hidden_states=True)
        logits = out.logits[:, start:-1].float()
        hidden = out.hidden_states[-1][:, start:-1]
        mask = completion_mask[:, start + 1:].bool()
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return {
            "logps": selective_log_softmax(logits, input_ids[:, start + 1:]) * mask,
            "entropy": entropy_from_logits(logits.detach()) * mask,
            "values": values * mask,
            "mask": mask,
        }

    def save_pretrained(self, directory: Any, safe_serialization: bool = True) -> None:
        """Save the policy as usual (the full model, or only its adapter) and the head beside it."""
        from pathlib import Path

        from safetensors.torch import save_file

        self.policy.save_pretrained(directory, safe_serialization=safe_serialization)
        state = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(state, str(Path(directory) / "value_head.safetensors"))


def hidden_size_of(model: torch.nn.Module) -> int:
    """The width of the model's last hidden state."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        size = model.get_input_embeddings().embedding_dim
    return int(size)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2))``."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)``: 1 for a perfect critic, 0 for one that predicts the mean."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
