"""Rows -> token ids, with the prompt/completion boundary as the model sees it and an explicit truncation policy.

Boundary. A prompt and each of its completions are tokenized together, as one text, so the ids are
exactly the tokens the model reads for the whole sequence; tokenizing them apart would end a prompt
with tokens the joint text never has (a sentencepiece prompt ending in a space gets a lone ``▁``, and
the completion then starts ``▁ ▁a`` instead of ``▁a``). The prompt is the run of leading tokens
that lie wholly in the prompt's text; the first token that reaches past it (the *boundary token*,
which may merge the prompt's last characters, such as a separating space, with the completion's
first ones) and everything after it are the completion. So the boundary token is trained on, and
``prompt_ids``, the prefix that generation (evaluation, ``label``, online rollouts) continues from,
ends just before it: a sampled continuation starts with the token training starts with. Fast
tokenizers give character offsets (``return_offsets_mapping``); for others the prompt is the
longest common prefix of the prompt's own tokens and the joint tokens (a token shared at the same
position covers the same characters, so it lies in the prompt).
The completions of a preference pair share one prompt: if their joint tokenizations split the
prompt's end differently (rare: only where whitespace before the boundary tokenizes differently), the
shared prompt is the common prefix and the rest belongs to each completion. Prompt-only rows have
no completion yet: they are split against probe completions (``a``, ``The``), and their prompt ends
before its last token only if every probe merges that token into the answer's first (a trailing
space, in a vocabulary with ``▁a`` and ``▁The``), so a rollout starts where a training sequence's
completion would.

Truncation. The prompt is cut from the left to ``max_prompt_length`` tokens (the end of a prompt,
next to the answer, matters most; a leading BOS token is kept), then each completion is cut from the
right to fit ``max_length``. A row left with no completion token (empty, or pushed out by a long
prompt) is dropped and counted by reason, never trained on; so is a preference pair whose chosen and
rejected completions are identical (its DPO-style gradient is exactly zero: it only dilutes the batch),
whether they were identical in the data or became so by truncation. Prompt-only data (online
methods) keeps prompts short enough that prompt + ``max_new_tokens`` generated tokens fit
``max_length``. Left unset, the prompt limit leaves completions room within ``max_length``; one set
so that it leaves (almost) none is warned about before any model loads (``prompt_token_limit``).

Scale. Texts go to the tokenizer ``ENCODE_BATCH`` at a time (straight to the ``tokenizers`` backend
where that gives the same result: ``_rust_tokenizer``); kept ids are stored as int32 arrays
(``aligner.data.examples``); and the result is cached on disk by a fingerprint of its inputs
(``aligner.data.token_cache``), so a second run on the same data skips all of this, and the
processes of a distributed run tokenize once between them. The rows come in compact
(``aligner.data.rows``) and are decoded ``ENCODE_BATCH`` at a time; an example's text, label and
margin are read back from its row when used, never copied per example.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aligner.data.examples import ExampleBuilder
from aligner.data.loading import Row
from aligner.data.tokenized import COMPLETION_FIELDS, TokenizedData, prompt_for_judge
from aligner.protocols import PREFERENCE, PROMPT_ONLY, UNPAIRED

if TYPE_CHECKING:
    from aligner.data.token_cache import TokenCache

log = logging.getLogger("aligner")


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


# The prompt limit when the config sets none (the config key's default), capped by the room rule below.
DEFAULT_PROMPT_LIMIT = 256


def min_completion_room(max_length: int) -> int:
    """Completion tokens that ``max_length - max_prompt_length`` should leave at least: a quarter of
    ``max_length``, at most 32 (fewer, and every row with a long prompt trains on a stub or is dropped)."""
    return max(1, min(32, max_length // 4))


def _prompt_limit_unset(data: Any) -> bool:
    """Whether the config leaves ``max_prompt_length`` to aligner (``null``, or the key not written)."""
    if data.max_prompt_length is None:
        return True
    # The key's default is a number, so "not written" is read from the keys pydantic saw; a limit
    # copied from a written-out config.yaml counts as chosen (and is warned about if it leaves no room).
    fields_set = getattr(data, "model_fields_set", None)
    return fields_set is not None and "max_prompt_length" not in fields_set


def prompt_token_limit(data: Any, data_format: str, generation: int, stage: str, index: int) -> int:
    """The most prompt tokens a stage's rows keep. Called before any model loads.

    - Data with completions: ``data.max_prompt_length`` as written. Left unset, it is
      ``DEFAULT_PROMPT_LIMIT`` but no more than leaves ``min_completion_room`` tokens of
      ``data.max_length`` (so ``max_length: 256`` alone does not drop every row whose prompt fills
      it). A written limit that leaves less room is kept and warned about, naming both keys: rows
      whose prompt reaches it are dropped or keep only a stub of their completion.
    - Prompt-only data (online methods): no more than leaves room for ``generation`` new tokens
      within ``data.max_length``, so prompt + completion never exceed it; a ConfigError if no room
      is left.
    """
    unset = _prompt_limit_unset(data)
    limit = DEFAULT_PROMPT_LIMIT if data.max_prompt_length is None else data.max_prompt_length
    if data_format != PROMPT_ONLY:
        need = min_completion_room(data.max_length)
        if unset:
            return max(1, min(limit, data.max_length - need))
        room = data.max_length - limit
        if room < need:
            effect = "leaves no room for completion tokens" if room <= 0 else f"leaves only {room} completion tokens"
            log.warning("stage '%s': 'stages[%d].data.max_prompt_length' (%d) with 'stages[%d].data.max_length' "
                        "(%d) %s: rows whose prompt reaches that length are dropped ('no completion tokens left "
                        "after truncation') or keep a stub of their completion; lower max_prompt_length (or leave "
                        "it unset) or raise max_length so that at least %d remain", stage, index, limit, index,
                        data.max_length, effect, need)
        return limit
    if generation <= 0:
        return limit
    room = data.max_length - generation
    if room < 1:
        from aligner.errors import ConfigError

        raise ConfigError(f"stage '{stage}': max_new_tokens {generation} leaves no room for a prompt within "
                          f"'stages[{index}].data.max_length' ({data.max_length}): raise max_length above "
                          f"{generation} or generate fewer tokens")
    if room < limit:
        log.info("stage '%s': prompts cut to %d tokens so that prompt + %d generated tokens fit max_length %d",
                 stage, room, generation, data.max_length)
    return min(limit, room)


# Probe completions for prompt-only rows: likely first words of an answer. Where both merge with the
# prompt's last token (a trailing space into "▁a" and "▁The"), so would most real answers.
PROBES = ("a", "The")
# Texts per tokenizer call: batched calls are many times faster than one call per text, and a
# bounded batch keeps the ids of a large dataset from being materialised twice.
ENCODE_BATCH = 1024


def _rust_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers`` object behind a plain transformers fast tokenizer, when calling it directly
    gives exactly what ``tokenizer(texts, add_special_tokens=False)`` gives; else ``None``.

    transformers turns every encoding into Python lists in a per-text loop that costs as much as the
    tokenizing itself; the encodings' ``ids`` and ``offsets`` are the same values. Only a tokenizer
    whose class keeps transformers' own encoding path, with no padding or truncation left set on
    the backend, qualifies: a subclass or wrapper may do more in ``__call__``.
    """
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the ordinary call is always right
        return None
    cls = type(tokenizer)
    if (not isinstance(tokenizer, TokenizersBackend) or cls._encode_plus is not TokenizersBackend._encode_plus
            or cls.__call__ is not PreTrainedTokenizerBase.__call__):
        return None
    backend = tokenizer._tokenizer
    if (backend.padding is not None or backend.truncation is not None
            or backend.encode_special_tokens != bool(tokenizer.split_special_tokens)):
        return None
    return backend


