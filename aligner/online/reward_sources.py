"""Reward sources: judges and reward functions, weighted, logged one by one, with located errors.

An online algorithm's ``rewards:`` lists its sources; each is a judge plugin (``judge: {name: ...}``)
or a reward function (``function: package.module:name``) with a ``weight`` and, for functions,
``options`` passed as keyword arguments. A reward function is called once per rollout batch, in the
convention TRL's GRPO trainer also uses, so functions written for it work here:

    fn(prompts, completions, completion_ids, **columns_and_options) -> list[float | None]

``columns_and_options`` holds, for every other column of the prompt rows (``answer``, ...), a list
with one value per sample (``None`` where a row lacks the column), and the source's ``options``.
``None`` means the source does not apply to that sample: the sample's reward is the weighted sum
of the sources that apply. ``async def`` functions are awaited. A source that raises, returns the
wrong type or length, a non-finite number, or takes longer than ``reward_timeout`` seconds stops
the run with an error naming the source and the row; a sample no source applies to is an error too.
With ``normalize_rewards`` each source's values are standardised over the batch before weighting,
so sources on different scales weigh as their weights say.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator

from aligner.errors import AlignerError, OptionProblems
from aligner.protocols import Options


class RewardError(AlignerError):
    """A reward source failed, timed out or returned something that is not one number per sample."""


class RewardSourceConfig(Options):
    """One entry of ``rewards:``: a judge plugin or a reward function, and its weight."""

    name: str | None = Field(None, description="the name metrics use; default: the judge's or function's name")
    judge: dict[str, Any] | None = Field(None, description="a judge plugin: {name: ..., <options>}")
    function: str | None = Field(None, description="a reward function: 'package.module:function'")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the function")
    weight: float = 1.0

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.judge is None) == (self.function is None):
            raise ValueError("set exactly one of 'judge' and 'function'")
        if self.judge is not None and self.options:
            raise ValueError("'options' are for functions; a judge's options go inside 'judge'")
        return self

    def label(self) -> str:
        """The source's name in metrics and messages."""
        if self.name:
            return self.name
        return self.judge["name"] if self.judge is not None else self.function.replace(":", ".").rsplit(".", 1)[-1]


@dataclass
class RewardBatch:
    """What the sources gave one rollout batch: the weighted total per sample and each source's values."""

    total: torch.Tensor
    raw: dict[str, list[float | None]]


class RewardSources:
    """The weighted reward sources of a stage (or of its held-out evaluation)."""

    def __init__(self, sources: list[RewardSourceConfig], normalize: bool = False, timeout: float | None = 60.0,
                 judges: dict[int, Any] | None = None):
        """``judges`` may hold already built judges by source index (else each is built from its config)."""
        from aligner.judges.rule import import_callable
        from aligner.online.rewards import build_judge

        self.normalize = normalize
        self.timeout = timeout
        self.names = [s.label() for s in sources]
        self.weights = [s.weight for s in sources]
        repeated = sorted({n for n in self.names if self.names.count(n) > 1})
        if repeated:
            raise ValueError(f"reward sources need distinct names; repeated: {', '.join(repeated)} (set 'name')")
        built = judges or {}
        self.judges: list[Any] = []  # the judge plugins among the sources, in order

        def judge_of(i: int, source: RewardSourceConfig) -> Any:
            try:
                judge = built.get(i) or build_judge(source.judge)
            except OptionProblems as exc:  # located by the config loader: rewards[i].judge.<key>
                raise exc.under(i, "judge", label="rewards") from None
            self.judges.append(judge)
            return judge

        self._call = [_judge_caller(judge_of(i, s)) if s.judge is not None
                      else _function_caller(import_callable(s.function, what="reward function"), s.options, name)
                      for i, (s, name) in enumerate(zip(sources, self.names, strict=True))]

    @classmethod
    def of_judge(cls, judge: Any, timeout: float | None = None) -> RewardSources:
        """One judge as the only source, weight 1, named after the judge."""
        return cls([RewardSourceConfig(judge={"name": judge.name})], timeout=timeout, judges={0: judge})

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Give the policy's tokenizer to every judge among the sources that asks for it
        (``aligner.judges.give_tokenizer``)."""
        from aligner.judges import give_tokenizer

        for judge in self.judges:
            give_tokenizer(judge, tokenizer)

    def score(self, prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
              columns: list[dict[str, Any]], locations: list[str]) -> RewardBatch:
        """Every source's values for the samples, their weighted sum, and per-source metrics.

        ``columns`` are each sample's row columns other than the prompt; ``locations`` say where each
        sample's prompt row is (``file, line N``), for error messages.
        """
        count = len(completions)
        raw: dict[str, list[float | None]] = {}
        for name, call in zip(self.names, self._call, strict=True):
            raw[name] = self._run(name, call, prompts, completions, completion_ids, columns, locations)
        total = [0.0] * count
        applied = [False] * count
        for weight, name in zip(self.weights, self.names, strict=True):
            for i, value in enumerate(self._used(raw[name])):
                if value is not None:
                    total[i] += weight * value
                    applied[i] = True
        missing = [i for i in range(count) if not applied[i]]
        if missing:
            raise RewardError(f"no reward source ({', '.join(self.names)}) applies to the sample of {locations[missing[0]]} "
                              f"(all returned None; {len(missing)} sample(s) like it)")
        return RewardBatch(torch.tensor(total, dtype=torch.float32), raw)

    def _used(self, values: list[float | None]) -> list[float | None]:
        return _standardised(values) if self.normalize else values

    def metrics(self, raw: dict[str, list[float | None]], prefix: str = "rewards/") -> dict[str, float]:
        """Per source: the mean raw value where it applies, the share it applies to, and its mean
        weighted contribution per sample (what it added to the total)."""
        metrics: dict[str, float] = {}
        for weight, name in zip(self.weights, self.names, strict=True):
            values = raw[name]
            present = [v for v in values if v is not None]
            metrics[f"{prefix}{name}/mean"] = sum(present) / len(present) if present else 0.0
            metrics[f"{prefix}{name}/applies"] = len(present) / max(len(values), 1)
            metrics[f"{prefix}{name}/weighted"] = weight * sum(v for v in self._used(values) if v is not None) / max(
                len(values), 1)
        return metrics

    def _run(self, name: str, call: Any, prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
             columns: list[dict[str, Any]], locations: list[str]) -> list[float | None]:
        """One source's values, checked; every failure names the source and a row."""
        try:
            values = _with_timeout(call, self.timeout, prompts, completions, completion_ids, columns)
        except concurrent.futures.TimeoutError:
            raise RewardError(f"reward source '{name}' took longer than {self.timeout:g} s (reward_timeout) on a batch "
                              f"of {len(completions)} samples, the first from {locations[0]}") from None
        except AlignerError:
            raise
        except Exception as exc:  # the user's code: locate it by the first row it fails on alone
            row = _first_failing_row(call, self.timeout, prompts, completions, completion_ids, columns)
            where = locations[row] if row is not None else f"a batch whose first sample is from {locations[0]}"
            raise RewardError(f"reward source '{name}' raised {type(exc).__name__}: {exc} (on the sample of {where})") \
                from exc
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, list | tuple) or len(values) != len(completions):
            got = f"a {type(values).__name__}" + (f" of {len(values)}" if isinstance(values, list | tuple) else "")
            raise RewardError(f"reward source '{name}' must return a list of {len(completions)} numbers or None (one per "
                              f"sample), got {got} (batch from {locations[0]})")
        checked: list[float | None] = []
        for i, value in enumerate(values):
            if value is None:
                checked.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RewardError(f"reward source '{name}' returned {value!r} ({type(value).__name__}) for the sample "
                                  f"of {locations[i]}; a reward is a number or None")
            if not math.isfinite(value):
                raise RewardError(f"reward source '{name}' returned {value} for the sample of {locations[i]}; rewards "
                                  "must be finite")
            checked.append(float(value))
        return checked


