"""``aligner revise CONFIG``: Constitutional AI's critique-and-revision step, as an SFT dataset.

For every prompt the model answers; then, for each of ``rounds`` rounds, a principle is drawn from
the constitution (seeded by the run's seed, the prompt's index and the round, so a resumed run draws
the same principles), the model critiques its latest answer against the principle's critique request
and rewrites it following the revision request, each prompted with few-shot examples. The output is
SFT data for ``aligner train``: one row per prompt, ``{prompt, completion: final revision}``, with the
whole chain (answer, then each round's principle, critique and revision) in ``chain`` and where the
row came from in ``provenance``.

Like ``aligner label``, rows are appended per chunk of prompts, and a rerun skips prompts already in
the output and cuts a last line torn by a crash: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from aligner.commands.jsonl_output import append_lines, check_output, done_indices, drop_torn_line
from aligner.commands.prompt_sampling import load_for_sampling
from aligner.constitutional.config import ReviseConfig
from aligner.constitutional.constitution import Principle, load_constitution
from aligner.constitutional.templates import critique_prompt, load_few_shot_template, revision_prompt
from aligner.errors import ConfigError, os_error

log = logging.getLogger("aligner")


def draw_principle(principles: list[Principle], seed: int, prompt_index: int, round_index: int) -> Principle:
    """The principle of one round of one prompt: a function of the seed, the prompt and the round only,
    so it does not depend on chunking or on where an interrupted run resumed."""
    return principles[random.Random(f"{seed}/{prompt_index}/{round_index}").randrange(len(principles))]


def _checked(result: Any, name: str | None) -> tuple[str, str]:
    """A reviser's (critique, revision), or a ``ConfigError`` naming the reviser that returned something else."""
    if not (isinstance(result, tuple | list) and len(result) == 2 and all(isinstance(x, str) for x in result)):
        raise ConfigError(f"reviser '{name}' must return (critique, revision), two strings; got {result!r:.80}")
    return result[0], result[1]


def final_text(answer: str, revisions: list[str]) -> str:
    """The last non-empty text of the chain: an empty revision (a model that stopped at once) keeps
    the text it was asked to revise rather than teaching the SFT stage to answer nothing."""
    return next((text for text in reversed([answer, *revisions]) if text), "")


class _Generator:
    """Texts sampled from the model for prompt texts, batched, with prompts cut from the left."""

    def __init__(self, model: Any, tokenizer: Any, template: Any, config: ReviseConfig):
        self.model, self.tokenizer, self.template, self.config = model, tokenizer, template, config

    def __call__(self, texts: list[str], max_length: int) -> list[str]:
        from aligner.data.sources import Row
        from aligner.data.tokenize import tokenize_rows

        rows = [Row({"prompt": text}, f"generated prompt {i}") for i, text in enumerate(texts)]
        examples = tokenize_rows(rows, "prompt", self.tokenizer, self.template, max_length=max_length + 1,
                                 max_prompt_length=max_length).examples
        # Prompt-only rows are never dropped; if one were, critiques would pair with the wrong answers.
        if [e["row_id"] for e in examples] != list(range(len(texts))):
            raise RuntimeError("a critique or revision prompt was dropped while tokenizing")
        return self.complete([e["prompt_ids"] for e in examples])

    def complete(self, prompt_ids: list[list[int]]) -> list[str]:
        """One sampled completion per tokenized prompt, as text."""
        from aligner.online.sampler import sample

        c = self.config
        completions = sample(self.model, self.tokenizer, prompt_ids, samples_per_prompt=1,
                             max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                             batch_size=c.batch_size).completions
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]


