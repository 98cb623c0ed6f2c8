"""How many CPU threads torch uses in a run (the ``threads`` setting).

torch sizes its intra-op pool from the machine's cores, not from the cores this process may use or
from how many processes share them. On a shared 2-core machine that default made training 10-26x
slower than one thread (PPO about 60 s/step against 1.5 s/step): threads spin waiting for cores
that are busy. So the run sets the count itself, once, at its start.

Precedence, most specific first:

1. ``threads: N`` in the config (or the override ``threads=N``);
2. ``OMP_NUM_THREADS`` from the environment (also what ``torchrun`` sets for several processes);
3. the default: 1 per process when several processes run on this machine (``LOCAL_WORLD_SIZE``, else
   ``WORLD_SIZE``, above 1), else the cores this process may use (``os.sched_getaffinity``: a
   container's or ``taskset``'s limit, not the machine's count), at most ``MAX_DEFAULT_THREADS``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from aligner.errors import ConfigError

log = logging.getLogger("aligner")

# Past about 8 threads the small matrix products of a training step stop getting faster on CPUs,
# while the cost of waking and syncing more threads keeps growing.
MAX_DEFAULT_THREADS = 8


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), or the machine's count where there is none."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def processes_here(environ: Mapping[str, str]) -> int:
    """How many training processes share this machine, from the launcher's variables (1 if none)."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _from_environment(environ: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` as a count, ``None`` when unset or empty."""
    text = environ.get("OMP_NUM_THREADS", "").strip()
    if not text:
        return None
    # OpenMP allows a comma-separated list for nested levels; the first is the outer (torch's) level.
    first = text.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise ConfigError(f"OMP_NUM_THREADS={text!r} in the environment is not a positive number of threads; "
                          "unset it or set it to e.g. 1")
    return int(first)


def resolve_threads(setting: int | str = "auto", environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """The thread count for ``setting`` (a count or ``"auto"``) and why, following the module's precedence."""
    environ = os.environ if environ is None else environ
    if setting != "auto":
        return int(setting), "threads in the config"
    from_env = _from_environment(environ)
    if from_env is not None:
        return from_env, "OMP_NUM_THREADS"
    processes = processes_here(environ)
    if processes > 1:
        return 1, f"auto: 1 per process, {processes} processes on this machine"
    cores = usable_cores()
    return min(cores, MAX_DEFAULT_THREADS), f"auto: {cores} usable cores, at most {MAX_DEFAULT_THREADS}"


def apply_threads(setting: int | str = "auto", environ: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op thread count for this process from ``setting``; log it and return it."""
    import torch

    environ = os.environ if environ is None else environ
    count, reason = resolve_threads(setting, environ)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    if environ.get("RANK", "0") == "0":  # once per run, not once per process
        log.info("torch threads: %d per process (%s; set with threads: N)", count, reason)
    return count
