"""A model card (README.md) written next to every final model.

The card is what the Hugging Face Hub shows for a pushed model, so its YAML metadata follows the Hub's
model-card fields: ``base_model`` (only a hub id: the Hub rejects a local path there), ``datasets``,
``tags`` and ``library_name``. The body says how the model was trained, stage by stage, with the run's
config and the final metrics. Nothing in it is secret: the config already refuses credentials, and
anything credential-like that still reaches the card is redacted here as a second line of defence.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from aligner.config import SECRET_KEYS, RunConfig, StageConfig

REDACTED = "<redacted>"
# Environment variables whose values must never appear in a card, even if a plugin copied one into an option.
_SECRET_ENV = re.compile(r"(TOKEN|API_?KEY|SECRET|PASSWORD)", re.IGNORECASE)
# The load snippet's argument; ``aligner push`` swaps the local path for the repository id.
LOAD_PATTERN = re.compile(r'from_pretrained\("[^"\n]*"\)')


def aligner_version() -> str:
    """The installed aligner distribution's version, or ``unknown`` when run from a bare source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aligner-trainer")
    except PackageNotFoundError:
        return "unknown"


def _is_local(text: str) -> bool:
    """Whether a model or data path names something on this machine rather than a hub id. Loaded
    configs hold local paths made absolute and hub ids as written (``name`` or ``org/name``)."""
    return (text.startswith((".", "/", "~")) or Path(text).expanduser().is_absolute() or Path(text).exists()
            or text.count("/") > 1)


def base_model_id(config: RunConfig) -> str | None:
    """The hub id the run started from; ``None`` for a local directory or a built-in tiny model."""
    path = config.model.path
    if path is None or _is_local(path):
        return None
    return path


# datasets' builders for plain files (``{path: json, data_files: [...]}``): named by their files.
_FILE_BUILDERS = ("json", "csv", "parquet", "arrow", "text")


def _parts(source: Any) -> list[Any]:
    """The sources of a data key: one path or hub id, one source mapping, or a mixture (a list)."""
    return list(source) if isinstance(source, list) else [source]


def _files(data_files: Any) -> list[str]:
    if isinstance(data_files, dict):
        return [f for value in data_files.values() for f in _files(value)]
    return [str(f) for f in data_files] if isinstance(data_files, list) else [str(data_files)]


def source_names(source: Any) -> list[str]:
    """How a data key's sources are named in the card's ``datasets``: hub ids as they are, local files
    and folders by their name (a full path would publish the trainer's directory layout and mean nothing
    to a reader); an in-memory dataset has no name to give."""
    names: list[str] = []
    for part in _parts(source):
        if getattr(part, "dataset", None) is not None:
            continue
        path = str(getattr(part, "path", part))
        data_files = getattr(part, "data_files", None)
        if path in _FILE_BUILDERS and data_files:
            names += [Path(f).name for f in _files(data_files)]
        else:
            names.append(Path(path).name if _is_local(path) else path)
    return names


def describe_source(source: Any) -> str:
    """A data key for the card's body: each source's name with its subset, split and mixture share."""
    texts = []
    for part in _parts(source):
        in_memory = getattr(part, "dataset", None) is not None
        name = str(getattr(part, "path", part)) if in_memory else ", ".join(source_names(part))
        extras = [f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                  for key in ("subset", "split", "weight", "fraction")
                  if not isinstance(part, str) and (value := getattr(part, key, None)) is not None]
        texts.append(f"`{name}`" + (f" ({', '.join(extras)})" if extras else ""))
    return " + ".join(texts)


def stage_algorithm(stage: StageConfig) -> tuple[str, list[str]]:
    """(the stage's algorithm as a reader names it, its tags). The default algorithm, ``offline``, is
    named by its losses: an SFT stage is tagged ``sft``, not ``offline``."""
    losses = [loss.name for loss in stage.losses]
    weighted = ", ".join(f"{loss.name} (weight {loss.weight:g})" for loss in stage.losses)
    name = stage.algorithm.name
    text = name + (f" (losses: {weighted})" if weighted else "")
    tags = losses if name == "offline" and losses else [name, *losses]
    return text, tags


