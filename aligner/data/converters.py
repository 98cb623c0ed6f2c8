"""Converters from the dataset layouts people publish to aligner's row formats.

A source's ``format`` is one of aligner's own row formats (``sft``, ``preference``, ``unpaired``,
``prompt``: rows are validated as they are) or one of the converters below, which rewrite each row
first. With no ``format`` the converter is picked from the first row's fields when the layout is
unambiguous (``detect_converter``); otherwise the row is taken as aligner's own format.

- ``alpaca``: ``instruction`` (+ optional ``input``) + ``output`` -> sft ``prompt``/``completion``.
- ``sharegpt``: ``conversations: [{from, value}]`` -> sft chat messages (human/user, gpt/assistant, system).
- ``openai``: ``messages: [{role, content}]`` -> sft; the last (assistant) message is the completion.
- ``hh-rlhf``: ``chosen``/``rejected`` strings with the dialogue inline ("\\n\\nHuman: ...\\n\\nAssistant: ...");
  their shared text up to its last "\\n\\nAssistant:" is the prompt.
- ``ultrafeedback``: a ``prompt`` plus chat ``chosen``/``rejected`` that repeat the prompt turn(s) first
  (HuggingFaceH4/ultrafeedback_binarized); the repeated turns are removed so only the reply is trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aligner.errors import DataError
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED

ROW_FORMATS = (SFT, PREFERENCE, UNPAIRED, PROMPT_ONLY)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Converter:
    """A dataset layout: the row format it produces and the function that rewrites one row."""

    name: str
    data_format: str
    convert: Callable[[dict[str, Any], str], dict[str, Any]]
    summary: str


def _text(row: dict[str, Any], field: str, location: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{location}: missing field '{field}'")
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], field: str, location: str) -> list[Any]:
    value = row.get(field)
    if value is None:
        raise DataError(f"{location}: missing field '{field}'")
    if not isinstance(value, list) or not value:
        raise DataError(f"{location}: field '{field}' must be a non-empty list of messages, got {value!r:.60}")
    return value


def alpaca(row: dict[str, Any], location: str) -> dict[str, Any]:
    """``instruction`` and ``input`` (joined by a blank line when ``input`` is not empty) -> ``prompt``;
    ``output`` -> ``completion``."""
    instruction = _text(row, "instruction", location)
    extra = _text(row, "input", location, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"prompt": prompt, "completion": _text(row, "output", location)}


def _split_chat(messages: list[dict[str, str]], field: str, location: str) -> dict[str, Any]:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{location}: field '{field}' must end with an assistant message (the completion)")
    if len(messages) < 2:
        raise DataError(f"{location}: field '{field}' needs at least one message before the assistant's")
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def sharegpt(row: dict[str, Any], location: str) -> dict[str, Any]:
    """``conversations: [{from, value}]`` -> chat messages; the last (``gpt``) turn is the completion."""
    messages = []
    for i, turn in enumerate(_messages(row, "conversations", location)):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{location}: field 'conversations' turn {i} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{location}: field 'conversations' turn {i} has unknown 'from' {turn['from']!r}; "
                            f"known: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise DataError(f"{location}: field 'conversations' turn {i} 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return _split_chat(messages, "conversations", location)


def openai_messages(row: dict[str, Any], location: str) -> dict[str, Any]:
    """``messages: [{role, content}]`` -> prompt = all but the last message, completion = the last
    (which must be the assistant's). Roles and contents are checked by the sft validation."""
    messages = _messages(row, "messages", location)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{location}: field 'messages' message {i} must be an object with 'role' and 'content'")
    return _split_chat(messages, "messages", location)


def hh_rlhf(row: dict[str, Any], location: str) -> dict[str, Any]:
    """The text ``chosen`` and ``rejected`` share, up to and including its last "\\n\\nAssistant:", is
    the prompt; the rest of each is its completion, less the one space that follows the marker: the
    template writes what separates a prompt from its completion (``plain``'s space, a chat template's
    turn markup), so the reply does not start with a second space."""
    chosen, rejected = _text(row, "chosen", location), _text(row, "rejected", location)
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)  # the marker must lie wholly inside the shared text
    if cut < 0:
        raise DataError(f"{location}: 'chosen' and 'rejected' share no text ending in \"\\n\\nAssistant:\"; an "
                        "hh-rlhf row holds one dialogue with two different last assistant replies")
    end = cut + len(HH_ASSISTANT)
    return {"prompt": chosen[:end], "chosen": _without_one_space(chosen[end:]),
            "rejected": _without_one_space(rejected[end:])}


