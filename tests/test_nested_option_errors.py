"""Plugins named inside other plugins' options (a judge in an algorithm, a reward source's judge, an
advantage estimator, a generation engine, the judge of ``aligner label``) report a bad option with its
full key path, the file and line it was written on, and the nearest valid key: one line, exit code 2.
Judges that ask for the policy's tokenizer (``set_tokenizer``) get it in training and in ``aligner label``.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
from pydantic import field_validator

import aligner
from aligner.cli import main
from aligner.hookspecs import hookimpl
from aligner.plugins import temporary_plugin
from aligner.protocols import Options

from .conftest import QUICKSTART_DATA, write_jsonl

PROMPTS = QUICKSTART_DATA / "prompts_train.jsonl"
TINY = "{tiny: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}"


def run(capsys, *argv: str) -> str:
    """The one error line of ``aligner ARGV``, which must exit 2 without a traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aligner: error: ")
    return lines[0].removeprefix("aligner: error: ")


def online_yaml(tmp_path, algorithm: str, eval_block: str = "", losses: str = "") -> str:
    """A one-stage online run config; ``algorithm`` is the YAML of the algorithm mapping's body."""
    text = textwrap.dedent("""\
        output_dir: {out}
        model: {tiny}
        tokenizer: builtin
        stages:
          - name: online
            data:
              train: {prompts}
              template: plain
            algorithm:
        {algorithm}
        {losses}{eval_block}    train: {{max_steps: 1, batch_size: 4}}
        """).format(out=tmp_path / "run", tiny=TINY, prompts=PROMPTS, algorithm=textwrap.indent(algorithm, " " * 6),
                    losses=losses, eval_block=eval_block)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def line_of(path: str, fragment: str) -> int:
    """The 1-based line of the file holding ``fragment``."""
    lines = open(path).read().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if fragment in line)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "rloo"])
def test_a_typo_in_an_algorithms_judge_names_path_file_line_and_suggestion(algorithm, tmp_path, capsys):
    path = online_yaml(tmp_path, f"name: {algorithm}\njudge:\n  name: rule\n  regx: e\n")
    message = run(capsys, "train", path)
    assert message == (f"unknown option 'stages[0].algorithm.judge.regx' for 'rule' ({path}, line "
                       f"{line_of(path, 'regx')}) (did you mean 'regex'?)")
    assert not (tmp_path / "run").exists()


def test_a_typo_in_online_dpos_judge(tmp_path, capsys):
    path = online_yaml(tmp_path, "name: online_dpo\njudge: {name: rule, regex: e, tempreature: 1}\n",
                       losses="    losses: [{name: dpo}]\n")
    message = run(capsys, "train", path)
    assert message == (f"unknown option 'stages[0].algorithm.judge.tempreature' for 'rule' ({path}, line "
                       f"{line_of(path, 'tempreature')})")


def test_an_unknown_nested_judge_and_a_missing_option_are_located(tmp_path, capsys):
    path = online_yaml(tmp_path, "name: grpo\njudge:\n  name: rul\n")
    message = run(capsys, "train", path)
    assert message.startswith(f"unknown judge 'rul' at 'stages[0].algorithm.judge' ({path}, line "
                              f"{line_of(path, 'name: rul')}) (did you mean 'rule'?); known: ")
    judge_dir = tmp_path / "judge"
    judge_dir.mkdir()
    (judge_dir / "config.json").write_text("{}")
    path = online_yaml(tmp_path, f"name: grpo\njudge:\n  name: reward_model\n  pth: {judge_dir}\n")
    message = run(capsys, "train", path)
    assert message == (f"missing required option 'stages[0].algorithm.judge.path' for 'reward_model' ({path}, line "
                       f"{line_of(path, 'judge:')}); unknown option 'stages[0].algorithm.judge.pth' for "
                       f"'reward_model' ({path}, line {line_of(path, 'pth:')}) (did you mean 'path'?)")


def test_a_bad_value_in_a_nested_judge_is_located(tmp_path, capsys):
    path = online_yaml(tmp_path, "name: grpo\njudge: {name: rule, regex: '('}\n")
    message = run(capsys, "train", path)
    assert message.startswith(f"invalid value for 'stages[0].algorithm.judge.regex' ({path}, line "
                              f"{line_of(path, 'judge:')}): ")