def redact(value: Any) -> Any:
    """``value`` with every credential-like key's value replaced (the config's own secret-key rule)."""
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and SECRET_KEYS.search(k.lower()) and v else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def publishable(value: Any) -> Any:
    """``redact(value)`` with absolute local paths cut to their last component: a published card must
    not show the trainer's directory layout (``/home/alice/data/train.jsonl`` -> ``train.jsonl``)."""
    value = redact(value)
    if isinstance(value, dict):
        return {k: publishable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [publishable(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")):
        return Path(value).name or value
    return value


def scrub_environment_secrets(text: str) -> str:
    """Replace the value of any secret-named environment variable (``HF_TOKEN``, ``WANDB_API_KEY``, ...)
    found in ``text``: the card is published, and a value can reach it through a plugin option."""
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and len(value) >= 8 and value in text:
            text = text.replace(value, REDACTED)
    return text


def _earlier_metrics(config: RunConfig, index: int) -> dict[str, dict[str, float]]:
    """Final metrics of the stages before ``index``, read from their final models (when present)."""
    found: dict[str, dict[str, float]] = {}
    for stage in config.stages[:index]:
        state = Path(config.output_dir) / stage.name / "final" / "trainer_state.json"
        try:
            found[stage.name] = json.loads(state.read_text()).get("metrics", {})
        except (OSError, ValueError):
            continue  # a card without an earlier stage's numbers beats no card at all
    return found


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()) if isinstance(v, int | float))
    return f"| metric | value |\n|---|---|\n{rows}\n" if rows else "(none logged)\n"


def model_card_text(config: RunConfig, stage: Any, metrics: dict[str, float], load_from: str,
                    adapter: bool = False) -> str:
    """The card of the final model of ``stage`` (a prepared stage), which ``load_from`` names."""
    trained = config.stages[: stage.index + 1]
    tags = ["aligner"]
    datasets: list[str] = []
    for stage_config in trained:
        tags += [t for t in stage_algorithm(stage_config)[1] if t not in tags]
        for name in source_names(stage_config.data.train):
            if name not in datasets:
                datasets.append(name)
    metadata: dict[str, Any] = {}
    base = base_model_id(config)
    if base:
        metadata["base_model"] = base
    if datasets:  # in-memory data has no name to give
        metadata["datasets"] = datasets
    metadata["tags"] = tags
    # An adapter is loaded through peft: the Hub shows peft's loading snippet for library_name peft.
    metadata["library_name"] = "peft" if adapter else "transformers"

    if config.model.path is None:
        base_text = f"built-in tiny Llama ({config.model.tiny.model_dump(exclude_none=True)}), random initial weights"
    else:
        base_text = f"`{base}`" if base else f"`{Path(config.model.path).name}` (a local directory)"
    data = stage.config.data
    stage_rows = "\n".join(
        f"| {i + 1} | {s.name} | {stage_algorithm(s)[0]} | {s.peft.name} | {describe_source(s.data.train)} |"
        for i, s in enumerate(trained))
    earlier = _earlier_metrics(config, stage.index)
    earlier_text = "".join(f"\n### Stage `{name}`\n\n{_metrics_table(values)}" for name, values in earlier.items())
    run_config = yaml.safe_dump(publishable(config.model_dump(mode="json")), sort_keys=False)
    loader = "from peft import AutoPeftModelForCausalLM as Model" if adapter else \
        "from transformers import AutoModelForCausalLM as Model"
    title = f"{Path(config.output_dir).name} / {stage.name}"
    # peft loads an adapter onto the base named in adapter_config.json: elsewhere that only works for a hub id.
    adapter_note = "" if not adapter or base else (
        "\nThe adapter's base model is not on the Hub (it was built in memory or read from a local directory), "
        "so this loads only where the base named in `adapter_config.json` exists (a model built in memory exists "
        "nowhere); `aligner export RUN_DIR --merge` writes a merged model that loads anywhere.\n")
    text = f"""---
{yaml.safe_dump(metadata, sort_keys=False)}---
# {title}

Trained with aligner {aligner_version()} (Python distribution `aligner-trainer`), a plugin-based
alignment trainer; this is the final model of stage `{stage.name}`, stage {stage.index + 1} of {len(config.stages)}.

- **Algorithm:** {stage_algorithm(stage.config)[0]}
- **Base model:** {base_text}
- **Reference policy:** {stage.reference_name}
- **PEFT:** {stage.peft.name}{" (these files are the adapter, not a whole model)" if adapter else ""}
- **Training data:** {describe_source(data.train)} ({stage.data_format}, template `{data.template}`, max length {data.max_length})
- **Evaluation data:** {describe_source(data.eval) if data.eval else 'none'}

## Stages

| # | stage | algorithm | PEFT | training data |
|---|---|---|---|---|
{stage_rows}

## Final metrics

Stage `{stage.name}` (`train/*`: the last training step; `eval/*`: held out, after training):

{_metrics_table(metrics)}{earlier_text}
## Configuration

The run's resolved config (defaults filled in); `aligner train config.yaml` reruns it once its
data paths exist on your machine.

```yaml
{run_config}```

## Usage

```python
{loader}

model = Model.from_pretrained("{load_from}")
```
{adapter_note}"""
    return scrub_environment_secrets(text)


def write_model_card(directory: Path, config: RunConfig, stage: Any, metrics: dict[str, float]) -> None:
    """Write the card of the final model being saved into ``directory`` (a temporary directory that is
    renamed to ``OUTPUT_DIR/STAGE/final`` once complete, hence the load path is that final name)."""
    final = Path(config.output_dir) / stage.name / "final"
    adapter = (directory / "adapter_config.json").is_file()
    (directory / "README.md").write_text(model_card_text(config, stage, metrics, final.as_posix(), adapter),
                                    encoding="utf-8")
