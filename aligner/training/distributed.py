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
from pathlib import Path
from typing import Any, TypeVar

from aligner.errors import AlignerError, ConfigError

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


def deepspeed_requested() -> bool:
    """Whether the launch asks for DeepSpeed (accelerate's config with ``distributed_type: DEEPSPEED``)."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def deepspeed_available() -> bool:
    """Whether the ``deepspeed`` package can be imported (``pip install 'aligner-trainer[deepspeed]'``)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _launch_config_file() -> str | None:
    """The ``--config_file`` of the ``accelerate launch`` that started this process, where it can be read.

    accelerate passes a config's settings to its processes as environment variables, not its path; the
    launcher is this process's parent (torchrun's agent runs inside ``accelerate launch``), so its
    command line names the file. Best effort: ``None`` where that cannot be read (not Linux, another launcher).
    """
    import contextlib

    with contextlib.suppress(OSError):
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
        for i, arg in enumerate(args):
            if arg in ("--config_file", "--config-file") and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(("--config_file=", "--config-file=")):
                return arg.split("=", 1)[1]
    return None


def check_deepspeed_installed() -> None:
    """A ``ConfigError`` (before anything is loaded or written) when the launch asks for DeepSpeed but
    the ``deepspeed`` package is missing: accelerate would otherwise fail with an ``ImportError`` on GPUs,
    and on CPUs silently train data parallel."""
    if not deepspeed_requested() or deepspeed_available():
        return
    config = _launch_config_file()
    where = f"the accelerate config {config}" if config else "the accelerate config of this launch"
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    raise ConfigError(
        f"{where}: 'distributed_type: DEEPSPEED'{f' (zero_stage {stage})' if stage else ''} needs the deepspeed "
        "package, which is not installed: `pip install 'aligner-trainer[deepspeed]'`, or launch with another config "
        "(configs/accelerate/fsdp.yaml shards parameters, gradients and optimizer state without it)")


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage a DeepSpeed launch asks for (its accelerate config's ``zero_stage``, or the
    ``zero_optimization.stage`` of its ``deepspeed_config_file``); ``None`` when not said or not DeepSpeed."""
    import json

    if not deepspeed_requested():
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    if stage.isdigit():
        return int(stage)
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file:
        try:
            stage = json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError):
            return None
        return stage if isinstance(stage, int) else None
    return None


def check_stages_supported(stage_names: list[str]) -> None:
    """A ``ConfigError`` (before anything is trained) for a run of several stages whose weights are
    sharded over the processes: FSDP, or DeepSpeed ZeRO-3.

    After such a stage the model's parameters are shards (FSDP's ``DTensor``s, DeepSpeed's partitions
    held by its hooks): the next stage's reference (a copy, a weights digest, or log-probs computed on
    the main process alone) cannot run on them. Each stage trains in its own run instead, from the
    previous run's gathered final model.
    """
    if len(stage_names) <= 1:
        return
    if deepspeed_zero_stage() == 3:
        what, alternative = "DeepSpeed ZeRO-3", ", or use ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)"
    elif sharded_launch() == "FSDP":
        what, alternative = "FSDP", ", or use DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) or DDP"
    else:
        return
    config = _launch_config_file()
    where = f"the accelerate config {config}" if config else "the accelerate config of this launch"
    raise ConfigError(
        f"{where}: {what} trains one stage per run, and this run has {len(stage_names)} "
        f"('stages': {', '.join(stage_names)}): train each stage in its own run, with model.path set to "
        f"the previous run's STAGE/final{alternative}")


def multi_process_cpu() -> bool:
    """Several processes and no GPU: accelerate needs ``cpu=True`` to join them with gloo.

    FSDP before FSDP2 needs accelerators; launched on CPUs with its accelerate config, the processes run
    as plain data parallel (every process holds the whole model), which is said. FSDP2 and DeepSpeed
    (ZeRO-2/3, with its CPU accelerator) run sharded on CPUs (``build_accelerator``).
    """
    import torch

    multi_cpu = not torch.cuda.is_available() and launch_world_size() > 1
    sharded = sharded_launch()
    if multi_cpu and sharded == "FSDP" and not fsdp2_requested() and launch_is_main_process():
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
    """The run's ``Accelerator``; FSDP2 and DeepSpeed are switched on for processes on CPUs too.

    accelerate turns FSDP and DeepSpeed on for accelerator (GPU) processes only; without ``cpu=True``
    on a machine without GPUs its processes do not even join one group. But torch's FSDP2
    (``fully_shard``) runs on gloo, and so does DeepSpeed's ZeRO with its CPU accelerator: with several
    CPU processes and such a config, the processes are joined with gloo (``cpu=True``) and accelerate's
    state is then switched to FSDP or DeepSpeed with the plugin the config's environment describes, so
    the model and optimizer are sharded as on GPUs (tests/test_fsdp.py and tests/test_deepspeed.py
    train, kill, resume and compare such runs). A DeepSpeed config without deepspeed installed is a
    ``ConfigError``.
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    check_deepspeed_installed()
    multi_cpu = multi_process_cpu()
    accelerator = Accelerator(mixed_precision=mixed_precision(precision), cpu=multi_cpu)
    if multi_cpu and fsdp2_requested():
        # Both shared states: AcceleratorState copies PartialState's fields whenever it is built again.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    elif multi_cpu and deepspeed_requested():
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # from the config's environment (zero_stage, offload, ...)
        # As accelerate does for DeepSpeed: the precision goes into DeepSpeed's config, autocast is off.
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        PartialState().distributed_type = DistributedType.DEEPSPEED
        accelerator.state.distributed_type = DistributedType.DEEPSPEED
        accelerator.state.deepspeed_plugins = plugin
        accelerator.state._mixed_precision = "no"
    return accelerator


def is_deepspeed(accelerator: Any) -> bool:
    """Whether the run's processes train under DeepSpeed (its engine owns the step and the checkpoints)."""
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed_stage(accelerator: Any, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Fit DeepSpeed's config to a stage before ``accelerator.prepare`` builds its engine.

    aligner accumulates micro-batches itself and says where an update ends (``StepServices``), so
    DeepSpeed's ``gradient_accumulation_steps`` is 1 (its own count would divide every loss again);
    DeepSpeed clips inside its step, to the stage's ``train.max_grad_norm`` (0: no clipping); the
    micro-batch size is DeepSpeed's bookkeeping only (aligner hands it no data loader); ZeRO-3 gathers
    the weights for the final model whatever ``zero3_save_16bit_model`` says.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clip = float(max_grad_norm or 0.0)
    given = config.get("gradient_clipping")
    if given not in (None, "auto") and float(given) != clip and accelerator.is_main_process:
        log.info("DeepSpeed clips gradients to the stage's train.max_grad_norm (%s), not to the accelerate "
                 "config's gradient_clipping (%s)", clip, given)
    given = config.get("gradient_accumulation_steps")
    if given not in (None, "auto", 1) and accelerator.is_main_process:
        log.info("DeepSpeed's gradient_accumulation_steps (%s) is set to 1: aligner accumulates micro-batches "
                 "itself (train.gradient_accumulation_steps)", given)
    zero = config.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("stage") == 3:
        # The final model is always gathered into one directory (DeepSpeed's "16-bit" gather keeps
        # the parameters' own dtype); without this, accelerate refuses to gather after the training.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config["gradient_clipping"] = clip
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = max(1, int(micro_batch_size))
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * accelerator.num_processes
    accelerator.gradient_accumulation_steps = 1


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
