"""The on-disk cache of tokenized rows (issue 16, scale): a warm run gives exactly the cold run's data,
every input that changes the ids changes the key, a damaged entry is rebuilt, bad rows stay located."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from aligner.data import token_cache
from aligner.data.check import check_data
from aligner.data.loading import Row, load_validated
from aligner.data.templates import load_template
from aligner.data.token_cache import TokenCache, cache_key
from aligner.data.tokenize import tokenize_rows
from aligner.errors import DataError
from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer
from tests.conftest import preference_rows

TOKENIZER = load_builtin_tokenizer()
PLAIN = load_template("plain", TOKENIZER, chat_data=False)


def _rows(n: int = 40) -> list[Row]:
    """Preference rows with one identical pair (line 4) and one prompt too long to leave room (line 7)."""
    data = [dict(r) for r in preference_rows(16)] * (n // 16 + 1)
    rows = [Row(dict(d), f"train.jsonl, line {i + 1}") for i, d in enumerate(data[:n])]
    rows[3].data["rejected"] = rows[3].data["chosen"]
    rows[6].data["prompt"] = "word " * 100
    return rows


def _tokenize(rows: list[Row], cache: TokenCache, **overrides):
    settings = {"max_length": 32, "max_prompt_length": 32, **overrides}
    return tokenize_rows(rows, "preference", TOKENIZER, PLAIN, cache=cache, **settings)


def _entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))


def test_warm_run_gives_the_cold_runs_ids_masks_and_drops(tmp_path, caplog):
    cache = TokenCache(tmp_path)
    cold = _tokenize(_rows(), cache)
    assert len(_entries(tmp_path)) == 1
    with caplog.at_level(logging.INFO, logger="aligner"):
        warm = _tokenize(_rows(), cache)
    assert "loaded from cache" in caplog.text
    assert cold.dropped == {"identical chosen and rejected": 1, "no completion tokens left after truncation": 1}
    assert warm.dropped_rows == cold.dropped_rows == [("train.jsonl, line 4", "identical chosen and rejected"),
                                                      ("train.jsonl, line 7", "no completion tokens left after truncation")]
    assert len(warm.examples) == len(cold.examples) == 38
    for a, b in zip(cold.examples, warm.examples, strict=True):
        assert a == b  # row_id, prompt/chosen/rejected ids, judge prompt: everything
        assert all(type(t) is int for t in b["prompt_ids"] + b["chosen_ids"])  # plain ints, as before
    assert warm == cold  # counts, truncation, full lengths too


def test_every_input_that_decides_the_ids_changes_the_key():
    rows = _rows()
    base = cache_key(rows, "preference", TOKENIZER, PLAIN, 32, 16)
    edited = _rows()
    edited[20].data["chosen"] += "!"
    other_tokenizer = load_builtin_tokenizer()
    other_tokenizer.add_tokens(["<new>"])
    changed = {
        "tokenizer": cache_key(rows, "preference", other_tokenizer, PLAIN, 32, 16),
        "template": cache_key(rows, "preference", TOKENIZER, load_template("chatml", TOKENIZER, False), 32, 16),
        "max_length": cache_key(rows, "preference", TOKENIZER, PLAIN, 33, 16),
        "max_prompt_length": cache_key(rows, "preference", TOKENIZER, PLAIN, 32, 15),
        "file": cache_key(edited, "preference", TOKENIZER, PLAIN, 32, 16),
        "order": cache_key(rows[::-1], "preference", TOKENIZER, PLAIN, 32, 16),
    }
    assert base == cache_key(_rows(), "preference", TOKENIZER, PLAIN, 32, 16)  # stable across calls
    assert all(key != base for key in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_a_corrupt_entry_is_rebuilt_with_a_warning(tmp_path, caplog):
    cache = TokenCache(tmp_path)
    cold = _tokenize(_rows(), cache)
    (entry,) = _entries(tmp_path)
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:-8] + b"\x00" * 8):
        entry.write_bytes(damage(entry.read_bytes()))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="aligner"):
            rebuilt = _tokenize(_rows(), cache)
        assert "is corrupt" in caplog.text and entry.name in caplog.text
        assert rebuilt == cold
        assert cache.load(entry.stem, _rows()) == cold  # replaced by an intact entry


def test_an_unknown_tokenizer_or_template_is_never_cached(tmp_path):
    class Wrapped:  # looks like a tokenizer, but what it returns may differ: never trusted with a key
        def __init__(self, inner):
            self.inner = inner
            self.bos_token_id = inner.bos_token_id
            self.is_fast = True

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    tokenize_rows(_rows(), "preference", Wrapped(TOKENIZER), PLAIN, 32, 16, cache=TokenCache(tmp_path))
    assert _entries(tmp_path) == []


def test_small_data_and_the_off_switch_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNER_CACHE_DIR", str(tmp_path))
    tokenize_rows(_rows(), "preference", TOKENIZER, PLAIN, 32, 16)  # under MIN_ROWS: not worth an entry
    assert not (tmp_path / "tokenized").exists()
    monkeypatch.setattr(token_cache, "MIN_ROWS", 10)
    monkeypatch.setenv("ALIGNER_TOKEN_CACHE", "off")
    tokenize_rows(_rows(), "preference", TOKENIZER, PLAIN, 32, 16)
    assert not (tmp_path / "tokenized").exists()
    monkeypatch.delenv("ALIGNER_TOKEN_CACHE")
    tokenize_rows(_rows(), "preference", TOKENIZER, PLAIN, 32, 16)
    assert len(_entries(tmp_path / "tokenized")) == 1


def test_an_unwritable_cache_only_warns(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="aligner"):
        data = _tokenize(_rows(), TokenCache(blocker / "tokenized"))
    assert len(data.examples) == 38
    assert "could not write the tokenized-data cache" in caplog.text


def test_located_errors_stay_and_bad_rows_are_never_cached_as_good(tmp_path):
    cache = TokenCache(tmp_path / "cache")
    lines = [json.dumps(r) for r in preference_rows(12)]
    good_line = lines[4]
    lines[4] = json.dumps({"prompt": "Hi", "chosen": 7, "rejected": "b"})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for _ in range(2):  # cold, then with the entry of the valid rows in place
        rejected: list = []
        _, rows = load_validated(str(path), None, collect_errors=rejected)
        data = _tokenize(rows, cache)
        assert [r.location for r in rejected] == [f"{path}, line 5"]
        assert len(data.examples) == 11 and 4 not in [rows[e["row_id"]].location for e in data.examples]
        with pytest.raises(DataError, match=rf"{path}, line 5: field 'chosen' must be a string"):
            load_validated(str(path), None)  # the training path stops at the bad row, warm or cold
    # The fixed file is new data: its row 5 is tokenized, not read as absent from the old entry.
    lines[4] = good_line
    path.write_text("\n".join(lines) + "\n")
    _, rows = load_validated(str(path), None)
    fixed = _tokenize(rows, cache)
    assert len(fixed.examples) == 12 and len(_entries(tmp_path / "cache")) == 2


def test_data_check_warm_reports_the_same_as_cold(tmp_path, make_config, monkeypatch):
    monkeypatch.setenv("ALIGNER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(token_cache, "MIN_ROWS", 1)
    rows = preference_rows(16)
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}
    config = make_config("dpo", rows=rows)
    config["stages"][0]["data"]["max_drop_fraction"] = 0.5
    reports = [[r.to_dict() for r in check_data(config)] for _ in range(2)]
    assert len(_entries(tmp_path / "cache" / "tokenized")) == 1
    assert reports[0] == reports[1]
    assert [d["location"] for d in reports[1][0]["dropped_rows"]] == [f"{tmp_path / 'dpo_train.jsonl'}, line 4"]


def test_examples_are_compact_and_read_like_the_old_lists():
    rows = _rows(400)
    data = tokenize_rows(rows, "preference", TOKENIZER, PLAIN, 32, 32, cache=False)
    examples = data.examples
    first = examples[0]
    assert set(first) == {"row_id", "prompt_ids", "prompt", "chosen_ids", "rejected_ids"}
    assert first["prompt"] == rows[0].data["prompt"]
    # prompt_ids + completion ids is a list concatenation, exactly the joint tokenization, as before
    assert first["prompt_ids"] + first["chosen_ids"] == TOKENIZER(
        PLAIN.prompt_text(rows[0].data["prompt"]) + PLAIN.completion_text(rows[0].data["chosen"]),
        add_special_tokens=False)["input_ids"]
    assert examples[-1] == list(examples)[-1] and examples[2:5] == list(examples)[2:5]
    assert data.lengths() == [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                              for e in examples]
    assert data.lengths(shared_prompt=True) == [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                                for e in examples]
    tokens = sum(len(e[f]) for e in examples for f in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert examples.nbytes() < 6 * tokens  # int32 ids (+ offsets), not ~36 bytes per Python int


def test_labels_and_margins_survive_the_cache(tmp_path):
    rows = [Row({"prompt": f"Tell me about the {w} cat.", "completion": f"The cat is {w}.", "label": i % 2 == 0},
                f"u.jsonl, line {i + 1}") for i, w in enumerate(["red", "blue", "green", "old"] * 5)]
    rows[1].data["margin"] = 0.5
    cache = TokenCache(tmp_path)
    cold = tokenize_rows(rows, "unpaired", TOKENIZER, PLAIN, 32, 16, cache=cache)
    warm = tokenize_rows(rows, "unpaired", TOKENIZER, PLAIN, 32, 16, cache=cache)
    assert [e["label"] for e in warm.examples] == [i % 2 == 0 for i in range(20)]
    assert warm.examples[1]["margin"] == 0.5 and "margin" not in warm.examples[0]
    assert warm == cold


def test_the_direct_tokenizer_call_gives_what_the_transformers_call_gives():
    from aligner.data.tokenize import _encode_many, _rust_tokenizer

    texts = ["The red cat was kind.</s>", "  two  spaces\tand a tab", "é ü 猫 — emoji 🙂", "", "<pad> a</s>b"]
    assert _rust_tokenizer(TOKENIZER) is not None
    expected = TOKENIZER(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = _encode_many(TOKENIZER, texts, offsets=True)
    assert ids == expected["input_ids"]
    assert [list(map(tuple, s)) for s in spans] == [list(map(tuple, s)) for s in expected["offset_mapping"]]
    padded = load_builtin_tokenizer()
    padded._tokenizer.enable_padding(length=64)  # a backend left padding: the ordinary call is used
    assert _rust_tokenizer(padded) is None
