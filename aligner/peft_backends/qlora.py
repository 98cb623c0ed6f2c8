"""``qlora``: LoRA over a base model quantised to 4 bits (NF4, double quantisation; Dettmers et al., 2023)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.peft_backends.lora import LoRABackend
from aligner.peft_backends.quantization import DTYPES, guard_4bit_training, quantize_4bit


class QLoRABackend(LoRABackend):
    """Quantises every linear layer but the output head with bitsandbytes, then adds LoRA adapters.

    Base weights take about a quarter of their bf16 memory (a little more with the quantisation
    constants); adapters and their optimizer state stay in full precision. Needs ``bitsandbytes``
    (``pip install 'aligner-trainer[qlora]'``).
    """

    name = "qlora"

    class Options(LoRABackend.Options):
        """LoRA options plus the quantisation settings."""

        quant_type: Literal["nf4", "fp4"] = "nf4"
        double_quant: bool = Field(True, description="quantise the quantisation constants too (~0.4 bit/weight saved)")
        compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Quantise the base model in place, add adapters, and guard the 4-bit layers for training."""
        from peft import get_peft_model

        o = self.options
        try:
            quantize_4bit(model, o.quant_type, o.double_quant, DTYPES[o.compute_dtype])
        except ImportError as exc:
            raise RuntimeError("peft backend 'qlora' needs bitsandbytes: pip install bitsandbytes") from exc
        wrapped = get_peft_model(model, self.lora_config(model))
        guard_4bit_training(wrapped)
        return wrapped


@hookimpl
def register_peft_backends(register):
    """Register QLoRA."""
    register(QLoRABackend)
