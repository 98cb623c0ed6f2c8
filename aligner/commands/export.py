"""``aligner export RUN_DIR``: a run's adapter as a standalone model, or copied as a peft adapter.

``--merge`` loads the base model, applies the adapter with peft, merges it into the weights and
writes a plain transformers checkpoint (safetensors + config + tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads with no aligner and no peft installed.

A final model of named adapters (stages with ``peft: {name: lora, adapter_name: ...}``) is peft's
multi-adapter layout: one subfolder per adapter (an adapter named ``default`` at the top level);
``--adapter NAME`` picks the one to merge or copy.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from aligner.errors import ConfigError, os_error, suggest

ERRNO_PREFIX = re.compile(r"^\[Errno \d+\] ")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to the CLI."""
    export = sub.add_parser("export", help="export a run's final adapter (merged into the base with --merge)")
    export.add_argument("run_dir", help="a run's output directory (or a stage's final/ directory)")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    export.add_argument("--stage", default=None, help="stage to export (default: the last one)")
    export.add_argument("--adapter", default=None, help="which named adapter to export, when the model holds "
                                                        "several (see `aligner generate`)")
    export.add_argument("--base", default=None, help="base model directory (default: the adapter's "
                                                     "base_model_name_or_path)")
    export.add_argument("--output", default=None, help="where to write (default: RUN_DIR/export)")
    export.set_defaults(handler=run)


