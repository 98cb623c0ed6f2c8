"""``aligner plot RUN_DIR``: training curves from ``metrics.jsonl`` as PNG files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from aligner.errors import ConfigError, DataError, os_error

# Panels drawn when the run logged them: (title, metric-name suffixes).
PANELS = (
    ("loss", ("loss",)),
    ("reward", ("rewards/chosen", "rewards/rejected", "reward/mean", "judge_score")),
    ("margin", ("rewards/margins",)),
    ("accuracy", ("rewards/accuracies", "accuracy")),
    ("KL", ("kl", "kl/mean", "kl_coef")),
)
# ``rewards/<source>/mean`` (training) and ``eval/rewards/<source>/mean`` (held-out).
REWARD_SOURCE = re.compile(r"(eval/)?rewards/[^/]+/mean")


def panels_of(keys: set[str]) -> list[tuple[str, list[str]]]:
    """The panels to draw for a stage that logged ``keys``: (title, the metrics it plots)."""
    panels = []
    for title, suffixes in PANELS:
        series = sorted(k for k in keys if any(k == s or k.endswith("/" + s) or k == "eval/" + s for s in suffixes))
        if series:
            panels.append((title, series))
    # Online algorithms' reward sources, one curve each (training and held-out).
    sources = sorted(k for k in keys if REWARD_SOURCE.fullmatch(k))
    if sources:
        panels.append(("reward sources", sources))
    return panels


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``; a damaged line is one error naming the file and line."""
    from aligner.data.loading import read_text

    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "no such directory"
        raise ConfigError(f"{run_dir}: {what} (plot takes a run's output directory)")
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{run_dir} has no metrics.jsonl (is it an aligner run directory?)")
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        # Every record aligner writes has these two; without them there is no curve to put it on.
        missing = [key for key in ("stage", "step") if not isinstance(record, dict) or key not in record]
        if missing:
            raise DataError(f"{path}, line {number}: not a metrics record (no {' or '.join(map(repr, missing))})")
        records.append(record)
    return records


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw one PNG per stage with a panel per metric family; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    written = []
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = [r for r in records if r["stage"] == stage]
        panels = panels_of({k for r in rows for k in r if k not in ("stage", "step")})
        if not panels:
            continue
        figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        for axis, (title, series) in zip(axes[0], panels, strict=True):
            for key in series:
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                style = "o--" if key.startswith("eval/") else "-"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=key, markersize=3)
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.legend(fontsize=7)
        figure.suptitle(f"{run_dir.name} / {stage}")
        figure.tight_layout()
        target = run_dir / "plots" / f"{stage}.png"
        try:
            target.parent.mkdir(exist_ok=True)
            figure.savefig(target, dpi=100)
        except OSError as exc:  # a full disk, a read-only run directory, plots/ that is a file
            raise os_error(exc, target, "could not write") from exc
        finally:
            plt.close(figure)
        written.append(target)
    return written
