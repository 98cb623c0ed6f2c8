"""The run directory: checked before anything is written, replaced only once the new run can start.

``aligner.train`` calls these in this order:

1. ``check_output_dir`` (reads, plus one probe it removes again): the directory can be created and
   written (a file where a directory belongs, a read-only file system, no permission are one
   located line), an earlier run is not replaced without ``--overwrite`` (and can be removed with
   it), ``--resume`` finds a run;
2. every other check, and the model load;
3. ``start_run``: only now is an earlier run removed (``--overwrite``) and ``config.yaml`` written;
4. ``discard_if_untouched`` when the run then fails before writing anything but its
   ``config.yaml``: that file is removed again, so the corrected rerun is not told the directory
   "already holds a run".
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from aligner.errors import ConfigError

CONFIG_FILE = "config.yaml"

# Plain words for the errors a user can fix; any other errno keeps the OS's own text.
_REASONS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "disk quota exceeded"}


def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, exc.strerror or str(exc))


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as anything: a file is reported by the caller)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _probe(directory: Path) -> None:
    """Create a directory and a file in ``directory`` and remove them: what starting a run will do."""
    probe = tempfile.mkdtemp(prefix=".aligner-write-probe-", dir=directory)
    try:
        with open(os.path.join(probe, "probe"), "wb") as handle:
            handle.write(b"0")
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _unremovable(out: Path) -> tuple[Path, str] | None:
    """A directory of ``out`` whose entries cannot be removed (no write or search permission), if any."""
    for directory, _, _ in os.walk(out):
        if not os.access(directory, os.W_OK | os.X_OK):
            return Path(directory), "permission denied"
    return None


def check_output_dir(out: Path, where: str, resuming: bool | str, overwrite: bool, main_process: bool = True) -> None:
    """Refuse (``ConfigError``, one line naming ``'output_dir'`` and ``where``) a run directory that cannot
    be used, before anything is written or deleted.

    ``where`` says where the key was set (`` (run.yaml, line 3)``). Only the main process probes
    writability: it is the one that writes.
    """
    key = f"'output_dir'{where}"
    holds_run = (out / CONFIG_FILE).is_file()
    if resuming is True and not holds_run:
        raise ConfigError(f"--resume: output_dir {out}{where} holds no run to resume")
    if os.path.lexists(out) and not out.is_dir():
        raise ConfigError(f"{key}: {out} is a file, not a directory; choose another output_dir")
    if holds_run and not resuming and not overwrite:
        raise ConfigError(f"output_dir {out}{where} already holds a run; continue it with --resume (resume: true), "
                          "replace it with --overwrite, or choose another output_dir")
    if not main_process:
        return
    target = _existing_ancestor(out)
    if not target.is_dir():
        raise ConfigError(f"{key}: cannot create {out}: Not a directory ({target} is a file, where a directory "
                          "is expected); choose another output_dir")
    try:
        _probe(target)
    except OSError as exc:
        action = "write in" if target == out else f"create {out} in"
        raise ConfigError(f"{key}: cannot {action} {target}: {_reason(exc)}; choose another output_dir or make "
                          "it writable") from exc
    if holds_run and overwrite and not resuming:
        blocked = _unremovable(out)
        if blocked is not None:
            raise ConfigError(f"{key}: --overwrite cannot remove the earlier run in {out}: {blocked[0]}: {blocked[1]}; "
                              "nothing was changed")


def _remove_contents(out: Path) -> None:
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def start_run(out: Path, where: str, replace: bool, write_config: Callable[[Path], None]) -> bool:
    """Remove the earlier run when ``replace`` (``--overwrite``), create ``out`` and write its config.

    Called once every check has passed and the model has loaded. The directory itself is kept (it
    may be a mount point or a link); its contents go. Returns whether ``out`` was created here.
    """
    created = not out.exists()
    try:
        if replace and (out / CONFIG_FILE).is_file():
            _remove_contents(out)
        out.mkdir(parents=True, exist_ok=True)
        write_config(out / CONFIG_FILE)
    except OSError as exc:
        failed = exc.filename or out
        raise ConfigError(f"'output_dir'{where}: could not prepare {out}: {failed}: {_reason(exc)}") from exc
    return created


def discard_if_untouched(out: Path, created: bool) -> bool:
    """After a run failed: remove its ``config.yaml`` (and ``out``, if ``start_run`` created it and it
    is empty) when the run wrote no other file, so a corrected rerun can start there. Returns whether
    anything was removed. Anything else written (metrics, a checkpoint) is kept: it can be resumed."""
    try:
        files = [Path(root) / name for root, _, names in os.walk(out) for name in names]
        if files != [out / CONFIG_FILE]:
            return False
        (out / CONFIG_FILE).unlink()
        # Empty directories the run made (a stage directory before its first file) go too.
        for root, _, _ in sorted(os.walk(out), key=lambda item: -len(item[0])):
            if Path(root) != out:
                os.rmdir(root)
        if created:
            out.rmdir()
    except OSError:
        return False  # cleaning up must never hide the run's own error
    return True