def give_judges_tokenizer(stage: Any, tokenizer: Any) -> None:
    """Hand the run's tokenizer to every judge of a prepared stage that asks for it (``Judge.set_tokenizer``):
    those scoring rollouts (an online algorithm's ``judge``/``rewards``) and held-out generations.
    Called once the algorithm is set up, before the first evaluation or step."""
    for sources in (getattr(stage.algorithm, "rewards", None), stage.eval_rewards):
        if isinstance(sources, RewardSources):
            sources.set_tokenizer(tokenizer)


def _judge_caller(judge: Any) -> Any:
    """A judge plugin as a source: it scores (prompt, completion) pairs and sees no row columns."""

    def call(prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
             columns: list[dict[str, Any]]) -> Any:
        return judge.score(prompts, completions)

    return call


def _function_caller(function: Any, options: dict[str, Any], name: str) -> Any:
    """A call of a reward function with the batch, its row columns (one list each) and its options."""

    def call(prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
             columns: list[dict[str, Any]]) -> Any:
        names = sorted({k for row in columns for k in row})
        clash = [n for n in names if n in options]
        if clash:
            raise RewardError(f"reward source '{name}': option(s) {', '.join(clash)} have the name of a data column "
                              "(rename the option or the column)")
        by_column = {n: [row.get(n) for row in columns] for n in names}
        result = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **by_column,
                          **options)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        return result

    return call


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _with_timeout(call: Any, timeout: float | None, *args: Any) -> Any:
    """``call(*args)``, or ``concurrent.futures.TimeoutError`` after ``timeout`` seconds.

    The call runs in a daemon thread so a hung function can hang neither the run nor the process's
    exit; it is left behind (Python cannot stop a thread) and the run stops with the error.
    """
    if timeout is None:
        return call(*args)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="aligner-reward-source", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise concurrent.futures.TimeoutError
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _first_failing_row(call: Any, timeout: float | None, prompts: list[Any], completions: list[str],
                       completion_ids: list[list[int]], columns: list[dict[str, Any]]) -> int | None:
    """The first sample on which the source fails (or times out) when called with it alone (None if none does)."""
    for i in range(len(completions)):
        try:
            _with_timeout(call, timeout, prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
                          columns[i:i + 1])
        except Exception:  # noqa: BLE001 - any failure locates the row
            return i
    return None


def _standardised(values: list[float | None]) -> list[float | None]:
    """Values shifted and scaled to mean 0 and std 1 over the samples the source applies to."""
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return [0.0 if v is not None else None for v in values]
    mean = sum(present) / len(present)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))
    return [None if v is None else (v - mean) / (std + 1e-8) for v in values]
