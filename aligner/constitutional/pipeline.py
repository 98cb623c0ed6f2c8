"""``aligner constitutional PIPELINE``: the Constitutional AI recipe as one command.

A pipeline file lists steps, each a command and its config (relative to the pipeline file)::

    # aligner constitutional configs/constitutional/pipeline.yaml
    steps:
      - train: ../constitutional_base.yaml   # the helpful-only model
      - revise: revise.yaml                  # critique and revision -> SFT rows
      - train: sft.yaml                      # SL-CAI: SFT on the revisions
      - label: label.yaml                    # AI feedback: judge pairs of the SL-CAI model's answers
      - train: dpo.yaml                      # RL-CAI (DPO on the labels; PPO works the same way)

Each step is exactly ``aligner <command> <config>``: a later step reads an earlier one's output by the
path its config names, so the steps also run one by one from the shell. A step's config is read
when the step starts (its inputs exist only then). ``revise`` and ``label`` skip rows already
written and training runs resume (``resume: auto``), so a rerun after a failure continues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from aligner.config import read_config_source
from aligner.errors import ConfigError

log = logging.getLogger("aligner")
COMMANDS = ("revise", "label", "train")


def load_pipeline(path: str | Path) -> list[tuple[str, Path]]:
    """The steps of a pipeline file as (command, config path); a located ``ConfigError`` if malformed."""
    data, base, _ = read_config_source(path)
    unknown = sorted(set(data) - {"steps"})
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (a pipeline has only 'steps')")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{path}: 'steps' must be a non-empty list of {{command: config}} entries")
    result = []
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict) or len(step) != 1:
            raise ConfigError(f"{path}: step {number} must be one '{{command: config}}' entry, got {step!r}")
        (command, config), = step.items()
        if command not in COMMANDS:
            raise ConfigError(f"{path}: step {number}: unknown command '{command}' (expected {', '.join(COMMANDS)})")
        config_path = Path(str(config)).expanduser()
        config_path = (config_path if config_path.is_absolute() else base / config_path).resolve()
        if not config_path.is_file():
            raise ConfigError(f"{path}: step {number}: config not found: {config_path}")
        result.append((command, config_path))
    return result


def run_pipeline(path: str | Path, report: Callable[[str], None] = print) -> None:
    """Run every step of the pipeline at ``path`` in order, reporting each step's result."""
    steps = load_pipeline(path)
    for number, (command, config) in enumerate(steps, start=1):
        log.info("step %d/%d: aligner %s %s", number, len(steps), command, config)
        report(f"step {number}/{len(steps)} ({command}): {_run_step(command, config)}")


def _run_step(command: str, config: Path) -> str:
    """Run one step; a one-line summary of what it wrote."""
    if command == "revise":
        from aligner.constitutional.config import load_revise_config
        from aligner.constitutional.revise import revise

        revise_config = load_revise_config(config)
        counts = revise(revise_config)
        return f"{revise_config.output}: {counts['revised']} revised, {counts['skipped']} already done"
    if command == "label":
        from aligner.commands.label import label, load_label_config

        label_config = load_label_config(config)
        counts = label(label_config)
        return (f"{label_config.output}: {counts['labelled']} labelled, {counts['ties']} ties, "
                f"{counts['skipped']} already done")
    from aligner.api import train

    # A finished run is loaded rather than retrained, so rerunning the pipeline continues where it stopped.
    return f"final model: {train(config, resume='auto').final_model_dir}"
