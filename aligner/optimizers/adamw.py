"""``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, 2019), the default optimizer of every stage."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from aligner.hookspecs import Register, hookimpl
from aligner.optimizers import OptimizerContext
from aligner.protocols import Options


def fused_kernel_applies(parameters: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update every one of ``parameters``: plain (not sharded
    ``DTensor``) floating-point tensors on devices torch has the kernel for (CPU and CUDA among them)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return bool(parameters) and all(
        type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point() and p.device.type in devices
        for p in parameters)


class AdamW:
    """``torch.optim.AdamW`` over the trainable weights, one parameter group, with the stage's
    ``train.learning_rate`` and ``train.weight_decay``."""

    name = "adamw"

    class Options(Options):
        """Adam's moment coefficients and epsilon (torch's defaults), and which kernel updates."""

        betas: tuple[float, float] = Field((0.9, 0.999), description="coefficients of the moment averages")
        eps: float = Field(1e-8, gt=0, description="added to the denominator for stability")
        fused: bool | Literal["auto"] = Field("auto", description=(
            "torch's fused kernel (one pass over each weight instead of about ten elementwise ops): auto uses "
            "it wherever it applies (plain floating-point weights on CPU or CUDA, as built before any sharding); "
            "false: torch's default per-weight loop"))

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def build(self, context: OptimizerContext) -> torch.optim.Optimizer:
        """One group of plain parameters, the checkpoint layout of the runs before optimizers were
        plugins (their checkpoints still resume, with the kernel this config asks for)."""
        # Plain parameters, not (name, parameter) pairs: torch would add 'param_names' to the
        # checkpointed state, and checkpoints written before would no longer load.
        parameters = list(context.parameters)
        fused = self.options.fused
        if fused == "auto":
            fused = fused_kernel_applies(parameters)
        # fused=None, not False, when off: exactly torch's default, as in checkpoints written before.
        return torch.optim.AdamW(parameters, lr=context.learning_rate, weight_decay=context.weight_decay,
                                 betas=self.options.betas, eps=self.options.eps, fused=fused or None)


@hookimpl
def register_optimizers(register: Register) -> None:
    """Register AdamW."""
    register(AdamW)
