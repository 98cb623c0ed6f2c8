"""``peft``: any peft method by name, with its own options, straight from a config.

```yaml
peft: {name: peft, method: ia3, target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}
peft: {name: peft, method: prefix_tuning, num_virtual_tokens: 8}
peft: {name: peft, method: lora, r: 8, init_lora_weights: loftq, loftq_config: {loftq_bits: 4}}
```

Every key beside ``name`` and ``method`` is a field of that method's peft config class
(``IA3Config``, ``PrefixTuningConfig``, ``AdaLoraConfig``, ``OFTConfig``, ...); an unknown key is a
config error naming it, raised before the model is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from pydantic import ConfigDict, model_validator

from aligner.errors import suggest
from aligner.hookspecs import hookimpl
from aligner.peft_backends.quantization import guard_4bit_training
from aligner.protocols import Options

log = logging.getLogger("aligner")


def _normalise(method: str) -> str:
    return method.strip().upper().replace("-", "_")


def peft_config_class(method: str) -> type:
    """The peft config class of ``method`` (case-insensitive, ``-`` or ``_``), or ``ValueError``."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    by_name = {str(k.value): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    key = _normalise(method)
    if key not in by_name:
        known = sorted(n.lower() for n in by_name)
        raise ValueError(f"unknown peft method '{method}'{suggest(method.lower(), known)} (known: {', '.join(known)})")
    return by_name[key]


def _check_loftq_can_run() -> None:
    """peft computes LoftQ's initialisation on a CUDA device and with scipy: say so at config time."""
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError("init_lora_weights 'loftq' needs a CUDA GPU (peft computes the LoftQ initialisation on "
                         "CUDA); without one use the default LoRA initialisation or the 'qlora' backend")
    if importlib.util.find_spec("scipy") is None:
        raise ValueError("init_lora_weights 'loftq' needs scipy, which peft uses for it: pip install scipy")


def build_peft_config(method: str, options: dict[str, Any]) -> Any:
    """A peft config object for ``method`` with ``options`` (nested ``loftq_config`` dicts converted)."""
    cls = peft_config_class(method)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in options:
        if key not in fields:
            raise ValueError(f"unknown option '{key}' for peft method '{method}'{suggest(key, sorted(fields))}")
    options = dict(options)
    if options.get("init_lora_weights") == "loftq":
        _check_loftq_can_run()
    if isinstance(options.get("loftq_config"), dict):
        from peft import LoftQConfig

        options["loftq_config"] = LoftQConfig(**options["loftq_config"])
    options.setdefault("task_type", "CAUSAL_LM")
    return cls(**options)


class PeftMethodBackend:
    """Wraps the model with the named peft method; only the method's trainable weights train."""

    name = "peft"
    adds_adapters = True  # every peft method wraps the model in a PeftModel, whose disable_adapter() works

    class Options(Options):
        """``method`` plus the options of that method's peft config class."""

        model_config = ConfigDict(extra="allow")
        method: str

        @model_validator(mode="after")
        def _check_method_options(self):
            # Build the config once now so that mistakes surface at config time, not after loading.
            build_peft_config(self.method, dict(self.model_extra or {}))
            return self

    def __init__(self, options: Options):
        self.options = options

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Add the method's adapters/virtual tokens; peft freezes the base model."""
        from peft import get_peft_model

        config = build_peft_config(self.options.method, dict(self.options.model_extra or {}))
        wrapped = get_peft_model(model, config)
        guard_4bit_training(wrapped)
        return wrapped

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """AdaLoRA re-allocates ranks from the current gradients: after each step, before they are cleared."""
        update = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
        if update is not None:
            update(step)

    def release(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the stage: merge mergeable adapters into the model for the next stage.

        Prompt-learning methods (prefix/prompt/P-tuning) add virtual tokens, and the adaption prompt
        (LLaMA-Adapter) adds gated attention prompts: neither has a weight delta to merge, so the
        wrapped model is returned as it is (fine for the last stage of a run).
        """
        prompt_learning = getattr(model.peft_config[model.active_adapter], "is_prompt_learning", False)
        # Asked of the tuner, not the PeftModel: PeftModel forwards unknown attributes to it, and the
        # adaption prompt's tuner has no merge_and_unload (calling it was an AttributeError at stage end).
        if prompt_learning or not callable(getattr(model.base_model, "merge_and_unload", None)):
            log.warning("peft method '%s' cannot be merged; a following stage trains on top of it",
                        self.options.method)
            return model
        return model.merge_and_unload()


@hookimpl
def register_peft_backends(register):
    """Register the generic peft backend."""
    register(PeftMethodBackend)
