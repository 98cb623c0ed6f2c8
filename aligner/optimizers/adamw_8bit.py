"""``adamw_8bit``: bitsandbytes' 8-bit AdamW (Dettmers et al., 2022): the moment estimates stored in
8 bits (block-wise quantised), a quarter of AdamW's optimizer memory for large weights."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

import torch
from packaging.version import Version
from pydantic import Field

from aligner.errors import ConfigError
from aligner.hookspecs import Register, hookimpl
from aligner.optimizers import OptimizerContext
from aligner.protocols import Options

# bitsandbytes runs its 8-bit optimizers on CPU from 0.50 on; older releases need CUDA.
CPU_MINIMUM = Version("0.50")


def _bitsandbytes_problem() -> str | None:
    """Why bitsandbytes' 8-bit AdamW cannot run here, or ``None`` when it can."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes, which is not installed (pip install 'bitsandbytes>=0.50')"
    version = Version(importlib.metadata.version("bitsandbytes"))
    if version < CPU_MINIMUM and not torch.cuda.is_available():
        return f"needs bitsandbytes >= {CPU_MINIMUM} to run without CUDA (installed: {version})"
    return None


class AdamW8bit:
    """``bitsandbytes.optim.AdamW8bit`` over the trainable weights, one parameter group."""

    name = "adamw_8bit"

    class Options(Options):
        """Adam's coefficients, and which weights keep 32-bit state."""

        betas: tuple[float, float] = Field((0.9, 0.999), description="coefficients of the moment averages")
        eps: float = Field(1e-8, gt=0, description="added to the denominator for stability")
        min_8bit_size: int = Field(4096, gt=0, description=(
            "weights with fewer elements keep 32-bit state (bitsandbytes' default: small tensors gain little)"))

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def check_stage(self, stage: Any) -> None:
        """Refuse before any model loads when bitsandbytes is missing or too old for this machine."""
        problem = _bitsandbytes_problem()
        if problem:
            raise ConfigError(f"stage '{stage.name}': optimizer 'adamw_8bit' "
                              f"('stages[{stage.index}].optimizer.name') {problem}")

    def build(self, context: OptimizerContext) -> torch.optim.Optimizer:
        """The 8-bit AdamW with the stage's learning rate and weight decay (bitsandbytes' own default
        decay, 0.01, is not used: the stage's ``train.weight_decay`` is, as for ``adamw``)."""
        import bitsandbytes

        o = self.options
        return bitsandbytes.optim.AdamW8bit(context.parameters, lr=context.learning_rate, betas=o.betas, eps=o.eps,
                                            weight_decay=context.weight_decay, min_8bit_size=o.min_8bit_size)


@hookimpl
def register_optimizers(register: Register) -> None:
    """Register 8-bit AdamW."""
    register(AdamW8bit)
