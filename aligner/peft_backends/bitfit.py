"""``bitfit``: train only the bias terms of the model (Ben Zaken et al., 2022).

peft has no BitFit, and it needs none of peft's machinery: the biases that already exist are made
trainable and every other weight is frozen. Nothing is added, so there is no adapter to switch off
(``disabled_adapter`` is refused) and the starting policy is the model itself (use ``cached`` or
``frozen_copy`` as the reference).

```yaml
peft: {name: bitfit}                                    # every bias of the model
peft: {name: bitfit, target_modules: [q_proj, v_proj]}  # only the biases of these modules
```

Many decoder-only models have no biases at all (Llama, Mistral by default); for them BitFit would
train nothing, so it is refused with a message saying why instead of silently training no weights.
"""

from __future__ import annotations

import torch
from pydantic import Field

from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.peft_backends.quantization import guard_4bit_training
from aligner.protocols import Options


def bias_parameters(model: torch.nn.Module, target_modules: list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """The model's bias parameters by name; with ``target_modules``, only those of modules whose last
    name component is one of them (``q_proj`` matches ``model.layers.0.self_attn.q_proj.bias``)."""
    found = {}
    for module_name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.nn.Parameter):
            continue
        if target_modules is not None and module_name.rsplit(".", 1)[-1] not in target_modules:
            continue
        found[f"{module_name}.bias" if module_name else "bias"] = bias
    return found


class BitFitBackend:
    """Freezes every weight except the biases (all of them, or those of ``target_modules``) and, for a
    reward model, its score head."""

    name = "bitfit"
    adds_adapters = False  # the model's own biases train: nothing can be switched off for a reference

    class Options(Options):
        """Which biases train."""

        target_modules: list[str] | None = Field(
            None, description="module names (last component, e.g. q_proj) whose bias trains; default: every bias")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make exactly the selected biases trainable; refuse a model that has none."""
        biases = bias_parameters(model, self.options.target_modules)
        if not biases:
            where = (f" in the modules {', '.join(self.options.target_modules)} (peft.target_modules)"
                     if self.options.target_modules else "")
            # The model is only known here, after loading: name the key by its value, which is all we have.
            raise ConfigError(
                f"peft: {{name: bitfit}} trains bias terms, but the model ({type(model).__name__}) has none{where}; use a "
                "model with biases (e.g. Qwen2, or a Llama config with attention_bias/mlp_bias) or another backend")
        model.requires_grad_(False)
        for parameter in biases.values():
            parameter.requires_grad_(True)
        # A reward model's score head is freshly initialised: frozen, it would stay random (peft's
        # SEQ_CLS task keeps it trainable for LoRA for the same reason).
        if type(model).__name__.endswith("ForSequenceClassification"):
            for name in ("score", "classifier"):
                head = getattr(model, name, None)
                if isinstance(head, torch.nn.Module):
                    head.requires_grad_(True)
        guard_4bit_training(model)  # a base quantised before this stage must not be repacked either
        return model


@hookimpl
def register_peft_backends(register):
    """Register BitFit."""
    register(BitFitBackend)
