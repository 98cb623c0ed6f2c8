"""Resumable JSONL output, shared by ``aligner label`` and ``aligner revise``.

Both commands append rows per chunk of prompts, each row carrying ``provenance.prompt_index``; a
rerun reads the indices already written (``done_indices``), cuts a last line torn by a crash
(``drop_torn_line``) and appends the rest (``append_lines``), so an interrupted run resumes where
it stopped. ``check_output`` refuses an output path that cannot be written before any work starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aligner.errors import ConfigError, DataError, os_error


def done_indices(*paths: Path) -> set[int]:
    """Prompt indices already written (a torn last line from a crash is ignored).

    Read before anything is appended: a line that is not UTF-8 (other than a torn last one, which a
    crash can cut inside a character) means the file is not this command's output, and is an error.
    """
    done: set[int] = set()
    for path in paths:
        if not path.is_file():
            continue
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise os_error(exc, path, "could not read") from exc
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                if number == len(lines):  # torn: drop_torn_line cuts it
                    continue
                raise DataError(f"{path}, line {number}: not UTF-8; it is appended to, so it must be the JSONL this "
                                "command wrote (move it aside, or choose another 'output')") from None
            try:
                done.add(int(json.loads(text)["provenance"]["prompt_index"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def drop_torn_line(path: Path) -> None:
    """Cut a last line left half-written by a crash, so appended rows start on a line of their own."""
    if not path.is_file():
        return
    try:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    except OSError as exc:
        raise os_error(exc, path, "could not repair the torn last line of") from exc


def check_output(output: Path, ties_path: Path) -> None:
    """Refuse an output that cannot be written as a file, before the model loads or anything is written."""
    for path in (output, ties_path):
        if path.is_dir():
            raise ConfigError(f"'output' {output}: {path} is a directory, not a file")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"'output' {output}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"'output' {output}: {parent} is not writable")
            return


def append_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines`` with one unbuffered write, so a full disk is reported here, naming ``path``.

    Unbuffered: a buffered file would meet the error again when closed, after it was reported.
    With no lines it only creates the file (both files exist once labelling starts, as before).
    """
    data = "".join(lines).encode()
    try:
        with path.open("ab", buffering=0) as handle:
            written = 0
            while written < len(data):
                written += handle.write(data[written:])
    except OSError as exc:
        raise os_error(exc, path, "could not write") from exc
