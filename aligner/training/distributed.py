"""Several processes: what a launch asked for, the run's ``Accelerator``, and work done once for all.

Before an ``Accelerator`` exists (config checks, the run directory, log lines said once per run), the
launcher's environment is all there is: ``RANK``/``WORLD_SIZE`` from torchrun or ``accelerate launch``,
``ACCELERATE_USE_FSDP``/``ACCELERATE_USE_DEEPSPEED``/``FSDP_VERSION`` from an accelerate config. These
helpers read them in one place, so every module agrees on what "the main process" and "sharded" mean.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from aligner.errors import AlignerError

log = logging.getLogger("aligner")

T = TypeVar("T")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launch_is_main_process() -> bool:
    """Whether this is the launch's first process (``RANK`` 0, or no launcher): the one that writes
    files and says things once per run. Usable before any ``Accelerator`` exists."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_world_size() -> int:
    """How many processes the launch started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharded_launch() -> str | None:
    """``"FSDP"`` or ``"DeepSpeed"`` when the accelerate config shards weights over processes, else ``None``."""
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if _flag(variable):
            return name
    return None


def fsdp2_requested() -> bool:
    """Whether the launch asks for FSDP2 (accelerate's FSDP config with ``fsdp_version: 2``)."""
    return _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION") == "2"


def multi_process_cpu() -> bool:
    """Several processes and no GPU: accelerate needs ``cpu=True`` to join them with gloo.

    FSDP (before FSDP2) and DeepSpeed need accelerators; launched on CPUs with their accelerate config,
    the processes run as plain data parallel (every process holds the whole model), which is said.
    """
    import torch

    multi_cpu = not torch.cuda.is_available() and launch_world_size() > 1
    sharded = sharded_launch()
    if multi_cpu and sharded and not fsdp2_requested() and launch_is_main_process():
        log.warning("%s needs GPUs: on CPUs the %d processes run as data parallel over gloo, each holding the "
                    "whole model (FSDP2, fsdp_version: 2, does run on CPUs)", sharded, launch_world_size())
    return multi_cpu


def mixed_precision(requested: str) -> str:
    """The run's ``precision`` setting as accelerate's ``mixed_precision``: ``auto`` is bf16 on a GPU
    that has it, else none."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def build_accelerator(precision: str) -> Any:
    """The run's ``Accelerator``; FSDP2 is switched on for processes on CPUs too.

    accelerate turns FSDP on for GPU processes only, but torch's FSDP2 (``fully_shard``) runs on gloo:
    with several CPU processes and an FSDP2 config, the model and optimizer are sharded as on GPUs
    (tests/test_fsdp.py trains, kills, resumes and compares such a run).
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    multi_cpu = multi_process_cpu()
    accelerator = Accelerator(mixed_precision=mixed_precision(precision), cpu=multi_cpu)
    if multi_cpu and fsdp2_requested():
        # Both shared states: AcceleratorState copies PartialState's fields whenever it is built again.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator


def on_main_then_shared(accelerator: Any, compute: Callable[[], T]) -> T:
    """Run ``compute`` on the main process only and hand its result, or its error, to every process.

    An error raised on one process while the others wait at a collective would hang the run under
    launchers that do not tear the group down: here every process raises it together.
    """
    outcome: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [compute(), None]
        except Exception as exc:  # handed on below, then raised on every process
            outcome = [None, exc]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        error = outcome[1]
        if accelerator.is_main_process or isinstance(error, AlignerError):
            raise error
        raise AlignerError(f"stopped: the main process failed: {error}")
    return outcome[0]