def _encode_many(tokenizer: Any, texts: list[str], offsets: bool) -> tuple[list[list[int]], list[Any]]:
    """Ids (and, with ``offsets``, character spans) of ``texts``, without special tokens added."""
    ids: list[list[int]] = []
    spans: list[Any] = []
    rust = _rust_tokenizer(tokenizer)
    for begin in range(0, len(texts), ENCODE_BATCH):
        chunk = texts[begin:begin + ENCODE_BATCH]
        if rust is not None:
            encodings = rust.encode_batch(chunk, add_special_tokens=False)
            ids.extend(e.ids for e in encodings)
            spans.extend([e.offsets for e in encodings] if offsets else [None] * len(chunk))
            continue
        encoded = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=offsets)
        ids.extend(encoded["input_ids"])
        spans.extend(encoded["offset_mapping"] if offsets else [None] * len(chunk))
    return ids, spans


def _prompt_tokens(joint: list[int], spans: Any, prompt_chars: int, alone: list[int] | None) -> int:
    """How many leading tokens of ``joint`` lie wholly in the first ``prompt_chars`` characters."""
    if spans is not None:
        return next((i for i, (_, stop) in enumerate(spans) if stop > prompt_chars), len(joint))
    # No offsets (a slow tokenizer): the common prefix of the prompt's own tokens and the joint ones.
    assert alone is not None
    n = 0
    for a, b in zip(alone, joint, strict=False):
        if a != b:
            break
        n += 1
    return n


