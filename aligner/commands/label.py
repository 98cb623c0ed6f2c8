"""Offline RLAIF: ``aligner label CONFIG`` turns prompts into a preference dataset with a judge.

For every prompt, ``num_completions`` answers are sampled from a model; the judge scores each one
(pointwise ``score``) or compares every pair (``compare``, when ``pairwise: true``); the best answer
becomes ``chosen`` and the worst ``rejected``. Each row records its provenance (prompt index, judge,
scores, sampling settings) so a dataset can be audited. Ties (no preference) are written to
``<output>.ties.jsonl`` instead.

Rows are appended and flushed as they are labelled, and a rerun skips prompts already present in the
output (or the ties file): an interrupted or failed run resumes where it stopped, losing nothing.

A label config is YAML::

    # aligner label configs/label_quickstart.yaml
    output: runs/label/preferences.jsonl
    model: {path: runs/ppo_rule/sft/final}
    prompts: ../aligner/quickstart/data/prompts_train.jsonl
    judge: {name: rule, callable: "aligner.quickstart.task:behaviour_score"}
    num_completions: 4
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from aligner.commands.jsonl_output import append_lines, check_output, done_indices, drop_torn_line
from aligner.commands.prompt_sampling import PromptSamplingConfig, load_for_sampling, load_sampling_config
from aligner.errors import ConfigError, os_error

log = logging.getLogger("aligner")


class LabelConfig(PromptSamplingConfig):
    """What ``aligner label`` samples from, how, and which judge decides."""

    output: str = Field(description="the preference JSONL to write (appended to; resumable)")
    judge: dict[str, Any]
    pairwise: bool = Field(False, description="compare every pair with the judge's 'compare' (needs one)")
    min_margin: float = Field(1e-6, ge=0, description="best and worst scores closer than this are a tie")
    num_completions: int = Field(4, ge=2)
    batch_size: int = Field(16, gt=0, description="prompts per chunk (each sampled num_completions times)")

    @field_validator("judge")
    @classmethod
    def _judge_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Built once here (judges load their models lazily), so a bad judge option is reported with its
        # key path, file and line before anything is sampled.
        from aligner.online.rewards import build_judge

        build_judge(value)
        return value


def load_label_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> LabelConfig:
    """Validate a label config (YAML path or dict); relative ``prompts``/``model.path`` follow the file."""
    config, _, _ = load_sampling_config(LabelConfig, source, overrides)
    return config


def preference_of(scores: list[float], min_margin: float = 0.0) -> tuple[int, int] | None:
    """(best, worst) indices by score, or ``None`` when they differ by ``min_margin`` or less (a tie)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[best] - scores[worst] <= min_margin else (best, worst)


def pairwise_wins(judge: Any, prompt: str, completions: list[str]) -> list[float]:
    """Each completion's summed probability of beating every other one (judge ``compare``)."""
    pairs = [(i, j) for i in range(len(completions)) for j in range(i + 1, len(completions))]
    probabilities = judge.compare([prompt] * len(pairs), [completions[i] for i, _ in pairs],
                                  [completions[j] for _, j in pairs])
    wins = [0.0] * len(completions)
    for (i, j), p in zip(pairs, probabilities, strict=True):
        wins[i] += p
        wins[j] += 1.0 - p
    return wins


def label(config: LabelConfig) -> dict[str, int]:
    """Label every not-yet-labelled prompt; return counts (``labelled``, ``ties``, ``skipped``)."""
    from aligner.data.loading import load_validated
    from aligner.judges import give_tokenizer
    from aligner.online.rewards import build_judge
    from aligner.online.sampler import sample

    try:
        judge = build_judge(config.judge)
    except ValueError as exc:
        raise ConfigError(f"invalid 'judge': {exc}") from None
    if config.pairwise and judge.compare is None:  # the protocol's default: the judge only scores
        raise ConfigError(f"judge '{judge.name}' has no pairwise 'compare'; set 'pairwise: false'")
    _, rows = load_validated(config.prompts, "prompt", config.split, config.max_prompts)
    output = Path(config.output)
    ties_path = output.with_name(output.name + ".ties.jsonl")
    check_output(output, ties_path)
    done = done_indices(output, ties_path)
    for path in (output, ties_path):
        drop_torn_line(path)
    todo = [i for i in range(len(rows)) if i not in done]
    counts = {"labelled": 0, "ties": 0, "skipped": len(rows) - len(todo)}
    if counts["skipped"]:
        log.info("resuming: %d of %d prompts already labelled in %s", counts["skipped"], len(rows), output)
    if not todo:
        return counts

    tokenizer, template, tokenized, model = load_for_sampling(config, [rows[i] for i in todo])
    give_tokenizer(judge, tokenizer)  # the sampling model's tokenizer, for a judge that asks (set_tokenizer)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, output.parent, "could not create the directory of 'output'") from exc
    for path in (output, ties_path):  # created (or found writable) before the first prompt is sampled
        append_lines(path, [])
    k = config.num_completions
    provenance_base = {"judge": judge.name, "model": config.model.path or "tiny", "num_completions": k,
                       "temperature": config.temperature, "top_p": config.top_p,
                       "comparison": "pairwise" if config.pairwise else "pointwise"}
    for begin in range(0, len(tokenized.examples), config.batch_size):
        chunk = tokenized.examples[begin:begin + config.batch_size]
        # Each prompt prefilled once for its k answers (prompt-major, as the loop below reads them).
        sampled = sample(model, tokenizer, [e["prompt_ids"] for e in chunk], samples_per_prompt=k,
                         max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                         batch_size=config.batch_size * k).completions
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in sampled]
        if not config.pairwise:
            flat = judge.score([e["prompt"] for e in chunk for _ in range(k)], texts)
        labelled, tied = [], []
        for n, example in enumerate(chunk):
            completions = texts[n * k:(n + 1) * k]
            scores = (pairwise_wins(judge, example["prompt"], completions) if config.pairwise
                      else [float(s) for s in flat[n * k:(n + 1) * k]])
            index = todo[example["row_id"]]
            provenance = {**provenance_base, "prompt_index": index, "scores": scores, "completions": completions}
            choice = preference_of(scores, config.min_margin)
            if choice is None:
                tied.append(json.dumps({"prompt": rows[index].data["prompt"], "provenance": provenance}) + "\n")
                continue
            best, worst = choice
            record = {"prompt": rows[index].data["prompt"], "chosen": completions[best],
                      "rejected": completions[worst], "provenance": provenance}
            labelled.append(json.dumps(record) + "\n")
        # Written per chunk, so a crash (or a full disk) loses at most the chunk being labelled.
        append_lines(output, labelled)
        counts["labelled"] += len(labelled)
        append_lines(ties_path, tied)
        counts["ties"] += len(tied)
        log.info("labelled %d / %d prompts", begin + len(chunk), len(tokenized.examples))
    return counts
