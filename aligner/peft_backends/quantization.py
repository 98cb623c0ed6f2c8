"""4-bit quantisation for QLoRA, and the guard against bitsandbytes' one-way CPU repacking.

The trap (bitsandbytes 0.50 on a CPU with AVX512-BF16): ``Linear4bit.forward`` treats any call
made in eval mode with an input that does not require grad as *inference for good* and converts
its weight, in place, to a CPU-only packed layout (``quant_state.packing_format_for_cpu = True``).
Nothing converts it back before training resumes. From then on ``matmul_4bit`` dispatches to
``gemv_4bit``, an op with no autograd kernel: the backward pass through every frozen 4-bit layer is
silently dropped, so LoRA gradients are wrong (and ``None`` for adapters whose only path to the
loss runs through a base layer), with nothing but a PyTorch deprecation warning. The repacking is
also lossy (absmax goes to bfloat16 and double quantisation is undone), so base weights change.
The reference pass (``no_grad``) and held-out evaluation (``model.eval()`` + ``no_grad``) are
exactly that call pattern.

The fix sits at the layer that makes the decision: every ``Linear4bit`` of a model we train gets
``support_avx512bf16_for_cpu = False``, the instance flag ``forward`` consults before repacking,
so no forward in any mode ever repacks it (eval-mode forwards take the ordinary dequantising path,
a little slower). A forward pre-hook then checks the invariant on every call and raises if a layer
is packed anyway (e.g. by code that re-enabled the flag), instead of training on dropped gradients.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _linear4bit_class() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def is_packed_for_cpu(module: torch.nn.Module) -> bool:
    """Whether a ``Linear4bit`` weight is in bitsandbytes' inference-only CPU layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _check_not_packed(module: torch.nn.Module, args: Any) -> None:
    if is_packed_for_cpu(module):
        raise RuntimeError(
            "a 4-bit layer was repacked into bitsandbytes' CPU inference layout; gradients through it "
            "would be silently dropped. Something re-enabled 'support_avx512bf16_for_cpu' on a model in training.")


def guard_4bit_training(model: torch.nn.Module) -> int:
    """Stop every ``Linear4bit`` of ``model`` from repacking its weights; return how many were guarded.

    A layer that is already packed is converted back first (its weights already lost precision
    in the packing, which is why the guard must be installed before any eval-mode forward).
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    guarded = 0
    for module in model.modules():
        if not isinstance(module, linear4bit):
            continue
        if is_packed_for_cpu(module):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state)
        module.support_avx512bf16_for_cpu = False
        if not getattr(module, "_aligner_pack_guard", False):
            module.register_forward_pre_hook(_check_not_packed)
            module._aligner_pack_guard = True
        guarded += 1
    return guarded


def quantize_4bit(model: torch.nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.float32, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip``) by a bitsandbytes 4-bit layer, in place.

    The model is already loaded in full precision (stages can follow one another in one process),
    so the layers are quantised where they are rather than reloaded from disk with
    ``BitsAndBytesConfig``. Returns the number of layers replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not torch.nn.Linear or child_name in skip or full in skip:
                continue
            device = child.weight.device
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=quant_type, device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype).cpu(), requires_grad=False,
                                             compress_statistics=double_quant, quant_type=quant_type, module=layer)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            layer = layer.to(device if device.type != "meta" else "cpu")
            setattr(parent, child_name, layer)
            replaced += 1
    # Flags transformers and peft read to treat the model as k-bit quantised.
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    return replaced
