"""Weighted reward sources (``aligner/online/reward_sources.py``): judges and reward functions summed by
weight and logged one by one, row columns and options passed to functions, ``None`` as "does not apply",
located errors, async functions, per-source normalisation, the ``rewards:`` config and a GRPO run."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

import aligner
from aligner.config import load_config
from aligner.errors import ConfigError
from aligner.online.reward_sources import RewardError, RewardSourceConfig, RewardSources
from aligner.training.stages import prepare_stages

from .conftest import tiny_model, write_jsonl

HERE = "tests.test_reward_sources"
RULE_E = {"name": "rule", "regex": "e"}

# ---------------------------------------------------------------------------------------------
# Reward functions, referenced by dotted path ``tests.test_reward_sources:<name>``
# ---------------------------------------------------------------------------------------------

SEEN: list[dict] = []  # the keyword arguments of each call of ``record_arguments``


def word_count(completions, **_):
    return [float(len(c.split())) for c in completions]


def ids_length(completion_ids, **_):
    return [float(len(ids)) for ids in completion_ids]


def column_value(column, **kwargs):
    """The row column named by the ``column`` option, as the reward (None where the row lacks it)."""
    return [None if v is None else float(v) for v in kwargs[column]]


def record_arguments(prompts, completions, completion_ids, **kwargs):
    SEEN.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    return [0.0] * len(completions)


def answer_seen(completions, answer, **_):
    return [1.0 if a is not None and a in c else 0.0 for a, c in zip(answer, completions, strict=True)]


def fails_on_boom(completions, **_):
    if any("boom" in c for c in completions):
        raise ValueError("cannot score a boom")
    return [1.0] * len(completions)


def sleeps(completions, **_):
    time.sleep(2)
    return [1.0] * len(completions)


def returns_string(completions, **_):
    return "1.0"


def returns_one_too_few(completions, **_):
    return [1.0] * (len(completions) - 1)


def returns_nan(completions, **_):
    return [1.0, math.nan, 1.0]


def returns_bool(completions, **_):
    return [True, 1.0, 1.0]


async def async_length(completions, **_):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


def fn(function: str, **entry) -> RewardSourceConfig:
    return RewardSourceConfig(function=f"{HERE}:{function}", **entry)


def located(n: int) -> list[str]:
    return [f"data.jsonl, line {i + 1}" for i in range(n)]


def score(sources: RewardSources, completions: list[str], columns: list[dict] | None = None,
          completion_ids: list[list[int]] | None = None):
    n = len(completions)
    return sources.score([f"prompt {i}" for i in range(n)], completions,
                         completion_ids if completion_ids is not None else [[1]] * n,
                         columns if columns is not None else [{} for _ in range(n)], located(n))


# ---------------------------------------------------------------------------------------------
# 1. Weighted sum and per-source metrics; names
# ---------------------------------------------------------------------------------------------


def test_two_functions_and_a_judge_sum_by_weight_with_metrics_per_source():
    sources = RewardSources([fn("word_count", weight=0.5), fn("ids_length", weight=2.0),
                             RewardSourceConfig(judge=RULE_E, weight=3.0)])
    assert sources.names == ["word_count", "ids_length", "rule"]  # the function's name, the judge's name
    batch = score(sources, ["the cat", "a dog", "bee"], completion_ids=[[1, 2, 3], [4, 5], [6]])
    # word_count [2, 2, 1]; ids_length [3, 2, 1]; rule (contains "e") [1, 0, 1]
    assert batch.raw == {"word_count": [2.0, 2.0, 1.0], "ids_length": [3.0, 2.0, 1.0], "rule": [1.0, 0.0, 1.0]}
    # 0.5*2 + 2*3 + 3*1 = 10; 0.5*2 + 2*2 + 3*0 = 5; 0.5*1 + 2*1 + 3*1 = 5.5
    assert batch.total.tolist() == [10.0, 5.0, 5.5]
    metrics = sources.metrics(batch.raw)
    expected = {
        "rewards/word_count/mean": 5 / 3, "rewards/word_count/applies": 1.0,
        "rewards/word_count/weighted": 0.5 * 5 / 3,  # 0.5 * (2+2+1) / 3
        "rewards/ids_length/mean": 2.0, "rewards/ids_length/applies": 1.0,
        "rewards/ids_length/weighted": 4.0,  # 2 * (3+2+1) / 3
        "rewards/rule/mean": 2 / 3, "rewards/rule/applies": 1.0,
        "rewards/rule/weighted": 2.0,  # 3 * (1+0+1) / 3
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    # the weighted contributions add up to the mean total: 5/6 + 4 + 2 = 6.8333 = (10 + 5 + 5.5) / 3
    assert sum(v for k, v in metrics.items() if k.endswith("/weighted")) == pytest.approx(batch.total.mean().item())


def test_an_explicit_name_replaces_the_default_one():
    sources = RewardSources([fn("word_count", name="words"), RewardSourceConfig(judge=RULE_E, name="has_e")])
    assert sources.names == ["words", "has_e"]
    assert set(score(sources, ["e"]).raw) == {"words", "has_e"}


@pytest.mark.parametrize("entries", [
    [fn("column_value", options={"column": "a"}), fn("column_value", options={"column": "b"})],
    [RewardSourceConfig(judge=RULE_E), RewardSourceConfig(judge={"name": "rule", "regex": "a"})],
], ids=["functions", "judges"])
def test_sources_with_the_same_name_are_refused_with_a_hint_to_set_name(entries):
    with pytest.raises(ValueError, match=r"distinct names; repeated: (column_value|rule) \(set 'name'\)"):
        RewardSources(entries)


def test_a_source_is_exactly_one_of_judge_and_function():
    with pytest.raises(ValueError, match="exactly one of 'judge' and 'function'"):
        RewardSourceConfig(judge=RULE_E, function=f"{HERE}:word_count")
    with pytest.raises(ValueError, match="exactly one of 'judge' and 'function'"):
        RewardSourceConfig(weight=1.0)


# ---------------------------------------------------------------------------------------------
# 2. Row columns and options reach functions as keyword arguments
# ---------------------------------------------------------------------------------------------


def test_columns_arrive_as_lists_with_none_where_a_row_lacks_them_and_options_as_keywords():
    SEEN.clear()
    sources = RewardSources([fn("record_arguments", options={"scale": 3, "mode": "strict"})])
    columns = [{"answer": "x", "level": 1}, {"answer": "y"}, {}]
    score(sources, ["c0", "c1", "c2"], columns, completion_ids=[[1], [2, 3], [4]])
    assert SEEN == [{
        "prompts": ["prompt 0", "prompt 1", "prompt 2"], "completions": ["c0", "c1", "c2"],
        "completion_ids": [[1], [2, 3], [4]],
        "answer": ["x", "y", None], "level": [1, None, None],  # one value per sample, None where missing
        "scale": 3, "mode": "strict",
    }]


def test_an_option_named_like_a_data_column_is_an_error_naming_it():
    sources = RewardSources([fn("record_arguments", options={"answer": "z"})])
    with pytest.raises(RewardError, match=r"option\(s\) answer have the name of a data column"):
        score(sources, ["c0", "c1"], [{"answer": "x"}, {"answer": "y"}])


# ---------------------------------------------------------------------------------------------
# 3. None: the source does not apply to the sample
# ---------------------------------------------------------------------------------------------


def test_a_sample_reward_is_the_weighted_sum_of_the_sources_that_apply():
    sources = RewardSources([fn("column_value", name="a", options={"column": "a"}, weight=1.0),
                             fn("column_value", name="b", options={"column": "b"}, weight=0.5)])
    batch = score(sources, ["x", "y", "z"], [{"a": 1}, {"b": 10}, {"a": 1, "b": 10}])
    assert batch.raw == {"a": [1.0, None, 1.0], "b": [None, 10.0, 10.0]}
    # only a: 1*1 = 1; only b: 0.5*10 = 5; both: 1 + 5 = 6
    assert batch.total.tolist() == [1.0, 5.0, 6.0]
    metrics = sources.metrics(batch.raw)
    assert metrics["rewards/a/mean"] == 1.0  # over the 2 samples it applies to
    assert metrics["rewards/a/applies"] == pytest.approx(2 / 3)
    assert metrics["rewards/a/weighted"] == pytest.approx(2 / 3)  # 1 * (1 + 1) / 3 samples
    assert metrics["rewards/b/mean"] == 10.0
    assert metrics["rewards/b/weighted"] == pytest.approx(10 / 3)  # 0.5 * (10 + 10) / 3


def test_a_sample_no_source_applies_to_is_an_error_naming_its_location():
    sources = RewardSources([fn("column_value", name="a", options={"column": "a"}),
                             fn("column_value", name="b", options={"column": "b"})])
    with pytest.raises(RewardError, match=r"no reward source \(a, b\) applies to the sample of data\.jsonl, "
                                          r"line 3 \(all returned None; 1 sample"):
        score(sources, ["x", "y", "z"], [{"a": 1}, {"b": 2}, {"c": 3}])


# ---------------------------------------------------------------------------------------------
# 4. Located errors
# ---------------------------------------------------------------------------------------------


def test_a_function_raising_on_one_sample_is_located_at_that_sample():
    sources = RewardSources([fn("word_count"), fn("fails_on_boom")])
    with pytest.raises(RewardError) as caught:
        score(sources, ["fine", "also fine", "boom here", "fine again"])
    message = str(caught.value)
    assert message == ("reward source 'fails_on_boom' raised ValueError: cannot score a boom "
                       "(on the sample of data.jsonl, line 3)")  # the third sample alone fails
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_function_slower_than_the_timeout_is_stopped_with_a_located_error():
    sources = RewardSources([fn("sleeps")], timeout=0.2)
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"reward source 'sleeps' took longer than 0\.2 s \(reward_timeout\) on a "
                                          r"batch of 2 samples, the first from data\.jsonl, line 1"):
        score(sources, ["a", "b"])
    assert time.monotonic() - start < 1.0  # not the 2 s the function sleeps


@pytest.mark.parametrize(("function", "message"), [
    ("returns_string", r"'returns_string' must return a list of 3 numbers or None \(one per sample\), got a str "
                       r"\(batch from data\.jsonl, line 1\)"),
    ("returns_one_too_few", r"'returns_one_too_few' must return a list of 3 numbers or None \(one per sample\), "
                            r"got a list of 2 \(batch from data\.jsonl, line 1\)"),
    ("returns_nan", r"'returns_nan' returned nan for the sample of data\.jsonl, line 2; rewards must be finite"),
    ("returns_bool", r"'returns_bool' returned True \(bool\) for the sample of data\.jsonl, line 1; a reward is a "
                     r"number or None"),
])
def test_a_function_returning_something_other_than_one_number_per_sample_is_a_located_error(function, message):
    sources = RewardSources([fn(function)])
    with pytest.raises(RewardError, match=message):
        score(sources, ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------
# 5. async functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["in-thread", "worker-thread"])
def test_async_reward_functions_are_awaited(timeout):
    sources = RewardSources([fn("async_length", weight=2.0)], timeout=timeout)
    batch = score(sources, ["ab", "abcd"])
    assert batch.raw == {"async_length": [2.0, 4.0]}
    assert batch.total.tolist() == [4.0, 8.0]  # 2 * len


# ---------------------------------------------------------------------------------------------
# 6. normalize: each source standardised over the batch before weighting
# ---------------------------------------------------------------------------------------------


def test_normalize_standardises_each_source_over_the_batch_before_weighting():
    sources = RewardSources([fn("column_value", name="a", options={"column": "a"}, weight=1.0),
                             fn("column_value", name="b", options={"column": "b"}, weight=2.0)], normalize=True)
    columns = [{"a": 1, "b": 0}, {"a": 2, "b": 0}, {"a": 3, "b": 0}, {"a": 4, "b": 4}]
    batch = score(sources, ["w", "x", "y", "z"], columns)
    # a = [1, 2, 3, 4]: mean 2.5, population std sqrt((2.25+0.25+0.25+2.25)/4) = sqrt(1.25) = 1.118034
    #   -> [-1.5, -0.5, 0.5, 1.5] / 1.118034 = [-1.341641, -0.447214, 0.447214, 1.341641]
    # b = [0, 0, 0, 4]: mean 1, std sqrt((1+1+1+9)/4) = sqrt(3) = 1.732051
    #   -> [-1, -1, -1, 3] / 1.732051 = [-0.577350, -0.577350, -0.577350, 1.732051]
    # total = a + 2*b = [-2.496342, -1.601914, -0.707486, 4.805743]
    expected = [-2.496342, -1.601914, -0.707486, 4.805743]
    assert batch.total.tolist() == pytest.approx(expected, abs=1e-5)
    assert batch.raw == {"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0, 0.0, 0.0, 4.0]}  # raw values are kept
    metrics = sources.metrics(batch.raw)
    assert metrics["rewards/a/mean"] == 2.5 and metrics["rewards/b/mean"] == 1.0  # means of the raw values
    # the standardised values average 0, so neither source shifts the mean total
    assert metrics["rewards/a/weighted"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/b/weighted"] == pytest.approx(0.0, abs=1e-6)
    # without normalize: a + 2*b = [1, 2, 3, 12]
    plain = RewardSources([fn("column_value", name="a", options={"column": "a"}, weight=1.0),
                           fn("column_value", name="b", options={"column": "b"}, weight=2.0)])
    assert score(plain, ["w", "x", "y", "z"], columns).total.tolist() == [1.0, 2.0, 3.0, 12.0]


# ---------------------------------------------------------------------------------------------
# 7. The config layer
# ---------------------------------------------------------------------------------------------


def answer_rows(n: int = 8) -> list[dict]:
    answers = ["e", "o", "a", "t"]
    return [{"prompt": f"Tell me about thing number {i}.", "answer": answers[i % len(answers)]} for i in range(n)]


def grpo_config(tmp_path, rewards_or_judge: dict) -> dict:
    """A one-stage GRPO run over prompt rows with an ``answer`` column (copied from ``online_config``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return {
        "output_dir": str(tmp_path / "run"), "seed": 0, "model": tiny_model(), "tokenizer": "builtin",
        "stages": [{
            "name": "grpo",
            "data": {"train": str(write_jsonl(tmp_path / "prompts.jsonl", answer_rows())),
                     "template": "plain", "max_length": 48},
            "algorithm": {"name": "grpo", "group_size": 2, "max_new_tokens": 8, "sample_every": 100,
                          **rewards_or_judge},
            "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2},
        }],
    }


REWARDS = [{"function": f"{HERE}:answer_seen", "weight": 1.0}, {"judge": RULE_E, "weight": 0.5}]


@pytest.mark.parametrize(("algorithm", "message"), [
    ({"rewards": [{"function": "nope.module:fn"}]},
     r"'stages\[0\]\.algorithm\.rewards'.*'nope\.module:fn'.*No module named 'nope'"),
    ({"rewards": REWARDS, "judge": RULE_E},
     r"'stages\[0\]\.algorithm'.*set exactly one of 'judge' \(one judge\) and 'rewards'"),
    ({}, r"'stages\[0\]\.algorithm'.*set exactly one of 'judge' \(one judge\) and 'rewards'"),
    ({"rewards": []}, r"'stages\[0\]\.algorithm\.rewards'.*list at least one reward source"),
    ({"rewards": [{"judge": RULE_E}, {"judge": {"name": "rule", "regex": "a"}}]},
     r"'stages\[0\]\.algorithm\.rewards'.*repeated: rule \(set 'name'\)"),
], ids=["unimportable-function", "judge-and-rewards", "neither", "empty-rewards", "repeated-names"])
def test_bad_rewards_configs_are_config_errors_naming_the_option(tmp_path, algorithm, message):
    with pytest.raises(ConfigError, match=message):
        prepare_stages(load_config(grpo_config(tmp_path, algorithm)))


def test_a_valid_rewards_list_builds_the_weighted_sources(tmp_path):
    (stage,) = prepare_stages(load_config(grpo_config(tmp_path, {"rewards": REWARDS})))
    assert stage.algorithm.rewards.names == ["answer_seen", "rule"]
    assert stage.algorithm.rewards.weights == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# 8. End to end: a GRPO run with a reward function and a judge
# ---------------------------------------------------------------------------------------------


def test_grpo_run_logs_each_source_and_its_reward_is_their_weighted_sum(tmp_path):
    result = aligner.train(grpo_config(tmp_path, {"rewards": REWARDS}))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        for name in ("answer_seen", "rule"):
            assert record[f"rewards/{name}/applies"] == 1.0
            assert 0.0 <= record[f"rewards/{name}/mean"] <= 1.0
        # every source applies to every sample, so mean total = sum of weight * source mean
        expected = 1.0 * record["rewards/answer_seen/mean"] + 0.5 * record["rewards/rule/mean"]
        assert record["reward/mean"] == pytest.approx(expected, abs=1e-6)


def test_aligner_plot_draws_each_reward_source_in_its_own_panel():
    from aligner.commands.plot import panels_of

    keys = {"loss", "reward/mean", "rewards/correct/mean", "rewards/correct/applies", "rewards/format/mean",
            "eval/rewards/correct/mean", "rewards/chosen", "kl"}
    panels = dict(panels_of(keys))
    assert panels["reward sources"] == ["eval/rewards/correct/mean", "rewards/correct/mean", "rewards/format/mean"]
    assert "rewards/chosen" in panels["reward"]  # DPO's implicit rewards stay in the reward panel


def test_held_out_generations_are_scored_by_reward_sources_with_the_rows_columns(tmp_path):
    """``eval.generate.rewards``: each source's held-out mean (a verifier's: accuracy) and the weighted total."""
    config = grpo_config(tmp_path, {"rewards": REWARDS})
    stage = config["stages"][0]
    stage["data"]["eval"] = str(write_jsonl(tmp_path / "held_out.jsonl", answer_rows(4)))
    stage["eval"] = {"generate": {"rewards": [{"name": "seen", "function": f"{HERE}:answer_seen", "weight": 2.0}],
                                  "num_prompts": 4, "max_new_tokens": 8}}
    result = aligner.train(config)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval/reward" in r]
    assert [r["step"] for r in evaluations] == [0, 2]
    for record in evaluations:
        assert record["eval/reward"] == pytest.approx(2.0 * record["eval/rewards/seen/mean"])
    samples = [json.loads(x) for x in (result.output_dir / "grpo" / "samples" / "step-0.jsonl").read_text().splitlines()]
    assert all(s["seen"] == float(answer_rows(4)[i]["answer"] in s["completion"]) for i, s in enumerate(samples))


def test_eval_generate_needs_exactly_one_of_judge_and_rewards(tmp_path):
    config = grpo_config(tmp_path, {"rewards": REWARDS})
    stage = config["stages"][0]
    stage["data"]["eval"] = str(write_jsonl(tmp_path / "held_out.jsonl", answer_rows(4)))
    stage["eval"] = {"generate": {"num_prompts": 4}}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.eval\.generate.*set exactly one of 'judge' and 'rewards'"):
        load_config(config)
    stage["eval"] = {"generate": {"rewards": [{"function": "nope:fn"}]}}
    with pytest.raises(ConfigError, match=r"invalid reward source in 'stages\[0\]\.eval\.generate\.rewards'.*nope"):
        prepare_stages(load_config(config))