def final_dir(run_dir: Path, stage: str | None) -> Path:
    """The directory holding the adapter to export."""
    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "no such directory"
        raise ConfigError(f"{run_dir}: {what} (export takes a run's output directory or a stage's final/)")
    if adapter_dirs(run_dir):
        return run_dir
    if stage is None:
        from aligner.data.loading import read_text

        summary = run_dir / "summary.json"
        if not summary.exists():
            raise ConfigError(f"{run_dir} has no summary.json; pass --stage or a final/ directory")
        try:
            source = Path(json.loads(read_text(summary))["final_model"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{summary} is not an aligner run summary (no 'final_model'); pass --stage, or the "
                              "adapter's final/ directory itself") from None
        if not source.is_dir():
            raise ConfigError(f"{source}: not found ('final_model' of {summary}); was the run moved? pass the "
                              "stage's final/ directory itself")
        return source
    return run_dir / stage / "final"


def adapter_dirs(directory: Path) -> dict[str, Path]:
    """The peft adapters saved in ``directory``, by name: peft writes the adapter named ``default`` at the
    top level and every other one in a subfolder of its name (``PeftModel.save_pretrained``)."""
    found = {"default": directory} if (directory / "adapter_config.json").is_file() else {}
    if directory.is_dir():
        found.update({sub.name: sub for sub in sorted(directory.iterdir())
                      if sub.is_dir() and (sub / "adapter_config.json").is_file()})
    return found


def choose_adapter(directory: Path, adapters: dict[str, Path], name: str | None) -> str:
    """The adapter ``--adapter`` names (or the only one), or a ``ConfigError`` that lists them."""
    listed = ", ".join(adapters)
    if name is None:
        if len(adapters) > 1:
            raise ConfigError(f"{directory} holds several adapters ({listed}); choose one with --adapter NAME")
        return next(iter(adapters))
    if name not in adapters:
        raise ConfigError(f"--adapter {name}: no adapter of that name in {directory}{suggest(name, adapters)} "
                          f"(adapters: {listed})")
    return name


def base_model_of(source: Path, adapter: Path, base: str | None = None) -> str:
    """The base model an adapter in ``source`` (a stage's final/) was trained on: ``base``, the one
    its ``adapter_config.json`` names, or the full model an earlier stage of the same run saved."""
    from aligner.data.loading import read_text

    base = base or json.loads(read_text(adapter / "adapter_config.json")).get("base_model_name_or_path") \
        or _previous_stage_model(source)
    if not base:
        raise ConfigError(f"the adapter in {adapter} does not say which base model it was trained on; pass --base")
    return base


def _check_target(target: Path) -> None:
    """Refuse a target that cannot be a directory before anything slow (loading a model) or any copy."""
    for candidate in (target, *target.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == target else f"{candidate} "
                raise ConfigError(f"--output {target}: {where}is a file, not a directory")
            return


def _previous_stage_model(source: Path) -> str | None:
    """The full model saved by the stage before ``source``'s stage, if that is what it trained on.

    A base built in memory (a ``tiny`` spec) has no path in the adapter config; when an earlier
    full fine-tuning stage of the same run saved it, that saved model is the base. Stages of named
    adapters in between leave the base as it was (they are not merged), so the search passes them.
    """
    import yaml

    run_dir, stage = source.parent.parent, source.parent.name
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    names = [s["name"] for s in yaml.safe_load(config.read_text()).get("stages", [])]
    if stage not in names:
        return None
    for name in reversed(names[:names.index(stage)]):
        previous = run_dir / name / "final"
        if (previous / "config.json").is_file() and not adapter_dirs(previous):
            return str(previous)
        if (previous / "adapter_config.json").exists() or not adapter_dirs(previous):
            return None  # an unnamed adapter was merged into the base after that stage: it is no saved model
    return None


def export(run_dir: str | Path, output: str | Path | None = None, merge: bool = True, stage: str | None = None,
           base: str | None = None, adapter: str | None = None) -> Path:
    """Write the exported model and return its directory.

    ``adapter`` names one adapter of a model that holds several; without ``merge`` only that
    adapter (with the tokenizer) is copied, otherwise the whole folder is.
    """
    run_dir = Path(run_dir)
    source = final_dir(run_dir, stage)
    adapters = adapter_dirs(source)
    if not adapters:
        raise ConfigError(f"{source} holds no peft adapter (a full fine-tuning run's final/ is already a model)")
    # Chosen before anything is written: a copy of every adapter needs no choice.
    name = choose_adapter(source, adapters, adapter) if merge or adapter is not None else None
    target = Path(output) if output else run_dir / "export"
    _check_target(target)
    if not merge:
        try:
            if name is not None:
                _copy_one_adapter(source, adapters[name], target)
            else:
                shutil.copytree(source, target, dirs_exist_ok=True)
        except shutil.Error as exc:  # copytree copies what it can, then lists (src, dst, why) per failure
            failed = exc.args[0][0] if exc.args and isinstance(exc.args[0], list) and exc.args[0] else None
            # ``why`` is str(OSError): "[Errno 28] No space left on device"; the number says nothing to a user.
            detail = f"{failed[1]}: {ERRNO_PREFIX.sub('', str(failed[2]))}" if failed else str(exc)
            raise ConfigError(f"could not write {target}: {detail}") from exc
        except OSError as exc:
            raise os_error(exc, target, "could not write") from exc
        return target
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_model_of(source, adapters[name], base)
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapters[name], adapter_name=name).merge_and_unload()
    try:
        merged.save_pretrained(target, safe_serialization=True)
        if (source / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(source).save_pretrained(target)
    except OSError as exc:  # a full disk or a read-only target, met while writing
        raise os_error(exc, target, "could not write") from exc
    return target


def _copy_one_adapter(source: Path, adapter: Path, target: Path) -> None:
    """One adapter of a multi-adapter folder as a plain peft adapter folder, with the run's tokenizer."""
    target.mkdir(parents=True, exist_ok=True)
    for path in adapter.iterdir():
        if path.is_file():
            shutil.copy2(path, target / path.name)
    if adapter != source and (source / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(target)


def run(args: argparse.Namespace) -> int:
    """Handle ``aligner export ...``."""
    target = export(args.run_dir, args.output, args.merge, args.stage, args.base, args.adapter)
    print(f"exported {'merged model' if args.merge else 'adapter'}: {target}")
    return 0
