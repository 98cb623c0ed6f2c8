"""Checkpoint manifests and verification: finding damage after a checkpoint was completed.

The ``COMPLETE`` marker is also the checkpoint's manifest: JSON with the size and SHA-256 of every
other file in the directory, so that damage after completion (a disk fault, a partial copy, a file
edited or deleted by hand) is found by ``verify_checkpoint`` instead of by a loader's traceback.
Holding the manifest in the marker itself means it cannot be lost on its own. Checkpoints written
before manifests existed have a marker reading ``ok``; they can only be checked for structure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.errors import AlignerError

MARKER = "COMPLETE"
MANIFEST_FORMAT = "aligner-checkpoint-manifest"
MANIFEST_VERSION = 1
LEGACY_MARKER = "ok"  # what the marker held before it carried a manifest
SET_ASIDE_PREFIX = "damaged-"  # damaged checkpoints skipped by resume are renamed to damaged-<name>
_CHUNK = 4 << 20  # hash in 4 MiB reads: constant memory whatever the file size
STEP_NAME = re.compile(r"step-(\d+)")  # a step checkpoint's folder name


class CheckpointError(AlignerError):
    """A checkpoint could not be written (full disk, permissions; the previous one is intact), or
    none that resume could use is intact."""


@dataclass(frozen=True)
class Damage:
    """One problem found in a checkpoint: the file (or directory) and what is wrong with it."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Verification:
    """What ``verify_checkpoint`` found in one checkpoint directory.

    ``status`` is ``ok`` (every file matches the manifest), ``unverified`` (written before manifests
    existed: its structure is sound, its contents cannot be checked), ``damaged`` (``damage`` says
    which files and why) or ``incomplete`` (no marker: a write that never finished). ``aligner
    verify`` also lists ``set-aside`` ones (``damaged-*``, skipped by an earlier resume).
    """

    directory: Path
    status: str
    damage: list[Damage] = field(default_factory=list)
    files: int = 0
    size: int = 0
    note: str = ""

    @property
    def usable(self) -> bool:
        """Whether resume may start from this checkpoint."""
        return self.status in ("ok", "unverified")

    def describe(self, limit: int = 3) -> str:
        """The damage on one line: the first ``limit`` problems, then how many more."""
        shown = "; ".join(str(d) for d in self.damage[:limit])
        more = len(self.damage) - limit
        return shown + (f"; and {more} more" if more > 0 else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for ``aligner verify --json``)."""
        return {"path": str(self.directory), "name": self.directory.name, "status": self.status,
                "files": self.files, "bytes": self.size, "note": self.note,
                "damage": [{"path": str(d.path), "problem": d.problem} for d in self.damage]}


def file_sha256(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file, read in fixed-size chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


def _hash_files(directory: Path, names: list[str]) -> dict[str, tuple[int, str] | OSError]:
    """Hash many files at once: hashlib releases the GIL, so threads overlap reading and hashing
    (sharded weights and the optimizer state are several large files)."""

    def one(name: str) -> tuple[int, str] | OSError:
        try:
            return file_sha256(directory / name)
        except OSError as exc:
            return exc

    workers = min(4, os.cpu_count() or 1, len(names))
    if workers <= 1:
        return {name: one(name) for name in names}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the marker, as sorted POSIX paths relative to it."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in names:
            relative = (Path(root) / name).relative_to(directory).as_posix()
            if relative != MARKER:
                found.append(relative)
    return sorted(found)


def manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a finished checkpoint directory: size and SHA-256 of every file but the marker.

    Written once, right after the files: they were just written, so reading them back mostly hits
    the page cache. (Hashing while writing would need hooks into transformers', peft's and torch's
    writers, which an algorithm or backend may replace.) Raises ``OSError`` if a file cannot be read.
    """
    names = _files(directory)
    files = {}
    for name, result in _hash_files(directory, names).items():
        if isinstance(result, OSError):
            raise result
        files[name] = {"size": result[0], "sha256": result[1]}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "hash": "sha256", "files": files}


def _parse_manifest(raw: bytes) -> dict[str, dict[str, Any]] | None:
    """The ``files`` of a manifest; ``None`` for a newer manifest version; ``ValueError`` if malformed."""
    data = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError("not an aligner checkpoint manifest")
    version = data.get("version")
    if not isinstance(version, int):
        raise ValueError("no manifest version")
    if version > MANIFEST_VERSION:
        return None
    files = data.get("files")
    if not isinstance(files, dict):
        raise ValueError("no file list")
    for name, entry in files.items():
        # A manifest is read from disk: a damaged one must not send the check outside the checkpoint.
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name == MARKER:
            raise ValueError(f"it lists an invalid path {name!r}")
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or entry["size"] < 0
                or not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise ValueError(f"its entry for {name!r} is malformed")
    return files


