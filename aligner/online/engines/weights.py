"""A policy's weights in the forms an inference engine loads: its LoRA adapter, or its full weights in
Hugging Face naming (a PEFT policy's adapters merged in), shared by the ``openai_server`` and ``vllm``
engines.

Merging never disturbs training: the adapters are merged into the base weights in place (no second
copy of the model on the device), the merged tensors are handed out, and the original base weights
are then restored bit for bit from a copy kept on the CPU (``unmerge`` alone would leave rounding
error in them, and the run would no longer be reproducible).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def is_peft(policy: torch.nn.Module) -> bool:
    """Whether ``policy`` is a peft-wrapped model."""
    return hasattr(policy, "peft_config") and hasattr(policy, "get_base_model")


def lora_problem(policy: torch.nn.Module) -> str | None:
    """Why ``policy``'s adapter cannot be served as a LoRA adapter (vLLM's runtime LoRA), or None."""
    if not is_peft(policy):
        return "the policy is not a PEFT model (the stage trains every weight)"
    adapter = _active_adapter(policy)
    config = policy.peft_config[adapter]
    kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))
    if kind != "LORA":
        return f"its adapter is a {kind} adapter, not LoRA"
    if getattr(config, "use_dora", False):
        return "its adapter is DoRA, which LoRA serving does not apply"
    if getattr(config, "modules_to_save", None):
        return f"its adapter also trains whole modules ({', '.join(config.modules_to_save)}), which LoRA serving ignores"
    return None


def is_quantized(policy: torch.nn.Module) -> bool:
    """Whether the policy's base weights are quantized (QLoRA): they cannot be saved as plain weights."""
    base = policy.get_base_model() if is_peft(policy) else policy
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def save_adapter(policy: torch.nn.Module, directory: Path) -> None:
    """Write the policy's active adapter (``adapter_config.json`` and safetensors weights) to ``directory``."""
    adapter = _active_adapter(policy)
    policy.save_pretrained(str(directory), safe_serialization=True, selected_adapters=[adapter])
    if adapter != "default":  # peft writes a non-default adapter one folder down
        nested = directory / adapter
        for path in nested.iterdir():
            path.replace(directory / path.name)
        nested.rmdir()


@contextlib.contextmanager
def full_weights(policy: torch.nn.Module, merge: bool = True) -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """``(model, state_dict)``: the plain model whose ``save_pretrained``/config describe the weights, and
    the full weights under Hugging Face names, valid inside the block: a PEFT policy's adapters merged in,
    or (``merge=False``) its base weights alone.

    For a PEFT policy the tensors are the live base weights with the adapters merged in; they are restored
    when the block exits, so copy what must outlive it.
    """
    if not is_peft(policy):
        yield policy, policy.state_dict()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base, adapter = policy.get_base_model(), _active_adapter(policy)
    wrapped = {name: module for name, module in base.named_modules()
               if isinstance(module, BaseTunerLayer | ModulesToSaveWrapper)}
    layers = {name: module for name, module in wrapped.items() if isinstance(module, BaseTunerLayer)}
    if not merge:
        layers = {}
    kept = {name: [(p, p.detach().to("cpu", copy=True)) for p in module.get_base_layer().parameters(recurse=False)]
            for name, module in layers.items()}
    try:
        with torch.no_grad():
            for module in layers.values():
                module.merge(adapter_names=[adapter])
        yield base, _plain_names(base.state_dict(), wrapped, adapter)
    finally:
        with torch.no_grad():
            for name, module in layers.items():
                if module.merged:
                    module.unmerge()
                for parameter, original in kept[name]:
                    parameter.copy_(original)


def save_full(policy: torch.nn.Module, directory: Path, merge: bool = True) -> None:
    """Write the policy's full weights (adapters merged, or left out with ``merge=False``) and config in
    Hugging Face format to ``directory``."""
    with full_weights(policy, merge) as (model, state):
        model.save_pretrained(str(directory), safe_serialization=True, state_dict=state)


def _plain_names(state: dict[str, torch.Tensor], tuned: dict[str, Any], adapter: str) -> dict[str, torch.Tensor]:
    """A tuned model's state dict under the base model's own names: each tuned layer's ``base_layer``
    weights become the layer's, a fully trained module's trained copy replaces the original, and the
    adapters' own tensors are left out."""
    from peft.utils.other import ModulesToSaveWrapper

    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((n for n in tuned if key.startswith(n + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if isinstance(tuned[owner], ModulesToSaveWrapper):
                prefix = f"modules_to_save.{adapter}."
                if rest.startswith(prefix):
                    plain[f"{owner}.{rest[len(prefix):]}"] = value
                continue
            if not rest.startswith("base_layer."):
                continue  # lora_A, lora_B, ...: merged into the base weight already
            key = f"{owner}.{rest[len('base_layer.'):]}"
        plain.setdefault(key, value)
    return plain


def _active_adapter(policy: torch.nn.Module) -> str:
    active = getattr(policy, "active_adapter", "default")
    return active[0] if isinstance(active, list | tuple) else active