def _without_one_space(reply: str) -> str:
    return reply[1:] if reply.startswith(" ") else reply


def _same_turn(a: Any, b: Any) -> bool:
    """Two messages match when their roles are equal and their contents equal up to surrounding whitespace."""
    return (isinstance(a, dict) and isinstance(b, dict) and a.get("role") == b.get("role")
            and isinstance(a.get("content"), str) and isinstance(b.get("content"), str)
            and a["content"].strip() == b["content"].strip())


def ultrafeedback(row: dict[str, Any], location: str) -> dict[str, Any]:
    """Remove from ``chosen`` and ``rejected`` the leading turns that repeat the prompt (a string is
    one user turn); the prompt is those turns. A row whose chosen or rejected does not start with
    them is an error: training on it would teach the model the user's turn."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        turns: list[Any] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        turns = prompt
    else:
        raise DataError(f"{location}: field 'prompt' must be a string or a list of messages (ultrafeedback rows)")
    out: dict[str, Any] = {"prompt": turns}
    for field in ("chosen", "rejected"):
        messages = _messages(row, field, location)
        head = messages[:len(turns)]
        if len(head) < len(turns) or not all(_same_turn(a, b) for a, b in zip(head, turns, strict=True)):
            first = messages[0] if isinstance(messages[0], dict) else {}
            raise DataError(
                f"{location}: field '{field}' does not start with the prompt turn "
                f"(its first message is {first.get('role')!r}: {str(first.get('content'))[:40]!r}, the prompt is "
                f"{str(turns[0].get('content') if isinstance(turns[0], dict) else turns[0])[:40]!r}); "
                "ultrafeedback rows repeat the prompt as their first turn(s), which are removed so that only "
                "the reply is trained; fix the row or set the source's 'format' to what the rows are")
        rest = messages[len(turns):]
        if not rest:
            raise DataError(f"{location}: field '{field}' holds only the prompt turn(s), no reply")
        if not isinstance(rest[0], dict) or rest[0].get("role") != "assistant":
            raise DataError(f"{location}: field '{field}' continues after the prompt turn(s) with "
                            f"{rest[0].get('role') if isinstance(rest[0], dict) else rest[0]!r}, not an assistant reply")
        out[field] = rest
    if row.get("margin") is not None:
        out["margin"] = row["margin"]
    return out


CONVERTERS = {c.name: c for c in (
    Converter("alpaca", SFT, alpaca, "instruction/input/output -> prompt/completion"),
    Converter("sharegpt", SFT, sharegpt, "conversations [{from, value}] -> chat prompt/completion"),
    Converter("openai", SFT, openai_messages, "messages [{role, content}] -> chat prompt/last assistant turn"),
    Converter("hh-rlhf", PREFERENCE, hh_rlhf, "chosen/rejected dialogues -> shared prefix as prompt"),
    Converter("ultrafeedback", PREFERENCE, ultrafeedback,
              "prompt + chat chosen/rejected repeating it -> repeated turns removed"),
)}
SOURCE_FORMATS = (*ROW_FORMATS, *CONVERTERS)


def _starts_with_user_turn(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and value[0].get("role") == "user"


def detect_converter(row: dict[str, Any]) -> str | None:
    """The converter a row's fields call for, or ``None`` for aligner's own formats.

    Only layouts that aligner's formats cannot also mean are detected: ``instruction``+``output``
    without ``prompt``, ``conversations``, ``messages`` without ``chosen``, string ``chosen``/``rejected``
    with no ``prompt`` holding "\\n\\nAssistant:", and chat ``chosen`` that opens with a user turn.
    """
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        if row.get("prompt") is not None and (_starts_with_user_turn(chosen) or _starts_with_user_turn(row["rejected"])):
            return "ultrafeedback"
        if row.get("prompt") is None and isinstance(chosen, str) and HH_ASSISTANT in chosen:
            return "hh-rlhf"
        return None
    if "prompt" in keys or "completion" in keys:
        return None
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "openai"
    return None
