"""The validated-rows cache (aligner.data.rows_cache): a second load maps the rows from an Arrow file
instead of parsing and validating the source, with the same rows, locations, reports and errors."""

from __future__ import annotations

import json
import logging
import os
import textwrap
import time
from pathlib import Path

import pytest

from aligner.config import SourceConfig
from aligner.data import loading, rows_cache, sources
from aligner.data.loading import load_validated
from aligner.errors import DataError

from .concurrent_workers import run_two_together
from .conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Every file is cached (no size floor), in a folder of this test's own."""
    monkeypatch.setattr(rows_cache, "MIN_BYTES", 0)
    monkeypatch.setenv("ALIGNER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ALIGNER_TOKEN_CACHE", raising=False)
    return tmp_path / "cache" / "tokenized"


def pairs(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def with_bad_lines(path: Path, n: int = 40) -> Path:
    """``n`` good rows, then a line that is not JSON and a row missing a field, then more good rows."""
    lines = [json.dumps(r) for r in pairs(n)]
    lines.insert(10, "{not json")
    lines.insert(20, json.dumps({"prompt": "no answers"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def no_parsing(monkeypatch) -> None:
    """Make any read or validation of a source fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the source was parsed again")

    monkeypatch.setattr(sources, "_iter_jsonl", refuse)
    monkeypatch.setattr(sources, "_read_with_datasets", refuse)
    monkeypatch.setattr(loading, "validate_row", refuse)


def load_checked(source, data_format=None, **kwargs):
    errors, reports = [], []
    fmt, rows = load_validated(source, data_format, collect_errors=errors, sources=reports, **kwargs)
    return fmt, rows, errors, [r.describe() for r in reports]


def test_second_load_maps_the_rows_without_parsing(tmp_path, cache_dir, monkeypatch):
    path = with_bad_lines(tmp_path / "train.jsonl")
    cold = load_checked(str(path))
    assert len(cold[1]) == 40 and len(cold[2]) == 2
    assert list(cache_dir.glob("*.rows.arrow"))
    no_parsing(monkeypatch)
    warm = load_checked(str(path))
    assert warm[0] == cold[0] and warm[2] == cold[2] and warm[3] == cold[3]
    assert [(r.data, r.location) for r in warm[1]] == [(r.data, r.location) for r in cold[1]]
    assert warm[1][15].location == f"{path}, line 17"
    assert warm[2][0].message == f"{path}, line 11: not valid JSON: Expecting property name enclosed in double quotes (column 2)"
    assert warm[1].fingerprint() == cold[1].fingerprint()  # the token cache's key is unchanged


def test_a_clean_file_is_served_to_training_and_a_bad_one_still_stops_at_its_first_bad_row(tmp_path, cache_dir,
                                                                                            monkeypatch):
    clean = write_jsonl(tmp_path / "clean.jsonl", pairs(30))
    _, cold = load_validated(str(clean), None)
    bad = with_bad_lines(tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as first:
        load_validated(str(bad), None)
    checked = load_checked(str(bad))  # data check collects every bad row and writes the entry
    with pytest.raises(DataError) as again:  # training does not take an entry that holds rejected rows
        load_validated(str(bad), None)
    assert str(again.value) == str(first.value) == checked[2][0].message
    no_parsing(monkeypatch)
    _, warm = load_validated(str(clean), None)
    assert list(warm) == list(cold)


def test_editing_the_file_keeping_size_and_time_is_a_new_entry(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    _, before = load_validated(str(path), None)
    stat = path.stat()
    path.write_text(path.read_text().replace("good 7", "fine 7"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    _, after = load_validated(str(path), None)
    assert after[7].data["chosen"] == "fine 7" and before[7].data["chosen"] == "good 7"
    assert len(list(cache_dir.glob("*.rows.arrow"))) == 2


def test_options_that_change_the_rows_are_part_of_the_key(tmp_path, cache_dir, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl",
                       [{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs(20)])
    mapped = SourceConfig(path=str(path), columns={"prompt": "question"})
    renamed = SourceConfig(path=str(path), columns={"prompt": "question", "rejected": "chosen"})
    loads = [(mapped, None, None), (mapped, None, 5), (mapped, "prompt", None), (renamed, None, None)]

    def each():
        return [load_validated(source, fmt, max_rows=max_rows) for source, fmt, max_rows in loads]

    cold = each()
    assert len(list(cache_dir.glob("*.rows.arrow"))) == 4
    no_parsing(monkeypatch)
    warm = each()
    monkeypatch.undo()
    monkeypatch.setenv("ALIGNER_TOKEN_CACHE", "0")
    uncached = each()
    for a, b, c in zip(cold, warm, uncached, strict=True):
        assert a[0] == b[0] == c[0] and list(a[1]) == list(b[1]) == list(c[1])
    assert [len(r) for _, r in warm] == [20, 5, 20, 20] and warm[3][1][0].data["rejected"] == "good 0"
    with pytest.raises(DataError, match="missing field 'prompt'"):  # unmapped: not served the mapped rows
        load_validated(str(path), None)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, cache_dir, caplog, monkeypatch, damage):
    path = with_bad_lines(tmp_path / "train.jsonl")
    cold = load_checked(str(path))
    expected = list(cold[1])  # decoded now: the cold run's rows are the entry's mapped pages, damaged in place below
    del cold[1].blocks[0].buffer, cold[1].blocks[0].mapped  # (and a truncated mapping must not be read)
    (entry,) = cache_dir.glob("*.rows.arrow")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        at = data.index(b"question 33")
        data[at:at + 11] = b"question 99"
    elif damage == "truncate":
        del data[len(data) // 2:]
    else:
        data.clear()
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="aligner"):
        rebuilt = load_checked(str(path))
    assert "validated-rows cache entry" in caplog.text and "corrupt" in caplog.text
    assert rebuilt[2:] == cold[2:] and list(rebuilt[1]) == expected
    no_parsing(monkeypatch)  # the rebuilt entry is whole again
    assert list(load_checked(str(path))[1]) == expected


def test_no_lock_files_are_left(tmp_path, cache_dir):
    from aligner.data.templates import load_template
    from aligner.data.token_cache import TokenCache
    from aligner.data.tokenize import tokenize_rows
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    path = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    _, rows = load_validated(str(path), None)
    tokenizer = load_builtin_tokenizer()
    template = load_template("plain", tokenizer, chat_data=False)
    tokenize_rows(rows, "preference", tokenizer, template, 64, 32, cache=TokenCache(cache_dir))
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".arrow", ".safetensors"]


def test_the_lock_is_exclusive_though_its_file_is_removed(tmp_path):
    """Waiters on a lock file its holder removed lock again by name: never two holders at once."""
    from concurrent.futures import ThreadPoolExecutor

    from aligner.data.cache_files import locked

    inside, most = [0], [0]

    def work(_):
        with locked(tmp_path, "k"):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            inside[0] -= 1

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(work, range(30)))
    assert most[0] == 1 and list(tmp_path.iterdir()) == []


def test_cached_rows_are_memory_mapped(tmp_path, cache_dir):
    import pyarrow as pa

    path = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    load_validated(str(path), None)
    _, rows = load_validated(str(path), None)
    (block,) = rows.blocks
    assert isinstance(block.buffer, memoryview) and isinstance(block.buffer.obj, pa.Buffer)
    assert isinstance(block.mapped, pa.MemoryMappedFile)
    (entry,) = cache_dir.glob("*.rows.arrow")
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps here")
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(entry.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end))
    address = block.buffer.obj.address
    assert any(start <= address < end for start, end in regions)  # the rows are the file's own pages
    import copy
    import pickle

    assert list(pickle.loads(pickle.dumps(rows))) == list(copy.deepcopy(rows)) == list(rows)  # travels as bytes


def test_the_cache_follows_the_data_caches_switch(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("ALIGNER_TOKEN_CACHE", "off")
    path = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    load_validated(str(path), None)
    assert not cache_dir.exists() or not list(cache_dir.glob("*.rows.arrow"))


def test_small_files_are_not_cached(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(rows_cache, "MIN_BYTES", 1 << 20)
    path = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    load_validated(str(path), None)
    assert not cache_dir.exists()


def test_reports_match_for_a_converted_layout(tmp_path, cache_dir, monkeypatch):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"do {i}", "input": "", "output": f"done {i}"}
                                                   for i in range(12)])
    cold = load_checked(SourceConfig(path=str(path), format="alpaca"), "sft")
    no_parsing(monkeypatch)
    warm = load_checked(SourceConfig(path=str(path), format="alpaca"), "sft")
    assert warm[0] == cold[0] == "sft" and warm[3] == cold[3] and "alpaca" in warm[3][0]
    assert list(warm[1]) == list(cold[1])


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from aligner.data import loading, rows_cache
    from aligner.data.loading import load_validated

    data, log, go = sys.argv[1:4]
    rows_cache.MIN_BYTES = 0
    build = loading._read_and_validate

    def counted(*args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(1.5)  # long enough that the other process asks while this one reads
        return build(*args, **kwargs)

    loading._read_and_validate = counted
    open(f"{go}.{os.getpid()}", "w").close()  # ready
    while not os.path.exists(go):  # both processes load together
        time.sleep(0.01)
    _, rows = load_validated(data, None)
    print(json.dumps([[r.data, r.location] for r in rows]))
""")


def test_processes_sharing_a_cache_parse_once(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", pairs(300))
    log = tmp_path / "built.log"
    first, second = run_two_together(tmp_path, WORKER, [str(path), str(log), str(tmp_path / "go")],
                                     {"ALIGNER_CACHE_DIR": str(tmp_path / "cache")})
    assert len(log.read_text().split()) == 1  # one process parsed; the other waited and mapped its entry
    assert first == second and len(first) == 300 and first[0][1] == f"{path}, line 1"
    cache = tmp_path / "cache" / "tokenized"
    assert [p.name.endswith(".rows.arrow") for p in cache.iterdir()] == [True]  # no lock or temporary file left


def test_cache_command_lists_checks_and_clears_rows_and_token_entries(tmp_path, cache_dir, capsys):
    from aligner.cli import main
    from aligner.data.templates import load_template
    from aligner.data.token_cache import TokenCache
    from aligner.data.tokenize import tokenize_rows
    from aligner.modeling.tiny_tokenizer import load_builtin_tokenizer

    path = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    _, rows = load_validated(str(path), None)
    tokenizer = load_builtin_tokenizer()
    tokenize_rows(rows, "preference", tokenizer, load_template("plain", tokenizer, chat_data=False), 64, 32,
                  cache=TokenCache(cache_dir))
    (cache_dir / ".left-by-a-dead-process.lock").write_bytes(b"")
    assert main(["cache", "list", "--kind", "data", "--dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and f"rows of {path}: 30 preference rows" in out and "token ids: 30 preference" in out
    (entry,) = cache_dir.glob("*.rows.arrow")
    key = entry.name[:-len(".rows.arrow")]
    assert main(["cache", "info", key[:12], "--kind", "data", "--dir", str(cache_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "ok" and info["kind"] == "rows" and info["rows"] == 30 and info["source"] == str(path)
    entry.write_bytes(entry.read_bytes()[:100])
    assert main(["cache", "info", key[:12], "--kind", "data", "--dir", str(cache_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "corrupt"
    assert main(["cache", "clear", "--kind", "data", "--dir", str(cache_dir)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert list(cache_dir.iterdir()) == []
