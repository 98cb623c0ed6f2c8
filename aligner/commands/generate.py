"""``aligner generate RUN_DIR_OR_MODEL``: sample answers from a run's model, switching named adapters.

The base model loads once; each adapter asked for (``--adapter NAME``, repeatable; by default every
adapter the model holds) is switched on in turn with peft's ``set_adapter`` and sampled with the one
sampler (``aligner.online.sampler.sample``), so the answers differ only by the adapter. ``--no-adapter``
samples the base with every adapter switched off too. Prompts are rendered with the run's template and
tokenizer, exactly as its training and evaluation rendered them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligner.commands.export import adapter_dirs, base_model_of, choose_adapter, final_dir
from aligner.errors import ConfigError, suggest

BASE = None  # the "adapter" of a sample drawn with every adapter off (JSON: null)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand to the CLI."""
    gen = sub.add_parser("generate", help="sample answers from a run's model (switching named adapters)")
    gen.add_argument("source", help="a run's output directory, a stage's final/ directory, or a model directory")
    gen.add_argument("--adapter", action="append", default=None, metavar="NAME",
                     help="sample with this adapter (repeatable; default: every adapter of the model)")
    gen.add_argument("--no-adapter", action="store_true", help="also sample the base model with every adapter off")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", metavar="FILE", help="prompts: a .txt file (one per line) or rows with a "
                                                           "'prompt' field (JSONL, or anything aligner reads)")
    gen.add_argument("--stage", default=None, help="the stage whose model to use (default: the run's last)")
    gen.add_argument("--base", default=None, help="base model directory (default: the adapter's "
                                                  "base_model_name_or_path)")
    gen.add_argument("--template", default=None, help="prompt template (default: the stage's data.template)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print JSON")
    gen.set_defaults(handler=run)


@dataclass
class ModelSource:
    """Where the model is, and the stage settings (template, prompt length) that rendered its prompts."""

    directory: Path
    template: str = "auto"
    max_prompt_length: int = 256


def _stage_settings(run_dir: Path, stage: str) -> dict[str, Any]:
    """A stage's ``data`` settings from the run's resolved ``config.yaml`` (read as YAML: only the
    template and prompt length are needed, and the data files it names may be gone by now)."""
    import yaml

    from aligner.data.loading import read_text

    config = yaml.safe_load(read_text(run_dir / "config.yaml")) or {}
    for entry in config.get("stages", []) if isinstance(config, dict) else []:
        if isinstance(entry, dict) and entry.get("name") == stage:
            return entry.get("data") or {}
    return {}


def resolve_source(path: str | Path, stage: str | None = None) -> ModelSource:
    """The model directory ``path`` means (a run, a stage's final/, a model) and its run's prompt settings."""
    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise ConfigError(f"{path}: {what} (generate takes a run's output directory, a final/ directory or a model)")
    is_model = (path / "config.json").is_file() or bool(adapter_dirs(path))
    directory = path if is_model else final_dir(path, stage)
    if not directory.is_dir():  # only an unknown --stage gets here (final_dir checked the rest)
        stages = sorted(p.name for p in path.iterdir() if (p / "final").is_dir())
        raise ConfigError(f"--stage {stage}: {path} has no final model of that stage{suggest(str(stage), stages)} "
                          f"(stages with one: {', '.join(stages) or 'none'})")
    run_dir, stage_name = directory.parent.parent, directory.parent.name
    if not (run_dir / "config.yaml").is_file():
        return ModelSource(directory)
    data = _stage_settings(run_dir, stage_name)
    return ModelSource(directory, str(data.get("template", "auto")), int(data.get("max_prompt_length", 256)))


