"""What ``aligner revise CONFIG`` reads.

::

    # aligner revise configs/constitutional/revise.yaml
    output: runs/constitutional/revisions.jsonl
    model: {path: ../../runs/constitutional_base/sft/final}
    tokenizer: builtin
    prompts: ../../aligner/quickstart/data/prompts_train.jsonl
    constitution: ../../aligner/assets/constitution.yaml
    rounds: 2

Relative ``prompts``, ``constitution`` and ``model.path`` follow the config file, as in ``aligner label``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from aligner.commands.prompt_sampling import PromptSamplingConfig, load_sampling_config
from aligner.config import resolve_config_path
from aligner.constitutional.constitution import BUNDLED


class ReviseConfig(PromptSamplingConfig):
    """The model that answers, critiques and revises; the prompts; the constitution; sampling settings."""

    output: str = Field(description="the SFT JSONL to write (appended to; resumable)")
    template: str = Field("plain", description="the data template the answers (and the SFT rows) use")
    max_prompt_length: int = Field(256, gt=0, description="answer prompts are cut from the left to this")
    max_new_tokens: int = Field(32, gt=0, description="per answer, critique and revision")
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    constitution: str = Field(str(BUNDLED), description="YAML with 'principles' (name, critique, revision)")
    rounds: int = Field(1, ge=1, description="critique-and-revision rounds, each with a principle drawn at random")
    critique_template: str = Field("critique", description="few-shot critique prompt: a shipped name or a YAML path")
    revision_template: str = Field("revision", description="few-shot revision prompt: a shipped name or a YAML path")
    reviser: str | None = Field(None, description=(
        "'module:function' (prompt, answer, principle) -> (critique, revision) used instead of the model for "
        "critiques and revisions (a rule stand-in for models too small to critique); default: the model"))
    max_context_length: int = Field(448, gt=0, description="critique/revision prompts are cut from the left to this")


def load_revise_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> ReviseConfig:
    """Validate a revise config (YAML path or dict); relative paths follow the file."""
    config, base, origin = load_sampling_config(ReviseConfig, source, overrides)
    config.constitution = resolve_config_path(config.constitution, base, "constitution", origin)
    for key in ("critique_template", "revision_template"):
        value = getattr(config, key)
        if value.endswith((".yaml", ".yml")):
            setattr(config, key, resolve_config_path(value, base, key, origin))
    return config