def test_typos_in_reward_sources_and_their_judges(tmp_path, capsys):
    rewards = ("name: grpo\nrewards:\n  - judge: {name: rule, regex: e}\n"
               "  - function: aligner.quickstart.task:behaviour_score\n    wieght: 2\n")
    path = online_yaml(tmp_path, rewards)
    assert run(capsys, "train", path) == (f"unknown option 'stages[0].algorithm.rewards[1].wieght' for 'grpo' "
                                          f"({path}, line {line_of(path, 'wieght')}) (did you mean 'weight'?)")
    rewards = ("name: grpo\nrewards:\n  - function: aligner.quickstart.task:behaviour_score\n"
               "  - judge:\n      name: rule\n      regexx: e\n")
    path = online_yaml(tmp_path, rewards)
    assert run(capsys, "train", path) == (f"unknown option 'stages[0].algorithm.rewards[1].judge.regexx' for 'rule' "
                                          f"({path}, line {line_of(path, 'regexx')}) (did you mean 'regex'?)")


def test_typos_in_held_out_reward_sources(tmp_path, capsys):
    eval_block = ("    eval:\n      generate:\n        rewards:\n          - judge: {name: rule, regex: e}\n"
                  "            wieght: 1\n")
    path = online_yaml(tmp_path, "name: grpo\njudge: {name: rule, regex: e}\n", eval_block=eval_block)
    assert run(capsys, "train", path) == (
        f"unknown option 'stages[0].eval.generate.rewards[0].wieght' for 'reward source' ({path}, line "
        f"{line_of(path, 'wieght')}) (did you mean 'weight'?)")
    eval_block = ("    eval:\n      generate:\n        rewards:\n          - judge:\n              name: rule\n"
                  "              regexx: e\n")
    path = online_yaml(tmp_path, "name: grpo\njudge: {name: rule, regex: e}\n", eval_block=eval_block)
    assert run(capsys, "train", path) == (
        f"unknown option 'stages[0].eval.generate.rewards[0].judge.regexx' for 'rule' ({path}, line "
        f"{line_of(path, 'regexx')}) (did you mean 'regex'?)")


def test_typos_in_an_estimator_and_an_engine(tmp_path, capsys):
    path = online_yaml(tmp_path, "name: grpo\njudge: {name: rule, regex: e}\nestimator: {name: group_relative, "
                                 "scael: batch}\n")
    assert run(capsys, "train", path) == (
        f"unknown option 'stages[0].algorithm.estimator.scael' for 'group_relative' ({path}, line "
        f"{line_of(path, 'scael')}) (did you mean 'scale'?)")
    path = online_yaml(tmp_path, "name: grpo\njudge: {name: rule, regex: e}\nengine:\n  name: hf\n  bogus: 1\n")
    assert run(capsys, "train", path) == (
        f"unknown option 'stages[0].algorithm.engine.bogus' for 'hf' ({path}, line {line_of(path, 'bogus')})")


class WrappingJudge:
    """A judge whose options hold another judge: problems two plugins deep are located too."""

    name = "wrapping"

    class Options(Options):
        inner: dict[str, Any]

        @field_validator("inner")
        @classmethod
        def _inner_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
            from aligner.online.rewards import build_judge

            build_judge(value)
            return value

    def __init__(self, options):
        self.options = options

    def score(self, prompts, completions):
        return [0.0] * len(completions)


class WrappingPlugin:
    @hookimpl
    def register_judges(self, register):
        register(WrappingJudge)


def test_a_judge_inside_a_judge_is_located(tmp_path, capsys):
    path = online_yaml(tmp_path, "name: grpo\njudge:\n  name: wrapping\n  inner:\n    name: rule\n    regx: e\n")
    with temporary_plugin(WrappingPlugin(), "wrapping"):
        message = run(capsys, "train", path)
    assert message == (f"unknown option 'stages[0].algorithm.judge.inner.regx' for 'rule' ({path}, line "
                       f"{line_of(path, 'regx')}) (did you mean 'regex'?)")


def test_outside_a_config_file_the_error_still_names_the_keys():
    from aligner.errors import OptionProblems
    from aligner.online.rewards import build_judge

    with pytest.raises(OptionProblems) as info:
        build_judge({"name": "rule", "regx": "e"})
    assert isinstance(info.value, ValueError)
    assert str(info.value) == "judge.regx: Extra inputs are not permitted"


# ---------------------------------------------------------------------------------------------
# aligner label and aligner revise
# ---------------------------------------------------------------------------------------------


def label_yaml(tmp_path, body: str) -> str:
    path = tmp_path / "label.yaml"
    path.write_text(f"output: {tmp_path / 'out.jsonl'}\nmodel: {TINY}\ntokenizer: builtin\nprompts: {PROMPTS}\n"
                    + body)
    return str(path)


