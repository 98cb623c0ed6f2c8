"""The four row formats and their validation.

- ``sft``: ``prompt`` + ``completion``, or chat ``messages`` whose last message is the assistant's.
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (+ an optional numeric ``margin``); or implicit-prompt chat pairs (``chosen`` and
  ``rejected`` conversations sharing their first turns, as in HH-RLHF), split with trl's ``extract_prompt``.
- ``unpaired``: ``prompt`` + ``completion`` + boolean ``label`` (desirable or not).
- ``prompt``: ``prompt`` alone.

Dataset layouts that are not these (Alpaca, ShareGPT, HH-RLHF strings, ...) are rewritten into them
first by ``aligner.data.converters``.

Text fields are strings, or lists of ``{"role", "content"}`` messages for chat data.
"""

from __future__ import annotations

from typing import Any

from aligner.errors import DataError
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED

REQUIRED_FIELDS = {
    SFT: ("prompt", "completion"),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    UNPAIRED: ("prompt", "completion", "label"),
    PROMPT_ONLY: ("prompt",),
}
ROLES = ("system", "user", "assistant", "tool")


def detect_format(row: dict[str, Any], location: str) -> str:
    """Guess the format from the first row's fields (set ``data.format`` to be explicit)."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return PREFERENCE
    if {"completion", "label"} <= keys:
        return UNPAIRED
    if "completion" in keys or "messages" in keys:
        return SFT
    if "prompt" in keys:
        return PROMPT_ONLY
    raise DataError(
        f"{location}: cannot tell the data format from fields {sorted(keys)}; expected one of: "
        "prompt/completion or messages (sft), prompt/chosen/rejected (preference), "
        "prompt/completion/label (unpaired), prompt (prompt-only)"
    )


def _check_text(value: Any, field: str, location: str, allow_empty: bool = False) -> Any:
    """A text field is a non-empty string or a non-empty list of role/content messages."""
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise DataError(f"{location}: field '{field}' is empty")
        return value
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{location}: field '{field}' message {i} must be an object with 'role' and 'content'")
            if message["role"] not in ROLES:
                raise DataError(f"{location}: field '{field}' message {i} has unknown role "
                                f"'{message['role']}'; roles: {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise DataError(f"{location}: field '{field}' message {i} 'content' must be a string")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None:
        raise DataError(f"{location}: missing field '{field}'")
    if isinstance(value, list):
        raise DataError(f"{location}: field '{field}' is an empty list")
    raise DataError(f"{location}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")


def _split_messages(row: dict[str, Any], location: str) -> dict[str, Any]:
    messages = _check_text(row.get("messages"), "messages", location)
    if not isinstance(messages, list) or messages[-1]["role"] != "assistant":
        raise DataError(f"{location}: field 'messages' must end with an assistant message (the completion)")
    if len(messages) < 2:
        raise DataError(f"{location}: field 'messages' needs at least one message before the assistant's")
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def _implicit_prompt(row: dict[str, Any], location: str) -> dict[str, Any]:
    from trl.data_utils import extract_prompt

    chosen = _check_text(row.get("chosen"), "chosen", location)
    rejected = _check_text(row.get("rejected"), "rejected", location)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{location}: missing field 'prompt' (only chat-format chosen/rejected, or hh-rlhf "
                        "dialogues holding '\\n\\nAssistant:', can omit it)")
    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not split["prompt"]:
        raise DataError(f"{location}: 'chosen' and 'rejected' share no prompt turns and there is no 'prompt' field")
    return split


def validate_row(row: dict[str, Any], data_format: str, location: str) -> dict[str, Any]:
    """Return the row normalised to its format's fields, or raise a DataError naming the field."""
    if data_format == SFT and "prompt" not in row and "messages" in row:
        row = _split_messages(row, location)
    if data_format == PREFERENCE and row.get("prompt") is None and "chosen" in row:
        row = {**row, **_implicit_prompt(row, location)}
    for field in REQUIRED_FIELDS[data_format]:
        if field not in row or row[field] is None:
            needed = ", ".join(REQUIRED_FIELDS[data_format])
            raise DataError(f"{location}: missing field '{field}' ({data_format} rows need: {needed})")
    clean = {}
    for field in REQUIRED_FIELDS[data_format]:
        if field == "label":
            clean[field] = _check_label(row[field], location)
        else:
            # Empty completions are allowed through validation and dropped (and counted) after
            # tokenization, together with rows that truncation empties.
            clean[field] = _check_text(row[field], field, location, allow_empty=field != "prompt")
            if field != "prompt":
                _check_completion_turns(clean[field], field, location)
    if data_format == PREFERENCE and row.get("margin") is not None:
        clean["margin"] = _check_margin(row["margin"], location)
    if data_format == PROMPT_ONLY:
        # Online algorithms hand a prompt row's other columns (a ground-truth ``answer``, test cases,
        # ...) to their reward functions.
        clean.update({k: v for k, v in row.items() if k not in clean})
    return clean


def _check_completion_turns(value: Any, field: str, location: str) -> None:
    """A chat completion is the assistant's reply: one that opens with a user or system turn almost
    always repeats the prompt (the UltraFeedback layout), and training on it would teach the model to
    write the user's turn, so it is refused rather than trained."""
    if isinstance(value, list) and value and value[0]["role"] in ("user", "system"):
        raise DataError(f"{location}: field '{field}' starts with a {value[0]['role']} message; a completion is the "
                        "assistant's reply (if the chat repeats the prompt turn first, set the source's "
                        "'format: ultrafeedback' to remove it)")


def _check_margin(value: Any, location: str) -> float:
    """The optional per-pair ``margin`` of preference rows (how much better chosen is; reward models use it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{location}: field 'margin' must be a number, got {value!r}")
    return float(value)


def _check_label(value: Any, location: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{location}: field 'label' must be true or false, got {value!r}")