def _common_prefix(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    # Almost always the completions split the prompt alike: one list comparison (in C) settles it.
    if all(s[:n] == sequences[0][:n] for s in sequences[1:]):
        return n
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return n


def split_prompt_completions(tokenizer: Any, prompts: list[str],
                             completions: list[list[str]]) -> list[tuple[list[int], list[list[int]]]]:
    """Tokenize each prompt text with each of its completion texts as one text; split at the boundary.

    Returns, per prompt, the shared prompt ids and the ids of each completion, so that
    ``prompt_ids + completion_ids`` is exactly the tokenization of ``prompt + completion`` (no BOS
    added). A prompt with no completions is split against ``PROBES`` and gets an empty list.
    See the module docstring for the boundary rule.
    """
    fast = bool(getattr(tokenizer, "is_fast", False))
    texts: list[str] = []
    for prompt, texts_of_row in zip(prompts, completions, strict=True):
        texts.extend(prompt + c for c in (texts_of_row or PROBES))
    joint, spans = _encode_many(tokenizer, texts, offsets=fast)
    alone = None if fast else _encode_many(tokenizer, prompts, offsets=False)[0]
    result: list[tuple[list[int], list[list[int]]]] = []
    at = 0
    for row, (prompt, texts_of_row) in enumerate(zip(prompts, completions, strict=True)):
        n = len(texts_of_row or PROBES)
        ids = joint[at:at + n]
        prompt_parts = [ids[j][:_prompt_tokens(ids[j], spans[at + j], len(prompt),
                                                    None if alone is None else alone[row])]
                        for j in range(n)]
        at += n
        if not texts_of_row:
            # A prompt-only row keeps its last token unless every probe answer merges it into its own
            # first token (a trailing space before a word, in a vocabulary that has the word with it).
            result.append((max(prompt_parts, key=len), []))
            continue
        # One prompt for every completion: where their tokenizations of the prompt's end differ,
        # the shared part is the prompt and the rest goes with each completion.
        k = _common_prefix(prompt_parts)
        result.append((ids[0][:k], [s[k:] for s in ids]))
    return result


def encode_prompt_completion(tokenizer: Any, prompt_text: str, completion_text: str) -> tuple[list[int], list[int]]:
    """Prompt ids and completion ids of one rendered pair, split as training splits them (no BOS added)."""
    prompt_ids, (completion_ids,) = split_prompt_completions(tokenizer, [prompt_text], [[completion_text]])[0]
    return prompt_ids, completion_ids


def tokenize_rows(rows: Sequence[Row], data_format: str, tokenizer: Any, template: Any,
                  max_length: int, max_prompt_length: int,
                  cache: TokenCache | bool | None = None) -> TokenizedData:
    """Tokenize validated rows; drop (and count) rows with no completion token left.

    ``cache`` (``aligner.data.token_cache``): ``None`` uses the on-disk cache of tokenized data for
    ``MIN_ROWS`` rows or more, ``True`` always, ``False`` never; a ``TokenCache`` names the directory.
    A hit returns data equal to what tokenizing would give, rebuilt in a fraction of the time.
    """
    from aligner.data import token_cache

    store = token_cache.resolve(cache, len(rows))
    if store is None:
        return _tokenize_rows(rows, data_format, tokenizer, template, max_length, max_prompt_length)
    return token_cache.cached_tokenize(
        rows, data_format, tokenizer, template, max_length, max_prompt_length, store,
        lambda: _tokenize_rows(rows, data_format, tokenizer, template, max_length, max_prompt_length))


def _tokenize_rows(rows: Sequence[Row], data_format: str, tokenizer: Any, template: Any,
                   max_length: int, max_prompt_length: int) -> TokenizedData:
    data = TokenizedData(data_format, [])
    fields = COMPLETION_FIELDS[data_format]
    examples = ExampleBuilder(("prompt", *fields), with_labels=data_format == UNPAIRED)
    # Prepend BOS only for tokenizers that add it themselves (Llama-style); chat templates that
    # already write it, and tokenizers without one (Qwen, GPT-2), get none.
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    for begin in range(0, len(rows), ENCODE_BATCH):
        chunk = list(rows[begin:begin + ENCODE_BATCH])  # each row decoded once (``Rows`` decode on access)
        split = split_prompt_completions(
            tokenizer, [template.prompt_text(row.data["prompt"]) for row in chunk],
            [[template.completion_text(row.data[f]) for f in fields] for row in chunk])
        for row_id, row, (prompt_ids, completion_ids) in zip(range(begin, begin + len(chunk)), chunk, split,
                                                             strict=True):
            if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
                prompt_ids = [bos, *prompt_ids]
            _add_row(data, examples, row_id, row, prompt_ids, dict(zip(fields, completion_ids, strict=True)), bos,
                     max_length, max_prompt_length)
    data.examples = examples.build(rows, prompt_for_judge)
    return data


def _add_row(data: TokenizedData, examples: ExampleBuilder, row_id: int, row: Row, prompt_ids: list[int], completions: dict[str, list[int]],
             bos: int | None, max_length: int, max_prompt_length: int) -> None:
    """Truncate one tokenized row and keep it, or drop it and count why."""
    data_format = data.data_format
    data.full_lengths.append(len(prompt_ids) + max((len(ids) for ids in completions.values()), default=0))
    empty = [f for f, ids in completions.items() if not row_has_text(row.data[f])]
    if empty:
        data.drop(row, f"empty {empty[0]}", row_id)
        return
    if data_format == PREFERENCE and completions["chosen"] == completions["rejected"]:
        data.drop(row, "identical chosen and rejected", row_id)
        return
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
        data.drop(row, "no completion tokens left after truncation", row_id)
        return
    if data_format == PREFERENCE and completions["chosen"] == completions["rejected"]:
        data.drop(row, "chosen and rejected identical after truncation", row_id)
        return
    data.truncated_rows += cut
    # The prompt's text, a label and a margin are read back from the row when the example is used.
    examples.add(row_id, {"prompt": prompt_ids, **completions})


def row_has_text(value: Any) -> bool:
    """Whether a completion field holds any non-whitespace text."""
    if isinstance(value, str):
        return bool(value.strip())
    return any(m["content"].strip() for m in value)
