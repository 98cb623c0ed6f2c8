"""Exact resume: what a checkpoint holds beyond the weights, and how a run continues from it.

A checkpoint (``STAGE/checkpoints/step-N``, written atomically by ``aligner.training.checkpoint_writing``) holds the
model or adapter (safetensors), ``optimizer.pt`` (optimizer and scheduler state, loaded with
``weights_only=True``), ``rng.pt`` (torch, and CUDA where present) plus the Python and NumPy RNG
states in ``trainer_state.json``, and the data position: how many micro-batches of which epoch
were consumed. Restoring all of it makes an interrupted-and-resumed run equal, bit for bit on CPU,
to one that never stopped. Under FSDP the weights and optimizer state are instead every process's
shards (``sharded/``, torch.distributed.checkpoint), under DeepSpeed its engine's checkpoint of every
process's ZeRO partitions (``deepspeed/``), with each process's RNG state beside them (see "sharded
training state" below).

Resume takes the newest checkpoint that verifies against its manifest (``verify_checkpoint``): a
damaged one is skipped with a warning naming its damaged files and renamed to ``damaged-<name>``,
never deleted, and the run continues from the previous intact one. Reading a file that fails
anyway (a checkpoint from before manifests) is a ``CheckpointError`` naming the file, not a
loader's traceback.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligner.training.checkpoint_manifest import (
    MARKER,
    CheckpointError,
    Verification,
    read_checkpoint_tensors,
    set_aside,
    verify_checkpoint,
)
from aligner.training.checkpoint_writing import complete_checkpoints
from aligner.training.distributed import launch_is_main_process

log = logging.getLogger("aligner")


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the data position."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # sampler batches of ``epoch`` already consumed (all processes together)


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy RNG states, tensor RNG states)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def restore_rng(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back the RNG states captured by ``capture_rng``."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_training_state(directory: Path, optimizer: Any, scheduler: Any, position: Position) -> dict[str, Any]:
    """Write optimizer/scheduler/RNG tensors into ``directory``; return the JSON part of the state."""
    plain, tensors = capture_rng()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / "optimizer.pt")
    torch.save(tensors, directory / "rng.pt")
    return {"position": position.__dict__, "rng": plain}


def _main_process() -> bool:
    # Every process of a torchrun launch resumes the same directory: one renames and warns.
    return launch_is_main_process()


def _note_unverified(verdict: Verification, stage: str) -> None:
    if verdict.status == "unverified" and _main_process():
        log.info("stage '%s': %s has %s", stage, verdict.directory, verdict.note)


def _skip(verdict: Verification, stage: str, what: str, then: str) -> None:
    """Warn about a damaged checkpoint resume will not use, and set it aside so the run keeps it."""
    if not _main_process():
        return
    try:
        kept = f"kept as {set_aside(verdict.directory)} (nothing was deleted)"
    except OSError as exc:
        kept = f"could not rename it aside ({exc.strerror or exc}): it is left where it is"
    log.warning("stage '%s': %s %s is damaged and was skipped: %s; %s; %s", stage, what, verdict.directory,
                verdict.describe(), kept, then)


def _newest_intact(stage_dir: Path) -> tuple[Path | None, Verification | None, list[Verification]]:
    """(newest usable checkpoint, its verification, the damaged newer ones); reads only, changes nothing."""
    damaged: list[Verification] = []
    for candidate in reversed(complete_checkpoints(stage_dir / "checkpoints")):
        # thorough=False: once sizes or layout show damage, hashing the rest would not change the verdict.
        verdict = verify_checkpoint(candidate, thorough=False)
        if verdict.usable:
            return candidate, verdict, damaged
        damaged.append(verdict)
    return None, None, damaged


def _none_intact(stage_dir: Path, damaged: list[Verification]) -> CheckpointError:
    stage, run_dir = stage_dir.name, stage_dir.parent
    listed = "; ".join(f"{v.directory.name}: {v.describe()}" for v in damaged)
    return CheckpointError(
        f"--resume: no checkpoint of stage '{stage}' in {run_dir} is intact ({listed}); nothing was changed or "
        f"deleted. Restore the files from a copy, or move {stage_dir / 'checkpoints'} aside to train stage "
        f"'{stage}' from the start (`aligner verify {run_dir}` lists every checkpoint)")


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint of a stage that verifies against its manifest, if any.

    Half-written ones have no marker and are not candidates. A damaged newer one is skipped with a
    warning naming its damaged files, and renamed to ``damaged-step-N`` so that the continuing run
    neither prunes it nor replaces it on reaching step N again. Raises ``CheckpointError`` (naming
    every damaged file) when the stage has complete checkpoints but none is intact; nothing is
    changed then.
    """
    folder = stage_dir / "checkpoints"
    if folder.exists() and not folder.is_dir():
        # Not "no checkpoint": training from step 0 would fail at its first save, after the work.
        raise CheckpointError(f"--resume: {folder} is a file, not a checkpoint directory; move it aside")
    candidate, verdict, damaged = _newest_intact(stage_dir)
    if candidate is None:
        if damaged:
            raise _none_intact(stage_dir, damaged)
        return None
    for skipped in damaged:
        _skip(skipped, stage_dir.name, "checkpoint", f"resuming from {candidate}")
    if verdict is not None:
        _note_unverified(verdict, stage_dir.name)
    return candidate