def revise(config: ReviseConfig) -> dict[str, int]:
    """Answer, critique and revise every prompt not yet in the output; return ``revised``/``skipped`` counts."""
    from aligner.data.loading import load_validated
    from aligner.judges.rule import import_callable
    from aligner.reporting.metrics import Progress

    # Everything a user can get wrong is checked before the model loads.
    principles = load_constitution(config.constitution)
    critique_template = load_few_shot_template(config.critique_template)
    revision_template = load_few_shot_template(config.revision_template)
    reviser = import_callable(config.reviser, "reviser") if config.reviser else None
    _, rows = load_validated(config.prompts, "prompt", config.split, config.max_prompts)
    output = Path(config.output)
    check_output(output, output)
    done = done_indices(output)
    drop_torn_line(output)
    todo = [i for i in range(len(rows)) if i not in done]
    counts = {"revised": 0, "skipped": len(rows) - len(todo)}
    if counts["skipped"]:
        log.info("resuming: %d of %d prompts already revised in %s", counts["skipped"], len(rows), output)
    if not todo:
        return counts

    tokenizer, template, tokenized, model = load_for_sampling(config, [rows[i] for i in todo])
    generate = _Generator(model, tokenizer, template, config)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, output.parent, "could not create the directory of 'output'") from exc
    append_lines(output, [])  # created (or found writable) before the first prompt is sampled
    provenance_base = {"model": config.model.path or "tiny", "reviser": config.reviser or "model",
                       "constitution": config.constitution, "rounds": config.rounds, "seed": config.seed,
                       "temperature": config.temperature, "top_p": config.top_p}
    progress = Progress("revise", len(tokenized.examples))
    try:
        for begin in range(0, len(tokenized.examples), config.batch_size):
            chunk = tokenized.examples[begin:begin + config.batch_size]
            lines = _revise_chunk(chunk, [todo[e["row_id"]] for e in chunk], rows, principles, generate,
                                  critique_template, revision_template, reviser, config, provenance_base)
            # Written per chunk, so a crash (or a full disk) loses at most the chunk being revised.
            append_lines(output, lines)
            counts["revised"] += len(lines)
            progress.update(begin + len(chunk))
    finally:
        progress.close()
    return counts


def _revise_chunk(chunk: list[dict], indices: list[int], rows: list[Any], principles: list[Principle],
                  generate: _Generator, critique_template: Any, revision_template: Any, reviser: Any,
                  config: ReviseConfig, provenance_base: dict) -> list[str]:
    """The JSONL lines of one chunk: answers, then ``rounds`` batched critique and revision passes."""
    questions = [e["prompt"] for e in chunk]
    answers = generate.complete([e["prompt_ids"] for e in chunk])
    current = list(answers)
    chains: list[list[dict[str, str]]] = [[] for _ in chunk]
    for round_index in range(config.rounds):
        picked = [draw_principle(principles, config.seed, index, round_index) for index in indices]
        if reviser is not None:
            pairs = [_checked(reviser(q, text, p), config.reviser)
                     for q, text, p in zip(questions, current, picked, strict=True)]
            critiques, revisions = [c for c, _ in pairs], [r for _, r in pairs]
        else:
            critiques = generate([critique_prompt(critique_template, q, text, p)
                                  for q, text, p in zip(questions, current, picked, strict=True)],
                                 config.max_context_length)
            revisions = generate([revision_prompt(revision_template, q, text, p, c)
                                  for q, text, p, c in zip(questions, current, picked, critiques, strict=True)],
                                 config.max_context_length)
        for n, principle in enumerate(picked):
            chains[n].append({"principle": principle.name, "critique_request": principle.critique,
                              "critique": critiques[n], "revision_request": principle.revision,
                              "revision": revisions[n]})
            # An empty revision is kept in the chain, but the next round revises the last real text.
            current[n] = revisions[n] or current[n]
    lines = []
    for n, index in enumerate(indices):
        record = {"prompt": rows[index].data["prompt"],
                  "completion": final_text(answers[n], [r["revision"] for r in chains[n]]),
                  "chain": {"answer": answers[n], "rounds": chains[n]},
                  "provenance": {**provenance_base, "prompt_index": index}}
        lines.append(json.dumps(record) + "\n")
    return lines

