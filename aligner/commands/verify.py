"""``aligner verify RUN_DIR``: check every checkpoint and final model of a run, changing nothing.

Each complete checkpoint (``STAGE/checkpoints/step-N``, ``STAGE/final``) is checked against the
manifest in its ``COMPLETE`` marker (size and SHA-256 of every file); checkpoints from before
manifests get structural checks only. Half-written directories are listed as incomplete, and ones
an earlier ``--resume`` set aside as ``damaged-*`` as set aside. The exit code is 2 when a complete
checkpoint is damaged (what ``--resume`` would have to skip), 0 otherwise; given one checkpoint
directory, 2 unless that checkpoint is usable. Files are only read.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.errors import ConfigError, os_error
from aligner.training.checkpoint_manifest import (
    MARKER,
    SET_ASIDE_PREFIX,
    STEP_NAME,
    Verification,
    verify_checkpoint,
)

_FINAL = "final"


def _listing(directory: Path) -> list[Path]:
    """The entries of ``directory``; a folder that cannot be read is one located line, not a traceback."""
    try:
        return list(directory.iterdir())
    except OSError as exc:
        raise os_error(exc, directory, "could not list") from exc


@dataclass
class StageReport:
    """The checkpoints found in one stage directory, and what ``--resume`` would do with them."""

    name: str | None
    path: Path
    entries: list[Verification] = field(default_factory=list)

    def resume_plan(self) -> tuple[str, Path | None]:
        """(``final`` | ``checkpoint`` | ``error`` | ``start``, the directory resume would load)."""
        by_name = {v.directory.name: v for v in self.entries}
        final = by_name.get(_FINAL)
        if final is not None and final.usable:
            return "final", final.directory
        steps = [v for v in self.entries if STEP_NAME.fullmatch(v.directory.name) and v.status != "incomplete"]
        usable = [v for v in steps if v.usable]
        if usable:
            return "checkpoint", usable[-1].directory
        return ("error", None) if steps else ("start", None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form."""
        action, directory = self.resume_plan()
        return {"stage": self.name, "path": str(self.path),
                "resume": {"action": action, "from": str(directory) if directory else None},
                "checkpoints": [v.to_dict() for v in self.entries]}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``verify`` subcommand to the CLI."""
    verify = sub.add_parser("verify", help="check a run's checkpoints and final models against their checksums "
                                           "(exit 2 if a complete one is damaged); changes nothing")
    verify.add_argument("run_dir", help="a run's output directory (or one stage's directory, or one checkpoint)")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(handler=run)


def _step_number(path: Path) -> int:
    found = STEP_NAME.search(path.name)
    return int(found.group(1)) if found else -1


def _leftover(path: Path) -> Verification | None:
    """A directory that is not a checkpoint resume would use: half-written, or set aside, or ``None``."""
    name = path.name
    if name.startswith(".tmp-"):
        return Verification(path, "incomplete", note="half-written (a write that did not finish); resume ignores it "
                                                     "and the next write of it replaces it")
    if name.startswith(".old-"):
        return Verification(path, "incomplete", note="the previous copy kept while it was being replaced; the next "
                                                     f"write puts it back if {name.removeprefix('.old-')} is missing")
    if name.startswith(SET_ASIDE_PREFIX):
        found = verify_checkpoint(path)
        note = ("skipped as damaged by an earlier --resume and kept; it verifies now: rename it back to use it"
                if found.usable else "skipped as damaged by an earlier --resume and kept")
        return Verification(path, "set-aside", found.damage, found.files, found.size, note)
    return None


def verify_stage(stage_dir: Path, name: str | None = None) -> StageReport:
    """Verify every checkpoint, final model and leftover directory of one stage."""
    report = StageReport(name if name is not None else stage_dir.name, stage_dir)
    checkpoints = stage_dir / "checkpoints"
    children = sorted(_listing(checkpoints), key=lambda p: (_step_number(p), p.name)) if checkpoints.is_dir() else []
    for child in children:
        if not child.is_dir():
            continue
        if STEP_NAME.fullmatch(child.name):
            report.entries.append(verify_checkpoint(child))
        elif (leftover := _leftover(child)) is not None:
            report.entries.append(leftover)
    final = stage_dir / _FINAL
    if final.is_dir():
        report.entries.append(verify_checkpoint(final))
    for child in sorted(_listing(stage_dir)):
        left_by_final = child.name in (f".tmp-{_FINAL}", f".old-{_FINAL}") or child.name.startswith(
            f"{SET_ASIDE_PREFIX}{_FINAL}")
        if left_by_final and child.is_dir() and (leftover := _leftover(child)) is not None:
            report.entries.append(leftover)
    return report


def _is_stage(path: Path) -> bool:
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / _FINAL).is_dir())


def _stage_order(run_dir: Path) -> list[str]:
    """Stage names in the order of the run's saved config (best effort: an unreadable one gives [])."""
    import yaml

    try:
        stages = yaml.safe_load((run_dir / "config.yaml").read_text()).get("stages") or []
        return [str(s.get("name")) for s in stages if isinstance(s, dict)]
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return []


