"""The rank estimator against hand-computed values, and used through the ``aligner`` CLI as a user would."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from aligner_rank_advantage import RankAdvantage, group_ranks

import aligner
from aligner.online.advantages import AdvantageInputs
from aligner.plugins import get_registry, reset_plugins

DATA = Path(aligner.__file__).parent / "quickstart" / "data"


def estimate(scores: list[float], group_ids: list[int], mask: torch.Tensor | None = None,
             token_rewards: torch.Tensor | None = None, **options: float):
    """The rank estimator's output for a rollout batch with these scores and groups."""
    scores_t = torch.tensor(scores, dtype=torch.float64)
    if mask is None:
        mask = torch.ones(len(scores), 3, dtype=torch.bool)
    inputs = AdvantageInputs(scores=scores_t, mask=mask, group_ids=torch.tensor(group_ids),
                             token_rewards=token_rewards)
    return RankAdvantage(RankAdvantage.Options(**options)).estimate(inputs)


def sequence_advantages(out) -> list[float]:
    """Each row's advantage, read from its first token (the estimator gives every token the same)."""
    return out.advantages[:, 0].tolist()


# --- (1) hand-computed values ----------------------------------------------------------------------


def test_ranks_map_to_a_centred_span_of_minus_one_to_one():
    # [0.1, 0.9, 0.5] -> ranks [0, 2, 1] -> r / 2 - 0.5 = [-0.5, 0.5, 0] -> x2 = [-1, 1, 0].
    out = estimate([0.1, 0.9, 0.5], [7, 7, 7])
    assert sequence_advantages(out) == pytest.approx([-1.0, 1.0, 0.0])


def test_ties_share_the_average_of_their_ranks():
    # [1, 1, 0]: ranks 1.5, 1.5, 0 -> 1.5 / 2 - 0.5 = 0.25 -> x2 = [0.5, 0.5, -1]; still centred.
    out = estimate([1.0, 1.0, 0.0], [0, 0, 0])
    assert sequence_advantages(out) == pytest.approx([0.5, 0.5, -1.0])
    assert out.metrics["advantages/tied_groups"].item() == 0.0


def test_only_the_order_matters_not_the_scale_or_an_outlier():
    plain = sequence_advantages(estimate([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0]))
    outlier = sequence_advantages(estimate([-1e6, 0.2, 0.3, 5e9], [0, 0, 0, 0]))
    assert plain == outlier == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])


def test_groups_are_ranked_separately_whatever_the_row_order_and_single_samples_get_zero():
    # Rows of four groups interleaved: group 1 is ranked, 5 and 4 have one sample, 9 is all tied.
    out = estimate([0.9, 3.0, 0.1, 2.0, 0.5, 2.0, 4.0, 2.0], [1, 5, 1, 9, 1, 9, 4, 9])
    adv = sequence_advantages(out)
    assert adv[0] == pytest.approx(1.0) and adv[2] == pytest.approx(-1.0) and adv[4] == pytest.approx(0.0)
    assert adv[1] == 0.0  # group 5: one sample
    assert adv[6] == 0.0  # group 4: one sample
    assert adv[3] == adv[5] == adv[7] == 0.0  # group 9: all equal
    # Groups 5, 4 (one sample each) and 9 (all equal) are tied: 3 of 4 groups.
    assert out.metrics["advantages/tied_groups"].item() == pytest.approx(3 / 4)


def test_a_batch_of_single_samples_is_all_zero():
    out = estimate([0.3, 0.7], [0, 1])
    assert out.advantages.abs().sum().item() == 0.0
    assert out.metrics["advantages/tied_groups"].item() == 1.0


def test_scale_sets_the_span():
    out = estimate([0.1, 0.9, 0.5], [0, 0, 0], scale=1.0)
    assert sequence_advantages(out) == pytest.approx([-0.5, 0.5, 0.0])


