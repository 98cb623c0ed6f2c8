"""Sampled generations written beside a stage: ``STAGE/samples/NAME.jsonl``, one JSON object per line.

Held-out evaluation writes the judged generations (``step-N.jsonl``), online algorithms a rollout's
rows (``rollout-step-N.jsonl``); both go through here so the folder, the format and the error a full
disk gives are the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aligner.errors import os_error


def write_sample_file(stage_dir: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``stage_dir/samples/name`` (replacing it); an OS error names the file."""
    path = stage_dir / "samples" / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise os_error(exc, path, "could not write the samples to") from exc
    return path