def stage_finished(stage_dir: Path) -> bool:
    """Whether a stage's final model was completely written and is intact.

    A damaged final model is skipped with a warning and renamed to ``damaged-final``; the stage then
    counts as unfinished, so resume continues it from its last intact checkpoint (or its start)
    and writes the final model again. When the stage has checkpoints but none is intact either,
    this raises ``CheckpointError`` (naming the final model's damage too) and changes nothing.
    """
    final = stage_dir / "final"
    if not (final / MARKER).is_file():
        return False
    verdict = verify_checkpoint(final, thorough=False)
    if verdict.usable:
        _note_unverified(verdict, stage_dir.name)
        return True
    # Decide before renaming anything: if resume is going to stop, it must leave the run as it was.
    # (The rare damaged-final case verifies the newest checkpoint twice; latest_checkpoint repeats it.)
    candidate, _, damaged = _newest_intact(stage_dir)
    if candidate is None and damaged:
        raise _none_intact(stage_dir, [verdict, *damaged])
    then = (f"the stage continues from {candidate}" if candidate is not None
            else "the stage has no checkpoints and is trained again from its start")
    _skip(verdict, stage_dir.name, "final model", then)
    return False


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated zip, a bad CRC, a missing file, a refused type: all name the file
        raise CheckpointError(f"could not load {path}: {exc}; the file is damaged (`aligner verify RUN_DIR` "
                              "checks a run's checkpoints)") from exc


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the checkpoint's weights (full model or peft adapter) into ``model`` in place."""
    adapter = directory / "adapter_model.safetensors"
    # peft's layout: the adapter named "default" at the top, every other named adapter in its own folder.
    named = [sub for sub in sorted(directory.iterdir()) if sub.is_dir() and (sub / "adapter_model.safetensors").is_file()]
    if adapter.is_file() or named:
        from peft import set_peft_model_state_dict

        if adapter.is_file():
            set_peft_model_state_dict(model, read_checkpoint_tensors(adapter))
        for sub in named:
            set_peft_model_state_dict(model, read_checkpoint_tensors(sub / "adapter_model.safetensors"), adapter_name=sub.name)
        return
    state = {}
    for shard in sorted(directory.glob("model*.safetensors")):  # not value_head.safetensors etc.
        state.update(read_checkpoint_tensors(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {unexpected[:5]}")


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``: step, position, RNG and any algorithm state."""
    path = directory / "trainer_state.json"
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"could not read {path}: not a JSON object")
    return state


def _position(state: dict[str, Any], directory: Path) -> Position:
    try:
        return Position(**state["position"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / 'trainer_state.json'} has no valid 'position' ({exc})") from exc


def read_position(directory: Path) -> Position:
    """Where the checkpoint's run stood in its data."""
    return _position(read_trainer_state(directory), directory)


# Which of torch's kernels updates the weights: this run's configuration, not state to restore.
_KERNEL_KEYS = ("fused", "foreach")


def _built_kernels(optimizer: Any) -> list[dict[str, Any]]:
    return [{key: group[key] for key in _KERNEL_KEYS if key in group} for group in optimizer.param_groups]


def _with_built_kernel(optimizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (an optimizer state dict) with each group's kernel setting replaced by the one
    ``optimizer`` was built with, before it is loaded.

    torch's ``load_state_dict`` takes every group setting from the checkpoint, the kernel too: a
    checkpoint written before AdamW's ``fused: auto`` would switch a resumed run back to the
    per-weight loop, which under fp16 refuses the gradient scaler's arguments promised to the fused
    kernel (the first step after the resume failed). Set before loading, not after, because torch
    places each weight's step counter by the loaded group's kernel (the fused one needs it on the
    weight's device, the loop on the CPU)."""
    for group, kernel in zip(saved["param_groups"], _built_kernels(optimizer), strict=False):
        group.update(kernel)
    return saved


def _keeping_kernel(optimizer: Any, load: Any) -> None:
    """Run ``load()`` keeping ``optimizer``'s kernel settings, for loaders that place the state into
    tensors the optimizer already has (torch.distributed.checkpoint), where setting them back after
    the load is enough."""
    built = _built_kernels(optimizer)
    load()
    for group, kernel in zip(optimizer.param_groups, built, strict=False):
        group.update(kernel)


def load_training_state(directory: Path, optimizer: Any, scheduler: Any) -> Position:
    """Restore optimizer, scheduler and RNG from a checkpoint; return its position."""
    state = read_trainer_state(directory)
    saved = _torch_load(directory / "optimizer.pt")
    optimizer.load_state_dict(_with_built_kernel(optimizer, saved["optimizer"]))
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng(state["rng"], _torch_load(directory / "rng.pt"))
    return _position(state, directory)


# --- sharded training state (FSDP) ----------------------------------------------------------------
#
# Under FSDP no process holds the whole model or optimizer state, so a checkpoint cannot be written by
# the main process alone: every process saves its own shards with torch.distributed.checkpoint (DCP)
# into ``sharded/`` (one ``__<rank>_0.distcp`` file each, and a ``.metadata`` index written by the
# main process), and its own RNG state into ``rng-rank<r>.pt``. The main process adds
# ``scheduler.pt`` and ``trainer_state.json``; ``checkpoint.write_sharded_atomically`` makes the whole
# directory appear at once, with every process's files in its manifest.


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate wraps the optimizer; DCP's state-dict helpers need torch's own object.
    return getattr(optimizer, "optimizer", optimizer)


def is_sharded(directory: Path) -> bool:
    """Whether a checkpoint holds FSDP's sharded (per-process) model and optimizer state."""
    from aligner.training.checkpoint_writing import SHARDED_DIR

    return (directory / SHARDED_DIR).is_dir()


def is_deepspeed_checkpoint(directory: Path) -> bool:
    """Whether a checkpoint holds DeepSpeed's per-process (ZeRO) model and optimizer state."""
    from aligner.training.checkpoint_writing import DEEPSPEED_DIR

    return (directory / DEEPSPEED_DIR).is_dir()


def check_sharding_matches(directory: Path, deepspeed: bool) -> None:
    """A ``CheckpointError`` when a checkpoint and the resuming run disagree about DeepSpeed.

    DeepSpeed's partitions load only into a DeepSpeed engine, and a DeepSpeed engine loads only them:
    the run must be resumed with an accelerate config of the same kind as the one that wrote it.
    """
    written = is_deepspeed_checkpoint(directory)
    if written == deepspeed:
        return
    if written:
        raise CheckpointError(f"{directory} was written under DeepSpeed (its weights and optimizer state are "
                              "DeepSpeed's per-process partitions): resume it with the DeepSpeed accelerate config "
                              "that wrote it (`accelerate launch --config_file ...`)")
    raise CheckpointError(f"{directory} was not written under DeepSpeed, and this run uses DeepSpeed: resume it "
                          "with the accelerate config that wrote it, or start the DeepSpeed run from its final model")


def save_sharded_shard(directory: Path, model: torch.nn.Module, optimizer: Any, rank: int) -> None:
    """This process's part of a sharded checkpoint: its model and optimizer shards, its RNG state.

    Every process must call it (DCP's save is a collective). The state dicts are DCP's own
    (parameter names of the unwrapped model, optimizer state keyed by them), so they load back into
    a model sharded over another number of processes too.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from aligner.training.checkpoint_writing import SHARDED_DIR

    plain, tensors = capture_rng()
    # Each process has its own RNG streams: all are kept, so a resumed run draws what the
    # uninterrupted one would have on every process.
    torch.save({"tensors": tensors, "plain": json.dumps(plain)}, directory / f"rng-rank{rank}.pt")
    model_state, optimizer_state = get_state_dict(model, _torch_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDED_DIR))


def save_sharded_main(directory: Path, scheduler: Any, position: Position) -> dict[str, Any]:
    """The main process's part of a sharded checkpoint: the schedule; returns the JSON part of the state."""
    torch.save({"scheduler": scheduler.state_dict()}, directory / "scheduler.pt")
    return {"position": position.__dict__, "sharded": True}


def load_sharded_training_state(directory: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                                rank: int) -> Position:
    """Load a sharded checkpoint into an already sharded model and optimizer; every process calls it.

    Each process reads the shards it now holds (DCP reshards if the process count changed) and its
    own RNG state; with another process count, a process without a saved RNG state takes process
    0's (the run then continues correctly but not bit for bit).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from aligner.training.checkpoint_writing import SHARDED_DIR

    state = read_trainer_state(directory)
    inner = _torch_optimizer(optimizer)
    model_state, optimizer_state = get_state_dict(model, inner)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(loaded, checkpoint_id=str(directory / SHARDED_DIR))
    except Exception as exc:  # DCP reports a missing or damaged shard in its own exception types
        raise CheckpointError(f"could not load the sharded state in {directory / SHARDED_DIR}: {exc}; "
                              "`aligner verify RUN_DIR` checks a run's checkpoints") from exc
    _keeping_kernel(inner, lambda: set_state_dict(model, inner, model_state_dict=loaded["model"],
                                                  optim_state_dict=loaded["optimizer"]))
    return _restore_schedule_and_rng(directory, state, scheduler, rank)


def _restore_schedule_and_rng(directory: Path, state: dict[str, Any], scheduler: Any, rank: int) -> Position:
    """The rest of a per-process (FSDP, DeepSpeed) checkpoint's load: the schedule, this process's RNG
    state (process 0's where it was saved with fewer processes) and the data position."""
    scheduler.load_state_dict(_torch_load(directory / "scheduler.pt")["scheduler"])
    own = directory / f"rng-rank{rank}.pt"
    if not own.is_file():
        log.warning("%s has no RNG state for process %d (saved with fewer processes): using process 0's", directory, rank)
        own = directory / "rng-rank0.pt"
    saved = _torch_load(own)
    restore_rng(json.loads(saved["plain"]), saved["tensors"])
    return _position(state, directory)


# --- DeepSpeed --------------------------------------------------------------------------------------
#
# DeepSpeed's engine owns its model and optimizer partitions, so its own checkpoint writer saves them
# (``engine.save_checkpoint``, the call accelerate's ``save_state`` makes for a DeepSpeed model) into
# ``deepspeed/``: under ZeRO-2 one ``mp_rank_00_model_states.pt`` (the replicated weights, written
# by the main process) and one ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per process (its
# partition of the float32 master weights and AdamW state); under ZeRO-3 a model-states file per
# process too. Called directly on the stage's engine, not through ``save_state``, which would also
# save every engine an earlier stage prepared and pickle the RNG states. The RNG states and schedule
# are aligner's own files, as under FSDP; ``write_sharded_atomically`` makes the directory appear at once.

DEEPSPEED_TAG = "state"  # the one sub-directory of ``deepspeed/`` (DeepSpeed's "tag")


def _frozen_weights_are_the_base_model(engine: Any) -> bool:
    """Whether a checkpoint may leave the frozen weights out: they are then the model the run started
    from (a LoRA run's base), which a resume loads anyway, not a copy per checkpoint. Not when an
    adapter weight is frozen (``lora_fa`` keeps LoRA's randomly initialised A matrices frozen): those
    exist nowhere else."""
    module = getattr(engine, "module", engine)
    return not any("lora_" in name for name, parameter in module.named_parameters() if not parameter.requires_grad)


def save_deepspeed_shard(directory: Path, engine: Any, optimizer: Any, rank: int) -> None:
    """This process's part of a DeepSpeed checkpoint: its ZeRO partitions (DeepSpeed's writer), its RNG state.

    Every process must call it (DeepSpeed's save is a collective). ``optimizer`` is the engine's own.
    """
    from aligner.training.checkpoint_writing import DEEPSPEED_DIR

    del optimizer  # the engine saves its ZeRO optimizer's partitions itself
    plain, tensors = capture_rng()
    torch.save({"tensors": tensors, "plain": json.dumps(plain)}, directory / f"rng-rank{rank}.pt")
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                           exclude_frozen_parameters=_frozen_weights_are_the_base_model(engine))


def load_deepspeed_training_state(directory: Path, engine: Any, scheduler: Any, rank: int) -> Position:
    """Load a DeepSpeed checkpoint into the stage's freshly built engine; every process calls it.

    DeepSpeed reads each process's partitions of the weights and optimizer state (its files are
    pickles, read by DeepSpeed's loader: their checksums were verified against the manifest first);
    aligner restores the schedule, the RNG state and the data position. Resuming with another
    number of processes is DeepSpeed's to support (ZeRO-2/3 reshard on load); a process without a
    saved RNG state then takes process 0's.
    """
    from aligner.training.checkpoint_writing import DEEPSPEED_DIR

    state = read_trainer_state(directory)
    try:
        loaded, _ = engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                           load_optimizer_states=True, load_lr_scheduler_states=False,
                                           load_module_strict=False)  # frozen weights are not in it
    except Exception as exc:  # DeepSpeed reports a missing or damaged partition in its own ways
        raise CheckpointError(f"could not load the DeepSpeed state in {directory / DEEPSPEED_DIR}: {exc}; "
                              "`aligner verify RUN_DIR` checks a run's checkpoints") from exc
    if loaded is None:
        raise CheckpointError(f"could not load the DeepSpeed state in {directory / DEEPSPEED_DIR}: DeepSpeed found "
                              "no checkpoint there; `aligner verify RUN_DIR` checks a run's checkpoints")
    return _restore_schedule_and_rng(directory, state, scheduler, rank)
