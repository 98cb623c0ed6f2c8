"""Data sources: local files and folders, hub ids (against a folder laid out like a hub repo),
mixtures with weights or fractions, column mapping, and errors that name the config key."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from aligner.config import SourceConfig, dump_config, load_config
from aligner.data.loading import SourceReport, load_validated
from aligner.data.sources import mixture_counts
from aligner.errors import ConfigError, DataError

from .conftest import write_jsonl


def pairs(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def run_config(tmp_path: Path, train, **data) -> dict:
    return {"output_dir": str(tmp_path / "run"), "seed": 0, "model": {"tiny": {}}, "tokenizer": "builtin",
            "stages": [{"name": "dpo", "data": {"train": train, **data}, "losses": [{"name": "dpo"}]}]}


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def hub_repo(tmp_path):
    """A folder laid out like a hub dataset repo: parquet shards per split, two subsets named in the
    README's YAML header, as the hub's dataset viewer expects them."""
    import datasets

    repo = tmp_path / "org--prefs"
    (repo / "data").mkdir(parents=True)
    (repo / "small").mkdir()
    datasets.Dataset.from_list(pairs(6, "train")).to_parquet(str(repo / "data" / "train_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list(pairs(3, "test")).to_parquet(str(repo / "data" / "test_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list(pairs(2, "small")).to_parquet(str(repo / "small" / "train-00000-of-00001.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n    path: data/train_prefs-*\n"
        "  - split: test_prefs\n    path: data/test_prefs-*\n- config_name: small\n  data_files:\n"
        "  - split: train\n    path: small/train-*\n---\n# prefs\n")
    return repo


def test_hub_layout_folder_loads_split_and_subset_through_the_config(tmp_path, hub_repo):
    config = load_config(write_config(tmp_path, run_config(
        tmp_path, {"path": hub_repo.name, "split": "train_prefs"},
        eval={"path": hub_repo.name, "name": "small", "split": "train"})))
    data = config.stages[0].data
    assert data.train.path == str(hub_repo)  # resolved against the config's folder
    fmt, rows = load_validated(data.train, data.format, data.split)
    assert fmt == "preference" and [r.data["prompt"] for r in rows] == [f"train {i}" for i in range(6)]
    assert rows[2].location == f"{hub_repo}[train_prefs], row 2"
    _, rows = load_validated(data.eval, fmt, data.split)
    assert [r.data["prompt"] for r in rows] == ["small 0", "small 1"]


def test_unknown_split_names_the_key(tmp_path, hub_repo):
    config = load_config(write_config(tmp_path, run_config(tmp_path, {"path": str(hub_repo), "split": "validation"})))
    with pytest.raises(DataError, match=r"'stages\[0\].data.train.split' \(.*run.yaml, line \d+\): .* no split 'validation'"):
        load_validated(config.stages[0].data.train, None)


def test_uncached_hub_id_offline_is_a_clear_error_naming_the_key(tmp_path):
    config = load_config(write_config(tmp_path, run_config(tmp_path, "no-such-org/no-such-dataset")))
    source = config.stages[0].data.train
    assert isinstance(source, SourceConfig) and str(source) == "no-such-org/no-such-dataset"
    with pytest.raises(DataError) as err:
        load_validated(source, None)
    message = str(err.value)
    assert message.startswith("'stages[0].data.train' (")
    assert "hub dataset 'no-such-org/no-such-dataset' is not in the local cache" in message
    assert "\n" not in message


def test_missing_local_file_is_still_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"file not found for 'stages\[0\].data.train\[1\].path'"):
        load_config(run_config(tmp_path, [{"path": str(write_jsonl(tmp_path / "a.jsonl", pairs(2, "a")))},
                                          {"path": "missing.jsonl"}]))


def test_save_to_disk_folder_as_a_source(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs(2, "t")),
                          "test": datasets.Dataset.from_list(pairs(1, "e"))}).save_to_disk(str(tmp_path / "saved"))
    _, rows = load_validated(SourceConfig(path=str(tmp_path / "saved"), split="test"), None)
    assert [r.data["prompt"] for r in rows] == ["e 0"]


def test_column_mapping_renames_source_columns(tmp_path):
    path = write_jsonl(tmp_path / "ab.jsonl", [{"question": "q", "response_a": "yes", "response_b": "no", "id": 1}])
    source = SourceConfig(path=str(path), columns={"prompt": "question", "chosen": "response_a",
                                                   "rejected": "response_b"})
    fmt, rows = load_validated(source, None)
    assert fmt == "preference" and rows[0].data == {"prompt": "q", "chosen": "yes", "rejected": "no"}


def test_column_mapping_into_a_converter_layout(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"task": "Say hi.", "input": "", "answer": "Hi!"}])
    source = SourceConfig(path=str(path), format="alpaca", columns={"instruction": "task", "output": "answer"})
    fmt, rows = load_validated(source, None)
    assert fmt == "sft" and rows[0].data == {"prompt": "Say hi.", "completion": "Hi!"}


def test_bad_mapping_names_the_key_path_and_the_columns(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", pairs(2, "g"))
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": "q", "response_a": "a", "response_b": "b"}])
    config = load_config(write_config(tmp_path, run_config(tmp_path, [
        {"path": str(good)},
        {"path": str(other), "columns": {"prompt": "instrction", "chosen": "response_a", "rejected": "response_b"}}])))
    with pytest.raises(DataError) as err:
        load_validated(config.stages[0].data.train, None)
    assert str(err.value).startswith("'stages[0].data.train[1].columns.prompt' (")
    assert "has no column 'instrction'; its columns: instruction, response_a, response_b" in str(err.value)


def test_a_row_missing_a_mapped_column_is_located(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"q": "a", "chosen": "b", "rejected": "c"},
                                                 {"chosen": "b", "rejected": "c"}])
    config = load_config(run_config(tmp_path, {"path": str(path), "columns": {"prompt": "q"}}))
    with pytest.raises(DataError, match=r"rows.jsonl, line 2: no column 'q' \(mapped to 'prompt' by "
                                        r"'stages\[0\].data.train.columns.prompt'\)"):
        load_validated(config.stages[0].data.train, None)


def test_config_errors_inside_a_source_name_their_key(tmp_path):
    path = str(write_jsonl(tmp_path / "a.jsonl", pairs(2, "a")))
    with pytest.raises(ConfigError, match=r"unknown key 'stages\[0\].data.train\[1\].colums'.*did you mean 'columns'"):
        load_config(run_config(tmp_path, [{"path": path}, {"path": path, "colums": {}}]))
    with pytest.raises(ConfigError, match=r"'stages\[0\].data.train'.*a 'weight' .* or a 'fraction'"):
        load_config(run_config(tmp_path, [{"path": path, "weight": 1}, {"path": path, "fraction": 0.5}]))
    with pytest.raises(ConfigError, match=r"'stages\[0\].data.train\[0\].format'"):
        load_config(run_config(tmp_path, [{"path": path, "format": "shargpt"}]))


def test_mixture_counts_follow_weights_without_repeating_rows():
    # Shares 3/4 and 1/4: the first source runs out first (100 rows at 3/4 -> a mixture of 133).
    assert mixture_counts([100, 50], weights=[3, 1]) == [100, 33]
    assert mixture_counts([100, 50], weights=[1, 1]) == [50, 50]
    assert mixture_counts([10, 4], fractions=[0.5, 1.5]) == [5, 6]
    assert mixture_counts([10, 4]) == [10, 4]


def test_weighted_mixture_proportions_and_determinism(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(100, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", pairs(50, "b"))

    def mixture(seed: int) -> list[str]:
        config = load_config(run_config(tmp_path, [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]),
                             [f"seed={seed}"])
        reports: list[SourceReport] = []
        _, rows = load_validated(config.stages[0].data.train, None, sources=reports)
        assert [r.used for r in reports] == [100, 33]
        return [r.location for r in rows]

    first = mixture(0)
    assert Counter(loc.split(",")[0].rsplit("/", 1)[1] for loc in first) == {"a.jsonl": 100, "b.jsonl": 33}
    assert len(set(first)) == len(first)  # no row twice
    assert mixture(0) == first  # same seed, same rows in the same order
    assert mixture(1) != first


def test_fraction_above_one_repeats_and_max_rows_cuts_the_mixture(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(4, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", pairs(10, "b"))
    sources = [SourceConfig(path=str(a), fraction=1.5), SourceConfig(path=str(b), fraction=0.5)]
    _, rows = load_validated(sources, None, seed=0)
    counts = Counter(r.data["prompt"].split()[0] for r in rows)
    assert counts == {"a": 6, "b": 5}
    _, rows = load_validated(sources, None, seed=0, max_rows=3)
    assert len(rows) == 3


def test_mixture_sources_must_give_one_format(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(2, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "output": "r"}])
    config = load_config(run_config(tmp_path, [{"path": str(a)}, {"path": str(b)}]))
    with pytest.raises(DataError, match=r"'stages\[0\].data.train\[1\]': holds sft rows \(alpaca layout\), but the sources "
                                        r"before it hold preference rows"):
        load_validated(config.stages[0].data.train, None)


def test_sources_survive_the_written_config(tmp_path, hub_repo):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(2, "a"))
    config = load_config(run_config(tmp_path, [{"path": str(a), "weight": 2, "columns": {"prompt": "prompt"}},
                                               {"path": str(hub_repo), "split": "test_prefs", "weight": 1}]))
    dump_config(config, tmp_path / "written.yaml")
    again = load_config(tmp_path / "written.yaml")
    assert [s.model_dump() for s in again.stages[0].data.train] == [s.model_dump() for s in config.stages[0].data.train]
    plain = load_config(run_config(tmp_path, str(a)))
    dump_config(plain, tmp_path / "plain.yaml")
    assert yaml.safe_load((tmp_path / "plain.yaml").read_text())["stages"][0]["data"]["train"] == str(a)


def test_data_check_shows_each_source_with_its_layout_and_counts(tmp_path):
    from aligner.data.check import check_data, format_report

    a = write_jsonl(tmp_path / "a.jsonl", pairs(8, "a"))
    dialogue = "\n\nHuman: Hi {i}\n\nAssistant:"
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": dialogue.format(i=i) + " Hello.",
                                              "rejected": dialogue.format(i=i) + " Go."} for i in range(4)]
                     + [{"chosen": "no dialogue", "rejected": "here"}])
    config = run_config(tmp_path, [{"path": str(a), "weight": 1}, {"path": str(hh), "weight": 1}], template="plain")
    train = check_data(config)[0]
    assert [(s.layout, s.rows_read, s.rejected, s.valid, s.used) for s in train.sources] == [
        ("native", 8, 0, 8, 4), ("hh-rlhf", 5, 1, 4, 4)]
    text = format_report(train)
    assert f"{hh}: hh-rlhf -> preference rows, weight 1; 5 read, 1 rejected, 4 valid, 4 used" in text
    assert f"{hh}, line 5: 'chosen' and 'rejected' share no text" in text
    assert train.to_dict()["sources"][1]["layout"] == "hh-rlhf"


def test_in_memory_datasets_where_the_config_names_data(tmp_path):
    import datasets

    whole = datasets.Dataset.from_list(pairs(4, "mem"))
    split = datasets.DatasetDict({"train": whole, "test": datasets.Dataset.from_list(pairs(2, "held"))})
    config = load_config(run_config(tmp_path, [{"path": whole, "weight": 1},
                                               {"path": str(write_jsonl(tmp_path / "a.jsonl", pairs(4, "a"))),
                                                "weight": 1}],
                                    eval={"path": split, "split": "test"}))
    data = config.stages[0].data
    _, rows = load_validated(data.train, None)
    assert sorted(r.data["prompt"] for r in rows) == sorted([f"mem {i}" for i in range(4)] + [f"a {i}" for i in range(4)])
    assert any(r.location == "<in-memory dataset>, row 3" for r in rows)
    _, rows = load_validated(data.eval, "preference")
    assert [r.location for r in rows] == ["<in-memory dataset[test]>, row 0", "<in-memory dataset[test]>, row 1"]
    # Overrides re-validate the config: the dataset object survives; the written config names it.
    again = load_config(config, ["seed=3"])
    assert again.stages[0].data.eval.dataset is data.eval.dataset
    dump_config(config, tmp_path / "written.yaml")
    written = yaml.safe_load((tmp_path / "written.yaml").read_text())["stages"][0]["data"]["eval"]
    assert written == {"path": "<in-memory DatasetDict (train: 4 rows, test: 2 rows)>", "split": "test"}
    with pytest.raises(DataError, match=r"'stages\[0\].data.train.split': the in-memory DatasetDict has no split 'dev'"):
        load_validated(load_config(run_config(tmp_path, {"path": split, "split": "dev"})).stages[0].data.train, None)


def test_python_api_trains_on_an_in_memory_dataset(tmp_path):
    import datasets

    import aligner

    from .conftest import preference_rows, tiny_model

    config = run_config(tmp_path, datasets.Dataset.from_list(preference_rows(8)), template="plain", max_length=48)
    config["model"] = tiny_model()
    config["stages"][0]["train"] = {"max_steps": 1, "batch_size": 4}
    result = aligner.train(config)
    assert result.final_model_dir.exists()


def test_plain_string_naming_a_dataset_repo_folder(tmp_path, hub_repo):
    config = load_config(write_config(tmp_path, run_config(tmp_path, hub_repo.name, split="test_prefs")))
    data = config.stages[0].data
    assert data.train == str(hub_repo)
    _, rows = load_validated(data.train, None, data.split)
    assert [r.data["prompt"] for r in rows] == ["test 0", "test 1", "test 2"]


def test_an_in_memory_dataset_with_a_numpy_format_gives_plain_rows():
    """``ds.with_format("numpy")`` hands arrays out (a chat prompt as an array of messages); rows must
    still be what the row checks expect."""
    import datasets

    from aligner.config import SourceConfig
    from aligner.data.loading import load_validated

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a", "rejected": "b"} for i in range(3)]
    dataset = datasets.Dataset.from_list(rows).with_format("numpy")
    data_format, loaded = load_validated(SourceConfig.model_validate(dataset), None)
    assert data_format == "preference"
    assert loaded[0].data["prompt"] == [{"role": "user", "content": "q0"}]


def test_a_streamed_repo_folder_gives_the_same_located_rows_and_max_rows_stops_the_stream(tmp_path, hub_repo,
                                                                                         monkeypatch):
    """``streaming: true`` reads through datasets' streaming (nothing prepared in its cache folder): the
    rows and their locations are those of the loaded dataset, and ``max_rows`` fetches only that many."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    source = {"path": str(hub_repo), "split": "train_prefs", "streaming": True}
    config = load_config(write_config(tmp_path, run_config(tmp_path, source)))
    fmt, rows = load_validated(config.stages[0].data.train, None)
    assert fmt == "preference" and [r.data["prompt"] for r in rows] == [f"train {i}" for i in range(6)]
    assert rows[2].location == f"{hub_repo}[train_prefs], row 2"
    _, first = load_validated(config.stages[0].data.train, None, max_rows=2)
    assert [r.data["prompt"] for r in first] == ["train 0", "train 1"]
    assert not list(cache.rglob("*.arrow")), "streaming must not prepare an Arrow copy in the datasets cache"


def test_streaming_a_local_file_is_refused_naming_the_key(tmp_path):
    rows = write_jsonl(tmp_path / "pairs.jsonl", pairs(2, "x"))
    config = load_config(write_config(tmp_path, run_config(tmp_path, {"path": str(rows), "streaming": True})))
    with pytest.raises(DataError, match=r"'stages\[0\].data.train.streaming' .*: streaming applies to hub ids"):
        load_validated(config.stages[0].data.train, None)
