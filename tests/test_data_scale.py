"""Data at scale (issue 16): rows held compactly and located as before, ``max_rows`` reading only the
lines it uses, mixtures drawn as before, and tokenization done once for processes sharing a cache."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest

from aligner.data import sources
from aligner.data.loading import Row, load_validated
from aligner.data.rows import RowBlockBuilder, Rows, concat
from aligner.errors import DataError
from tests.concurrent_workers import run_two_together
from tests.conftest import preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BASE = preference_rows(16)


def _garbage_at(path: Path, n: int, bad_line: int) -> Path:
    rows = [dict(BASE[i % 16], prompt=f"q{i}") for i in range(n)]
    lines = [json.dumps(r) for r in rows]
    lines[bad_line - 1] = "{this is not json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_max_rows_reads_only_the_lines_it_uses(tmp_path, monkeypatch):
    path = _garbage_at(tmp_path / "train.jsonl", 6000, bad_line=5000)
    _, rows = load_validated(str(path), None, max_rows=10)
    assert [r.data["prompt"] for r in rows] == [f"q{i}" for i in range(10)]
    assert rows[9].location == f"{path}, line 10"
    # Reading stops there: at most the chunk holding line 10 is read, not the file (~500 kB).
    read: list[int] = []
    opened = Path.open

    def counting_open(self, *args, **kwargs):
        handle = opened(self, *args, **kwargs)
        original = handle.read
        handle.read = lambda size=-1: read.append(len(chunk := original(size))) or chunk
        return handle

    monkeypatch.setattr(sources, "READ_CHUNK", 4096)
    monkeypatch.setattr(Path, "open", counting_open)
    load_validated(str(path), None, max_rows=10)
    assert 0 < sum(read) <= 4096 < path.stat().st_size
    monkeypatch.undo()
    # The bad line is still a located error once it is used.
    with pytest.raises(DataError, match=rf"^{path}, line 5000: not valid JSON"):
        load_validated(str(path), None, max_rows=5000)
    with pytest.raises(DataError, match=rf"^{path}, line 5000: not valid JSON"):
        load_validated(str(path), None)
    _, rows = load_validated(str(path), None, max_rows=4999)
    assert len(rows) == 4999


def test_streamed_lines_are_numbered_as_splitlines_numbers_them(tmp_path, monkeypatch):
    good = json.dumps(preference_rows(1)[0]).encode()
    # \n, \r\n, a lone \r, blank lines, and the bad row last: every chunk boundary is tried.
    content = good + b"\r\n" + good + b"\r" + good + b"\n\n" + good + b"\r\n\r\n" + good + b"\n" + b'{"prompt": 1}'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(content)
    expected = [i + 1 for i, line in enumerate(content.splitlines()) if line.strip()]
    for chunk in (1, 2, 3, 5, 7, 64, 1 << 20):
        monkeypatch.setattr(sources, "READ_CHUNK", chunk)
        raw = sources.read_raw(path)
        assert [position for _, position in raw.rows] == expected
        rejected: list = []
        _, rows = load_validated(str(path), None, collect_errors=rejected)
        assert [r.location for r in rows] == [f"{path}, line {n}" for n in expected[:-1]]
        assert [r.location for r in rejected] == [f"{path}, line {expected[-1]}"]
        assert rejected[0].message.endswith(f"line {expected[-1]}: missing field 'chosen' (preference rows need: prompt, chosen, rejected)")


def test_rows_are_compact_and_read_like_a_list(tmp_path):
    data = [dict(BASE[i % 16], prompt=f"question {i}") for i in range(5000)]
    data[7]["margin"] = 2  # a row with another key than the first row
    path = write_jsonl(tmp_path / "train.jsonl", data)
    fmt, rows = load_validated(str(path), None)
    assert fmt == "preference" and isinstance(rows, Rows) and len(rows.blocks) == 1
    listed = [Row(dict(d, margin=2.0) if "margin" in d else d, f"{path}, line {i + 1}") for i, d in enumerate(data)]
    assert rows == listed and list(rows) == listed
    assert rows[-1] == listed[-1] and rows[7].data["margin"] == 2.0
    assert rows[10:13] == listed[10:13] and rows.select([4, 2]) == [listed[4], listed[2]]
    assert rows.location(4999) == f"{path}, line 5000" and rows.data_at(3) == listed[3].data
    rows[0].data["prompt"] = "edited"  # a row handed out is a copy
    assert rows[0].data["prompt"] == "question 0"
    # One buffer and two int arrays: about the file's own size, not a Python object per string.
    assert rows.nbytes() < 1.5 * path.stat().st_size
    with pytest.raises(IndexError):
        rows[5000]


def test_the_fingerprint_follows_contents_and_order_not_locations():
    def block(label: str, prompts: list[str]) -> Rows:
        builder = RowBlockBuilder(label)
        for i, p in enumerate(prompts):
            builder.append({"prompt": p}, i + 1)
        return Rows.of(builder.build())

    a, b = block("a.jsonl", ["x", "y"]), block("b.jsonl", ["x", "y"])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != block("a.jsonl", ["x", "z"]).fingerprint()
    assert a.fingerprint() != a.select([1, 0]).fingerprint()
    both = concat([a, block("c.jsonl", ["z"])])
    assert [r.location for r in both] == ["a.jsonl, line 1", "a.jsonl, line 2", "c.jsonl, line 1"]


def _old_mix(parts: list[list], counts: list[int], seed: int) -> list:
    """The list-based mixture draw this replaced: a seed must keep giving the same mixture."""
    mixed: list = []
    for index, (rows, count) in enumerate(zip(parts, counts, strict=True)):
        rng = random.Random(f"{seed}:source:{index}")
        copies, rest = divmod(count, len(rows)) if rows else (0, 0)
        mixed += rows * copies + [rows[i] for i in sorted(rng.sample(range(len(rows)), rest))]
    random.Random(f"{seed}:mixture").shuffle(mixed)
    return mixed


def test_a_mixture_is_the_same_draw_as_before():
    parts = []
    for name, n in (("a", 50), ("b", 7), ("c", 20)):
        builder = RowBlockBuilder(f"{name}.jsonl")
        for i in range(n):
            builder.append({"prompt": f"{name}{i}"}, i + 1)
        parts.append(Rows.of(builder.build()))
    for counts in ([50, 7, 20], [10, 15, 3], [0, 7, 41]):
        mixed = sources.mix(parts, counts, seed=3)
        assert mixed == _old_mix([list(p) for p in parts], counts, seed=3)
        assert len(mixed) == sum(counts)


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from aligner.data import tokenize
    from aligner.data.loading import load_validated
    from aligner.data.templates import load_template
    from aligner.data.token_cache import TokenCache
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    data, cache, log, go = sys.argv[1:5]
    build = tokenize._tokenize_rows

    def counted(*args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(1.5)  # long enough that the other process asks while this one builds
        return build(*args, **kwargs)

    tokenize._tokenize_rows = counted
    tokenizer = load_builtin_tokenizer()
    template = load_template("plain", tokenizer, chat_data=False)
    _, rows = load_validated(data, None)
    open(f"{go}.{os.getpid()}", "w").close()  # ready
    while not os.path.exists(go):  # both processes start tokenizing together
        time.sleep(0.01)
    tokenized = tokenize.tokenize_rows(rows, "preference", tokenizer, template, 64, 32, cache=TokenCache(cache))
    print(json.dumps([[e["row_id"], e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in tokenized.examples]))
""")


