"""Which models may have their decoder and head called separately instead of their own forward.

Both the chunked log-prob forward (``aligner.modeling.logprobs``) and the reward forward
(``aligner.modeling.reward_scores``) call a plain decoder and its head themselves; this module says
when that computes exactly what the model's own forward would.
"""

from __future__ import annotations

import torch

# Model types whose causal-LM forward is exactly ``lm_head(decoder(...).last_hidden_state)``:
# nothing (soft-capping, scaling, router losses) happens to the logits after the projection.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"})


def _peft_allows_direct_call(model: torch.nn.Module) -> bool:
    """Whether calling the PEFT model's base directly computes what its own forward would.

    True for weight-injecting methods (LoRA and relatives change layers in place); false for prompt
    learning (virtual tokens are added by the wrapper's forward) and methods that need forward hooks.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return False
    if getattr(config, "is_prompt_learning", False) or getattr(config, "alora_invocation_tokens", None):
        return False
    return str(getattr(config, "peft_type", "")).split(".")[-1] not in ("POLY",)


def plain_head_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model under ``model`` whose decoder and head may be called separately.

    ``None`` for wrappers whose own forward must run (DDP/FSDP/DeepSpeed sync gradients in it),
    PEFT methods that work inside the wrapper's forward, and model types not on the list.
    """
    if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        return None
    if hasattr(model, "get_base_model"):
        if not _peft_allows_direct_call(model):
            return None
        model = model.get_base_model()
    config = getattr(model, "config", None)
    return model if getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES else None
