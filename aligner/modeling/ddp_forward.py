"""A custom computation run as a DDP-wrapped model's forward, so DDP's bookkeeping still happens.

DistributedDataParallel syncs gradients only for a forward that went through the wrapper (its
forward prepares the reducer for the backward pass). The chunked and shared-prompt log-prob paths
call the decoder and head themselves, so under DDP they run *as* the wrapped module's forward: the
module's ``forward`` is swapped for the computation for one call of the wrapper, then restored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
_MISSING = object()


def ddp_inner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module inside a DDP wrapper, or ``None`` if ``model`` is not one."""
    return model.module if isinstance(model, DistributedDataParallel) else None


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its DDP wrapper (itself if it has none)."""
    return ddp_inner(model) or model


def run_as_forward(wrapper: torch.nn.Module, compute: Callable[[], T]) -> T:
    """``compute()`` executed inside ``wrapper``'s forward, in place of the wrapped module's."""
    inner = wrapper.module
    # accelerate may have set an instance-level forward (mixed-precision wrappers): put it back after.
    previous = inner.__dict__.get("forward", _MISSING)
    inner.forward = lambda *args, **kwargs: compute()
    try:
        return wrapper()
    finally:
        if previous is _MISSING:
            del inner.forward
        else:
            inner.forward = previous