def test_advantages_are_broadcast_over_the_mask_and_zero_elsewhere():
    mask = torch.tensor([[True, True, False, False],
                         [True, True, True, True],
                         [True, False, False, False]])
    out = estimate([0.1, 0.9, 0.5], [0, 0, 0], mask=mask)
    expected = torch.tensor([[-1.0, -1.0, 0.0, 0.0],
                             [1.0, 1.0, 1.0, 1.0],
                             [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out.advantages, expected)
    assert out.returns is None


def test_per_token_rewards_are_part_of_what_is_ranked():
    # Equal scores, but the masked token rewards order the rows 2 > 0 > 1; the unmasked one is ignored.
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    token_rewards = torch.tensor([[0.0, -0.1], [-0.2, 100.0], [0.05, 0.0]], dtype=torch.float64)
    out = estimate([1.0, 1.0, 1.0], [0, 0, 0], mask=mask, token_rewards=token_rewards)
    assert sequence_advantages(out) == pytest.approx([0.0, -1.0, 1.0])


def test_a_nan_reward_makes_its_group_nan_so_the_non_finite_guard_sees_it():
    adv = sequence_advantages(estimate([0.1, float("nan"), 0.3, 0.4], [0, 0, 1, 1]))
    assert all(a != a for a in adv[:2])  # NaN
    assert adv[2:] == pytest.approx([-1.0, 1.0])


def test_group_ranks_averages_ties_within_each_group():
    ranks, sizes = group_ranks(torch.tensor([2.0, 1.0, 2.0, 2.0, 5.0]), torch.tensor([3, 3, 3, 8, 8]))
    assert ranks.tolist() == [1.5, 0.0, 1.5, 0.0, 1.0]
    assert sizes.tolist() == [3.0, 3.0, 3.0, 2.0, 2.0]


def test_options_reject_unknown_keys_and_a_non_positive_scale():
    with pytest.raises(ValueError, match="scal"):
        RankAdvantage.Options(scal=1)
    with pytest.raises(ValueError, match="greater than 0"):
        RankAdvantage.Options(scale=0)


# --- (2) the installed distribution registers it ----------------------------------------------------


@pytest.fixture
def autoloaded(monkeypatch):
    """Entry-point plugins loaded, as for a user (some test setups switch autoloading off)."""
    monkeypatch.delenv("ALIGNER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_plugins()
    yield
    reset_plugins()


def test_registered_through_its_entry_point(autoloaded):
    assert importlib.metadata.distribution("aligner-rank-advantage").entry_points.select(group="aligner")
    entry = get_registry("advantage estimator").entry("rank")
    assert entry.obj is RankAdvantage and entry.plugin == "rank_advantage"
    assert RankAdvantage.needs_critic is False


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m aligner ARGS`` in a fresh process, with the environment a CPU user would set."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ALIGNER_DISABLE_PLUGIN_AUTOLOAD", None)  # a user's environment loads entry points
    return subprocess.run([sys.executable, "-m", "aligner", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def test_aligner_plugins_json_lists_the_estimator_under_the_distribution(tmp_path):
    result = cli("plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["distribution"]: row for row in json.loads(result.stdout)}
    assert rows["aligner-rank-advantage"] == {
        "name": "rank_advantage", "source": "entry point", "distribution": "aligner-rank-advantage",
        "version": importlib.metadata.version("aligner-rank-advantage"),
        "registers": {"advantage estimator": ["rank"]},
    }


# --- (3), (4) a GRPO run that names it, through the CLI -----------------------------------------------


def write_config(tmp_path: Path, estimator: dict) -> Path:
    """Quickstart prompts (16 train, 8 eval) and a one-stage GRPO config on a tiny model."""
    paths = {}
    for split, rows in (("train", 16), ("eval", 8)):
        lines = (DATA / f"prompts_{split}.jsonl").read_text().splitlines()[:rows]
        paths[split] = tmp_path / f"prompts_{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    config = {
        "seed": 0,
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "tokenizer": "builtin",
        "stages": [{
            "name": "grpo",
            "data": {"train": str(paths["train"]), "eval": str(paths["eval"]), "template": "plain",
                     "max_length": 48},
            "algorithm": {"name": "grpo", "judge": {"name": "rule", "regex": "e"}, "group_size": 4,
                          "max_new_tokens": 8, "estimator": estimator},
            "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
        }],
    }
    path = tmp_path / "grpo_rank.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_aligner_train_with_a_grpo_stage_using_rank_trains(tmp_path):
    out = tmp_path / "out"
    result = cli("train", str(write_config(tmp_path, {"name": "rank"})), "--output-dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert 0.0 <= record["advantages/tied_groups"] <= 1.0


def test_a_misspelt_option_is_a_config_error_naming_it(tmp_path):
    out = tmp_path / "out"
    result = cli("train", str(write_config(tmp_path, {"name": "rank", "scal": 1})), "--output-dir", str(out),
                 cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "scal" in result.stderr
    assert not (out / "metrics.jsonl").exists()
