"""What ``aligner label`` and ``aligner revise`` share: a config naming a model, prompt rows and how to
sample, and loading all of it for sampling.

Each command's config extends ``PromptSamplingConfig`` with its own keys (the judge; the constitution);
both write a JSONL file that a rerun appends to (``aligner.commands.jsonl_output``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, ValidationError

from aligner.config import ModelConfig, Strict, read_config_source, resolve_config_path, validation_error
from aligner.config.origin import ConfigOrigin


class PromptSamplingConfig(Strict):
    """The keys every prompt-sampling command reads: where to write, the model, the prompts, sampling."""

    output: str = Field(description="the JSONL to write (appended to; resumable)")
    model: ModelConfig
    tokenizer: str | None = Field(None, description="'builtin', a directory; default: the model's")
    prompts: str = Field(description="prompt-only rows (JSONL, or anything aligner reads)")
    split: str = "train"
    max_prompts: int | None = Field(None, gt=0)
    template: str = Field("plain", description="the data template prompts are rendered with")
    max_prompt_length: int = Field(256, gt=0, description="prompts are cut from the left to this")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, gt=0, description="prompts per chunk (written together)")
    seed: int = 0


C = TypeVar("C", bound=PromptSamplingConfig)


def load_sampling_config(config_class: type[C], source: str | Path | dict,
                         overrides: list[str] | tuple[str, ...] = ()) -> tuple[C, Path, ConfigOrigin]:
    """Validate a label or revise config (YAML path or dict) with located errors; relative ``prompts``
    and local ``model.path`` follow the config file. Returns the config, the folder paths follow and
    where each key was written (for the command's own path errors)."""
    data, base, origin = read_config_source(source, overrides)
    try:
        config = config_class.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, origin, root=config_class) from None
    config.prompts = resolve_config_path(config.prompts, base, "prompts", origin)
    if config.model.path is not None and config.model.path.startswith((".", "/", "~")):
        config.model.path = resolve_config_path(config.model.path, base, "model.path", origin)
    return config, base, origin


def load_for_sampling(config: PromptSamplingConfig, rows: list[Any]) -> tuple[Any, Any, Any, Any]:
    """What ``label`` and ``revise`` sample with: the tokenizer, the template, ``rows`` tokenized as
    prompts, and the model on its device (seeded, torch threads set as for a training run)."""
    from accelerate.utils import set_seed

    from aligner.data.templates import load_template
    from aligner.data.tokenize import tokenize_rows
    from aligner.modeling.loading import load_model, load_tokenizer, pick_device
    from aligner.training.threads import apply_threads

    tokenizer = load_tokenizer(config)  # reads .tokenizer and .model like a RunConfig
    template = load_template(config.template, tokenizer, chat_data=isinstance(rows[0].data["prompt"], list))
    tokenized = tokenize_rows(rows, "prompt", tokenizer, template, max_length=config.max_prompt_length + 1,
                              max_prompt_length=config.max_prompt_length)
    set_seed(config.seed)
    apply_threads("auto")  # torch's own default oversubscribes shared CPUs
    model = load_model(config.model, tokenizer)
    model.to(pick_device())
    return tokenizer, template, tokenized, model
