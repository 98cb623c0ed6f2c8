"""Rows -> token ids, with an explicit truncation policy.

Policy: the prompt is cut from the left to ``max_prompt_length`` tokens (the end of a prompt, next
to the answer, matters most; a leading BOS token is kept), then each completion is cut from the
right to fit ``max_length``. A row left with no completion token (empty, or pushed out by a long
prompt) is dropped and counted by reason, never trained on; so is a preference pair whose chosen and
rejected completions are identical (its DPO-style gradient is exactly zero: it only dilutes the batch),
whether they were identical in the data or became so by truncation. Prompt-only data (online
methods) keeps prompts short enough that prompt + ``max_new_tokens`` generated tokens fit
``max_length``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aligner.data.loading import Row
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED

log = logging.getLogger("aligner")

COMPLETION_FIELDS = {SFT: ("completion",), PREFERENCE: ("chosen", "rejected"), UNPAIRED: ("completion",), PROMPT_ONLY: ()}


@dataclass
class TokenizedData:
    """Token ids of every kept row, plus counts of what truncation did."""

    data_format: str
    examples: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)
    truncated_rows: int = 0
    # Where each dropped row came from and why, for ``aligner data check`` and the drop-limit report.
    dropped_rows: list[tuple[str, str]] = field(default_factory=list)
    # Tokens per input row before truncation (prompt + longest completion), kept or not.
    full_lengths: list[int] = field(default_factory=list)

    def drop(self, row: Row, reason: str) -> None:
        """Count ``row`` as dropped for ``reason``."""
        self.dropped[reason] += 1
        self.dropped_rows.append((row.location, reason))

    def lengths(self, shared_prompt: bool = False) -> list[int]:
        """Tokens per example as batched, for length grouping: prompt + longest completion.

        With ``shared_prompt`` a preference pair is one row of prompt + chosen + rejected
        (``aligner.shared_prompt``), so that total is what grouping must even out.
        """
        fields = COMPLETION_FIELDS[self.data_format]
        if shared_prompt and self.data_format == PREFERENCE:
            return [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in self.examples]
        return [len(e["prompt_ids"]) + max((len(e[f + "_ids"]) for f in fields), default=0) for e in self.examples]


def prompt_for_judge(prompt: str | list[dict[str, str]]) -> str:
    """The plain text a judge sees as the prompt: the string, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def prompt_token_limit(data: Any, data_format: str, generation: int, stage: str, index: int) -> int:
    """The most prompt tokens a stage's rows keep: ``data.max_prompt_length``, and for prompt-only
    data (online methods) no more than leaves room for ``generation`` new tokens within
    ``data.max_length``, so prompt + completion never exceed it. A ConfigError if no room is left."""
    if data_format != PROMPT_ONLY or generation <= 0:
        return data.max_prompt_length
    room = data.max_length - generation
    if room < 1:
        from aligner.errors import ConfigError

        raise ConfigError(f"stage '{stage}': max_new_tokens {generation} leaves no room for a prompt within "
                          f"'stages[{index}].data.max_length' ({data.max_length}): raise max_length above "
                          f"{generation} or generate fewer tokens")
    if room < data.max_prompt_length:
        log.info("stage '%s': prompts cut to %d tokens so that prompt + %d generated tokens fit max_length %d",
                 stage, room, generation, data.max_length)
    return min(data.max_prompt_length, room)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_rows(rows: list[Row], data_format: str, tokenizer: Any, template: Any,
                  max_length: int, max_prompt_length: int) -> TokenizedData:
    """Tokenize validated rows; drop (and count) rows with no completion token left."""
    data = TokenizedData(data_format, [])
    # Prepend BOS only for tokenizers that add it themselves (Llama-style); chat templates that
    # already write it, and tokenizers without one (Qwen, GPT-2), get none.
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    for row_id, row in enumerate(rows):
        prompt_ids = _encode(tokenizer, template.prompt_text(row.data["prompt"]))
        if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [bos, *prompt_ids]
        completions = {f: _encode(tokenizer, template.completion_text(row.data[f])) for f in COMPLETION_FIELDS[data_format]}
        data.full_lengths.append(len(prompt_ids) + max((len(ids) for ids in completions.values()), default=0))
        empty = [f for f, ids in completions.items() if not row_has_text(row.data[f])]
        if empty:
            data.drop(row, f"empty {empty[0]}")
            continue
        if data_format == PREFERENCE and completions["chosen"] == completions["rejected"]:
            data.drop(row, "identical chosen and rejected")
            continue
        cut = False
        if len(prompt_ids) > max_prompt_length:
            keep_bos = bos is not None and prompt_ids[0] == bos
            prompt_ids = ([bos] if keep_bos else []) + prompt_ids[len(prompt_ids) - max_prompt_length + keep_bos:]
            cut = True
        room = max_length - len(prompt_ids)
        for f, ids in completions.items():
            if len(ids) > room:
                completions[f] = ids[: max(room, 0)]
                cut = True
        if any(not ids for ids in completions.values()):
            data.drop(row, "no completion tokens left after truncation")
            continue
        if data_format == PREFERENCE and completions["chosen"] == completions["rejected"]:
            data.drop(row, "chosen and rejected identical after truncation")
            continue
        data.truncated_rows += cut
        example: dict[str, Any] = {"row_id": row_id, "prompt_ids": prompt_ids,
                                   "prompt": prompt_for_judge(row.data["prompt"])}
        example.update({f + "_ids": ids for f, ids in completions.items()})
        if data_format == UNPAIRED:
            example["label"] = row.data["label"]
        if "margin" in row.data:
            example["margin"] = row.data["margin"]
        data.examples.append(example)
    return data


def row_has_text(value: Any) -> bool:
    """Whether a completion field holds any non-whitespace text."""
    if isinstance(value, str):
        return bool(value.strip())
    return any(m["content"].strip() for m in value)