def test_a_typo_in_a_label_configs_judge(tmp_path, capsys):
    path = label_yaml(tmp_path, "judge:\n  name: rule\n  regx: e\n")
    assert run(capsys, "label", path) == (f"unknown option 'judge.regx' for 'rule' ({path}, line "
                                          f"{line_of(path, 'regx')}) (did you mean 'regex'?)")
    path = label_yaml(tmp_path, "judge: {name: rul}\n")
    assert run(capsys, "label", path).startswith(f"unknown judge 'rul' at 'judge' ({path}, line "
                                                 f"{line_of(path, 'judge')}) (did you mean 'rule'?)")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_typo_in_a_label_configs_keys(tmp_path, capsys):
    path = label_yaml(tmp_path, "judge: {name: rule, regex: e}\nnum_completion: 3\n")
    assert run(capsys, "label", path) == (f"unknown key 'num_completion' ({path}, line "
                                          f"{line_of(path, 'num_completion')}) (did you mean 'num_completions'?)")
    path = label_yaml(tmp_path, "judge: {name: rule, regex: e}\nnum_completions: 1\n")
    assert run(capsys, "label", path).startswith(f"invalid value for 'num_completions' ({path}, line "
                                                 f"{line_of(path, 'num_completions')}): ")


def test_typos_in_a_revise_config(tmp_path, capsys):
    path = tmp_path / "revise.yaml"
    path.write_text(f"output: {tmp_path / 'out.jsonl'}\nmodel: {TINY}\ntokenizer: builtin\nprompts: {PROMPTS}\n"
                    "roundz: 2\n")
    assert run(capsys, "revise", str(path)) == f"unknown key 'roundz' ({path}, line 5) (did you mean 'rounds'?)"
    path.write_text(f"output: {tmp_path / 'out.jsonl'}\nmodel:\n  pth: x\ntokenizer: builtin\nprompts: {PROMPTS}\n")
    assert run(capsys, "revise", str(path)) == f"unknown key 'model.pth' ({path}, line 3) (did you mean 'path'?)"


# ---------------------------------------------------------------------------------------------
# Judges that ask for the policy's tokenizer
# ---------------------------------------------------------------------------------------------


class TokenCountingJudge:
    """Scores a completion by its number of policy tokens: it needs the policy's tokenizer."""

    name = "token_counting"
    instances: list[TokenCountingJudge] = []

    class Options(Options):
        pass

    def __init__(self, options):
        self.options = options
        self.tokenizer = None
        self.scored = 0
        TokenCountingJudge.instances.append(self)

    def set_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer

    def score(self, prompts, completions):
        assert self.tokenizer is not None, "score called before set_tokenizer"
        self.scored += len(completions)
        return [float(len(self.tokenizer(c, add_special_tokens=False)["input_ids"])) for c in completions]


class TokenCountingPlugin:
    @hookimpl
    def register_judges(self, register):
        register(TokenCountingJudge)


@pytest.fixture
def token_counting():
    TokenCountingJudge.instances.clear()
    with temporary_plugin(TokenCountingPlugin(), "token-counting"):
        yield TokenCountingJudge.instances


def test_judges_get_the_policys_tokenizer_in_training(tmp_path, token_counting):
    from .conftest import tiny_model
    from .test_online_algorithms import prompts

    config = {
        "output_dir": str(tmp_path / "run"), "seed": 0, "model": tiny_model(), "tokenizer": "builtin",
        "stages": [{
            "name": "grpo",
            "data": {"train": str(write_jsonl(tmp_path / "prompts.jsonl", prompts(8))),
                     "eval": str(write_jsonl(tmp_path / "held_out.jsonl", prompts(4, "prompts_eval.jsonl"))),
                     "template": "plain", "max_length": 48},
            "algorithm": {"name": "grpo", "group_size": 2, "max_new_tokens": 4, "sample_every": 100,
                          "rewards": [{"judge": {"name": "token_counting"}}]},
            "train": {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
            "eval": {"at_start": False, "generate": {"judge": {"name": "token_counting"}, "num_prompts": 2,
                                                     "max_new_tokens": 4}},
        }],
    }
    aligner.train(config)
    used = [judge for judge in token_counting if judge.scored]
    assert len(used) == 2  # the rollouts' judge and the held-out one
    for judge in used:
        assert judge.tokenizer is not None and judge.tokenizer("a b")["input_ids"]


def test_judges_get_the_sampling_models_tokenizer_in_label(tmp_path, token_counting):
    from aligner.commands.label import label, load_label_config

    path = tmp_path / "label.yaml"
    path.write_text(f"output: {tmp_path / 'out.jsonl'}\nmodel: {TINY}\ntokenizer: builtin\nprompts: {PROMPTS}\n"
                    "max_prompts: 2\njudge: {name: token_counting}\nnum_completions: 2\nmax_new_tokens: 4\n")
    counts = label(load_label_config(path))
    assert counts["labelled"] + counts["ties"] == 2
    used = [judge for judge in token_counting if judge.scored]
    assert len(used) == 1 and used[0].tokenizer is not None
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["provenance"]["judge"] == "token_counting"