def verify_run(run_dir: Path) -> list[StageReport]:
    """Verify everything under a run directory, a stage directory or a single checkpoint directory."""
    if not run_dir.is_dir():
        raise ConfigError(f"aligner verify: {run_dir} is not a directory")
    if (run_dir / MARKER).is_file() or STEP_NAME.fullmatch(run_dir.name):  # one checkpoint
        return [StageReport(None, run_dir.parent, [verify_checkpoint(run_dir)])]
    if _is_stage(run_dir):
        return [verify_stage(run_dir)]
    order = _stage_order(run_dir)
    stages = sorted((p for p in _listing(run_dir) if _is_stage(p)),
                    key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    if not stages and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"aligner verify: {run_dir} holds no aligner run (no config.yaml, and no stage directory "
                          "with checkpoints/ or final/)")
    return [verify_stage(p) for p in stages]


def _size(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _line(entry: Verification) -> list[str]:
    name = entry.directory.name
    if entry.status == "ok":
        return [f"  {name:<16} ok          {entry.files} files, {_size(entry.size)}, checksums match"]
    if entry.status == "unverified":
        return [f"  {name:<16} unverified  {entry.files} files, {_size(entry.size)}; {entry.note}"]
    if entry.status == "incomplete":
        return [f"  {name:<16} incomplete  {entry.note}"]
    head = "DAMAGED    " if entry.status == "damaged" else "set aside  "
    lines = [f"  {name:<16} {head} " + (entry.note if entry.status == "set-aside" else
                                         f"{len(entry.damage)} problem{'s' * (len(entry.damage) != 1)}:")]
    lines += [f"      {damage}" for damage in entry.damage]
    return lines


def format_reports(run_dir: Path, reports: list[StageReport]) -> str:
    """The human-readable listing: one line per checkpoint, each damaged file on its own line."""
    lines = []
    for report in reports:
        lines.append(f"stage '{report.name}' ({report.path}):" if report.name else f"{report.path}:")
        if not report.entries:
            lines.append("  no checkpoints")
        for entry in report.entries:
            lines += _line(entry)
        if report.name:
            action, directory = report.resume_plan()
            lines.append("  --resume would " + {
                "final": "load the final model (stage finished)",
                "checkpoint": f"continue from {directory.name if directory else ''}",
                "error": "stop with an error: no complete checkpoint is intact",
                "start": "train the stage from its start (no complete checkpoint)",
            }[action])
    complete = [e for r in reports for e in r.entries if e.status in ("ok", "unverified", "damaged")]
    damaged = [e for e in complete if e.status == "damaged"]
    unverified = sum(e.status == "unverified" for e in complete)
    if not reports:
        lines.append(f"{run_dir}: no checkpoints or final models yet")
    elif damaged:
        lines.append(f"verify: {len(damaged)} of {len(complete)} complete checkpoints in {run_dir} are damaged")
    else:
        lines.append(f"verify: all {len(complete)} complete checkpoints in {run_dir} are intact"
                     + (f" ({unverified} without checksums: structure checked only)" if unverified else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Handle ``aligner verify``: exit 2 if a complete checkpoint is damaged, else 0."""
    run_dir = Path(args.run_dir)
    reports = verify_run(run_dir)
    entries = [e for r in reports for e in r.entries]
    single = len(reports) == 1 and reports[0].name is None
    # Asked about one checkpoint, the question is "can I use it?": incomplete fails too.
    failed = not entries[0].usable if single else any(e.status == "damaged" for e in entries)
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "ok": not failed, "stages": [r.to_dict() for r in reports]},
                         indent=2))
    else:
        print(format_reports(run_dir, reports))
    return 2 if failed else 0