def read_prompts(texts: list[str] | None, file: str | None) -> list[Any]:
    """The prompts from ``--prompt`` or ``--prompts FILE`` (a located error for a bad file)."""
    if texts is not None:
        return list(texts)
    path = Path(file)
    if path.suffix == ".txt":
        from aligner.data.loading import read_text

        prompts = [line for line in read_text(path).splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompts {path}: no prompts (one per line)")
        return prompts
    from aligner.data.loading import load_validated

    _, rows = load_validated(str(path), "prompt")
    return [row.data["prompt"] for row in rows]


def _load(source: ModelSource, names: list[str | None], tokenizer: Any, base: str | None) -> Any:
    """The model, with the adapters in ``names`` loaded onto one base (``None`` needs none)."""
    from aligner.config import ModelConfig
    from aligner.modeling.loading import load_causal_lm

    adapters = adapter_dirs(source.directory)
    wanted = [n for n in names if n is not None]
    if not wanted:
        if adapters and base is None:
            base = base_model_of(source.directory, next(iter(adapters.values())))
        return load_causal_lm(ModelConfig(path=base or str(source.directory)), tokenizer)
    from peft import PeftModel

    first, *rest = wanted
    model = load_causal_lm(ModelConfig(path=base_model_of(source.directory, adapters[first], base)), tokenizer)
    model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
    for name in rest:
        model.load_adapter(adapters[name], adapter_name=name)
    return model


def choose(source: ModelSource, requested: list[str] | None, with_base: bool) -> list[str | None]:
    """The adapters to sample with, in order (``None``: the base, adapters off); checked before loading."""
    adapters = adapter_dirs(source.directory)
    if not adapters:
        if requested:
            raise ConfigError(f"--adapter {requested[0]}: {source.directory} is a full model, not adapters "
                              "(named adapters come from stages with peft: {name: lora, adapter_name: ...})")
        return [BASE]
    names: list[str | None] = [choose_adapter(source.directory, adapters, n) for n in requested] if requested \
        else list(adapters)
    return ([BASE] if with_base else []) + list(dict.fromkeys(names))


def generate(source: ModelSource, prompts: list[Any], adapters: list[str | None], *, base: str | None = None,
             template: str | None = None, max_new_tokens: int = 64, num_samples: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
    """Sample ``num_samples`` answers per prompt with each adapter in turn (``None``: the base alone).

    Every adapter samples with the same seed, so they are compared on the same random draws.
    """
    import contextlib
    from types import SimpleNamespace

    from aligner.config import ModelConfig
    from aligner.data.sources import Row
    from aligner.data.templates import load_template
    from aligner.data.tokenize import tokenize_rows
    from aligner.modeling.loading import load_tokenizer, pick_device
    from aligner.online.sampler import decode, sample

    # The run saved its tokenizer (pad token and all) next to the model: load it as the run did.
    tokenizer = load_tokenizer(SimpleNamespace(tokenizer=str(source.directory),
                                               model=ModelConfig(path=str(source.directory))))
    rendering = load_template(template or source.template, tokenizer, chat_data=isinstance(prompts[0], list))
    rows = [Row({"prompt": p}, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    tokenized = tokenize_rows(rows, "prompt", tokenizer, rendering, max_length=source.max_prompt_length + 1,
                              max_prompt_length=source.max_prompt_length)
    model = _load(source, adapters, tokenizer, base)
    model.to(pick_device())
    results = []
    for name in adapters:
        if name is not None:
            model.set_adapter(name)
        off = model.disable_adapter() if name is None and hasattr(model, "disable_adapter") \
            else contextlib.nullcontext()
        with off:
            sampled = sample(model, tokenizer, [e["prompt_ids"] for e in tokenized.examples],
                             samples_per_prompt=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, batch_size=16 * num_samples, seed=seed).completions
        texts = decode(tokenizer, sampled)
        for n, example in enumerate(tokenized.examples):
            for text in texts[n * num_samples:(n + 1) * num_samples]:
                results.append({"adapter": name, "prompt": prompts[example["row_id"]], "completion": text.strip()})
    return results


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")


def run(args: argparse.Namespace) -> int:
    """Handle ``aligner generate ...``."""
    _check_numbers(args)
    source = resolve_source(args.source, args.stage)
    adapters = choose(source, args.adapter, args.no_adapter)  # before the slow part: a wrong name fails fast
    prompts = read_prompts(args.prompt, args.prompts)
    samples = generate(source, prompts, adapters, base=args.base, template=args.template,
                       max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.json:
        print(json.dumps({"model": str(source.directory), "samples": samples}, indent=2))
        return 0
    shown: object = object()  # the adapter whose heading was printed last
    for sample in samples:
        if adapters != [BASE] and sample["adapter"] != shown:
            print(f"=== adapter: {sample['adapter'] or '(none: base model)'}")
            shown = sample["adapter"]
        print(f"> {sample['prompt']}\n{sample['completion']}\n")
    return 0