def verify_checkpoint(directory: Path, thorough: bool = True) -> Verification:
    """Check a checkpoint directory against its manifest without changing anything in it.

    Every file listed must exist with the recorded size and SHA-256, and no other file may be
    there (a stray ``model-*.safetensors`` would be loaded along with the real weights). With
    ``thorough=False`` the hashes are skipped once the cheap checks (layout, sizes) have found
    damage: enough to decide that resume must skip the checkpoint. Checkpoints from before
    manifests (marker ``ok``) get the structural checks of ``check_structure``.
    """
    marker = directory / MARKER
    if not marker.is_file():
        return Verification(directory, "incomplete", note=f"no {MARKER} marker: a write that did not finish")
    try:
        raw = marker.read_bytes()
    except OSError as exc:
        return Verification(directory, "damaged", [Damage(marker, f"unreadable: {exc.strerror or exc}")])
    if raw.strip() == LEGACY_MARKER.encode():
        return check_structure(directory, "no checksums (written by an older aligner); only its structure was checked")
    try:
        listed = _parse_manifest(raw)
    except ValueError as exc:
        return Verification(directory, "damaged", [Damage(marker, f"manifest unreadable ({exc})")])
    if listed is None:
        return check_structure(directory, "manifest written by a newer aligner; only its structure was checked")

    damage = [Damage(directory / name, "not in the manifest (added after the checkpoint was completed)")
              for name in sorted(set(_files(directory)) - set(listed))]
    same_size = []
    for name, entry in sorted(listed.items()):
        path = directory / name
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as exc:
            damage.append(Damage(path, f"unreadable: {exc.strerror or exc}"))
            continue
        if size is None:
            what = "a directory" if path.is_dir() else "missing"
            damage.append(Damage(path, f"{what}; the manifest lists a file of {entry['size']} bytes"))
        elif size != entry["size"]:
            how = "truncated" if size < entry["size"] else "grown"
            damage.append(Damage(path, f"{size} bytes, the manifest says {entry['size']} ({how})"))
        else:
            same_size.append(name)
    total = sum(entry["size"] for entry in listed.values())
    if damage and not thorough:
        return Verification(directory, "damaged", sorted(damage, key=lambda d: str(d.path)), len(listed), total)
    for name, result in _hash_files(directory, same_size).items():
        if isinstance(result, OSError):
            damage.append(Damage(directory / name, f"unreadable: {result.strerror or result}"))
        elif result[1] != listed[name]["sha256"]:
            damage.append(Damage(directory / name, f"contents differ from the manifest (sha256 now {result[1][:12]}..., "
                                                   f"recorded {listed[name]['sha256'][:12]}...)"))
    status = "damaged" if damage else "ok"
    return Verification(directory, status, sorted(damage, key=lambda d: str(d.path)), len(listed), total)


def check_structure(directory: Path, note: str = "") -> Verification:
    """Structural checks for a checkpoint without a manifest (status ``unverified`` or ``damaged``).

    Catches what a partial copy or a lost file leaves: required files missing, a safetensors file
    shorter or longer than its header says, a torch file whose zip directory or CRCs are broken, a
    JSON file that does not parse. A flipped bit inside safetensors weights cannot be seen here.
    """
    names = _files(directory)
    damage = []
    required = ["trainer_state.json"]
    if STEP_NAME.fullmatch(directory.name.removeprefix(SET_ASIDE_PREFIX).split(".")[0]):
        required += ["optimizer.pt", "rng.pt"]  # what an exact resume reads besides the weights
    damage += [Damage(directory / name, "missing") for name in required if name not in names]
    if not any(name.endswith(".safetensors") and "/" not in name for name in names):
        damage.append(Damage(directory, "holds no weights (*.safetensors)"))
    for name in names:
        problem = _structure_problem(directory / name)
        if problem:
            damage.append(Damage(directory / name, problem))
    total = 0
    for name in names:
        with contextlib.suppress(OSError):  # an unreadable file is already reported above
            total += (directory / name).stat().st_size
    return Verification(directory, "damaged" if damage else "unverified", damage, len(names), total, note)


def _structure_problem(path: Path) -> str | None:
    """What is structurally wrong with one file, judged by its kind; ``None`` if nothing is seen."""
    try:
        if path.suffix == ".safetensors":
            return _safetensors_problem(path)
        if path.suffix == ".pt":
            # torch.save writes zip archives with a CRC per entry: testzip reads and checks them all.
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except zipfile.BadZipFile:
                return "not a readable torch file (no zip directory: truncated?)"
            return f"entry {bad} fails its CRC check" if bad else None
        if path.suffix == ".json":
            try:
                json.loads(path.read_bytes().decode("utf-8"))
            except ValueError as exc:
                return f"not valid JSON ({exc})"
        return None
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes: its size
    must be exactly what the header's largest data offset says."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors file (truncated)"
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):  # safetensors itself refuses headers over 100 MB
            return "its header runs past the end of the file (truncated or overwritten)"
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            expected = 8 + length + max((int(end) for end in ends), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its safetensors header is malformed"
    if size != expected:
        how = "truncated" if size < expected else "trailing bytes"
        return f"{size} bytes, its header describes {expected} ({how})"
    return None


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories (``step-N``) that carry the completion marker, oldest first."""
    if not directory.is_dir():
        return []
    # Only ``step-<digits>``: a stray ``step-best`` (or anything a user puts there) must not crash readers.
    found = [p for p in directory.glob("step-*") if STEP_NAME.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def set_aside(directory: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-<name>`` beside it (``.2``, ``.3`` if taken); return the new path.

    Resume does this to a checkpoint it skips so that the continuing run neither prunes it nor
    replaces it when it reaches the same step again: nothing a user may still need is deleted.
    """
    for attempt in range(1, 1000):
        target = directory.parent / f"{SET_ASIDE_PREFIX}{directory.name}{'' if attempt == 1 else f'.{attempt}'}"
        if not target.exists():
            directory.rename(target)
            return target
    raise CheckpointError(f"could not set {directory} aside: {SET_ASIDE_PREFIX}{directory.name}.* all taken")


def read_checkpoint_tensors(path: Path) -> dict:
    """The tensors of a checkpoint's safetensors file; a ``CheckpointError`` naming the file (and how to
    check the run) when it is damaged or missing, instead of the loader's own error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type, OSError, ... for a damaged file
        raise CheckpointError(f"could not load {path}: {exc}; the file is damaged or missing (`aligner verify "
                              "RUN_DIR` checks a run's checkpoints)") from exc