def test_processes_sharing_a_cache_tokenize_once(tmp_path):
    data = [dict(BASE[i % 16], prompt=f"question number {i}") for i in range(1200)]
    path = write_jsonl(tmp_path / "train.jsonl", data)
    log = tmp_path / "built.log"
    # Started together once both have imported and loaded (each waits for the go file).
    first, second = run_two_together(tmp_path, WORKER, [str(path), str(tmp_path / "cache"), str(log), str(tmp_path / "go")],
                                     {"TOKENIZERS_PARALLELISM": "false"})
    assert len(log.read_text().split()) == 1  # one process tokenized; the other waited and read its entry
    assert first == second and len(first) == 1200
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_compact_examples_read_text_label_and_margin_from_their_rows(tmp_path):
    from aligner.data.templates import load_template
    from aligner.data.tokenize import tokenize_rows
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    template = load_template("plain", tokenizer, chat_data=False)
    rows = [dict(r, completion=r["chosen"], label=i % 2 == 0) for i, r in enumerate(preference_rows(16))]
    for r in rows:
        del r["chosen"], r["rejected"]
    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    _, loaded = load_validated(str(path), "unpaired")
    examples = tokenize_rows(loaded, "unpaired", tokenizer, template, 64, 32, cache=False).examples
    assert [e["label"] for e in examples] == [i % 2 == 0 for i in range(16)]
    assert [e["prompt"] for e in examples] == [r["prompt"] for r in rows]
    assert examples.row_ids.dtype == np.int64 and "margin" not in examples[0]


def test_held_out_split_and_chosen_as_sft_keep_rows_compact(tmp_path):
    from aligner.training.stages import chosen_as_sft, split_eval

    data = [dict(BASE[i % 16], prompt=f"q{i}") for i in range(50)]
    path = write_jsonl(tmp_path / "train.jsonl", data)
    _, rows = load_validated(str(path), None)
    listed = list(rows)
    train, held = split_eval(rows, 0.2, seed=5)
    assert isinstance(train, Rows) and isinstance(held, Rows) and len(held) == 10
    assert (train, held) == split_eval(listed, 0.2, seed=5)  # the same rows as the list-based split
    sft = chosen_as_sft(held)
    assert isinstance(sft, Rows) and sft == chosen_as_sft(list(held))
    assert sft[0].data == {"prompt": held[0].data["prompt"], "completion": held[0].data["chosen"]}
    assert sft[0].location == held[0].location
    # a split re-encodes its own rows only, not the whole source's (2x the memory for large sets before)
    assert sum(len(block) for block in sft.blocks) == len(held) == 10
    train_sft = chosen_as_sft(train)
    assert sum(len(block) for block in train_sft.blocks) == 40
    assert [r.location for r in train_sft] == [r.location for r in train]
    assert [r.data["completion"] for r in train_sft] == [r.data["chosen"] for r in train]
