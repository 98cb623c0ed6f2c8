"""Turning a stage's config into resolved plugins and validated data, before any model is loaded.

Everything a user can get wrong in a stage (an unknown loss, a bad option, a loss that cannot train
on the data's format, a bad row) is found here, so a run fails in seconds, not after loading weights.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from aligner.config import (
    PluginChoice,
    RunConfig,
    StageConfig,
    format_loc,
    key_where,
    validate_plugin_options,
)
from aligner.data.loading import Row, load_validated
from aligner.data.packing import check_packing
from aligner.data.tokenize import TokenizedData
from aligner.errors import ConfigError
from aligner.plugins import get_registry
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, Requires
from aligner.references import choose_reference

log = logging.getLogger("aligner")


@dataclass
class PreparedStage:
    """A stage with its plugins instantiated and its rows validated (not yet tokenized)."""

    index: int
    config: StageConfig
    data_format: str
    algorithm: Any
    losses: list[tuple[Any, float]]
    reference_name: str
    reference: Any
    peft: Any
    eval_rewards: Any | None  # what scores held-out generations (``eval.generate``): RewardSources
    train_rows: list[Row]
    eval_rows: list[Row]
    train_data: TokenizedData | None = None
    eval_data: TokenizedData | None = None
    optimizer: Any = None  # the optimizer plugin (``stages[i].optimizer``); set by ``prepare_stage``

    @property
    def name(self) -> str:
        """The stage's name from the config."""
        return self.config.name

    @property
    def losses_need_reference(self) -> bool:
        """Whether any loss of the stage reads reference log-probs (an online algorithm's KL term may
        need the reference too: ``algorithm.needs_reference``)."""
        return any(loss.needs_reference for loss, _ in self.losses)

    @property
    def needs_token_logps(self) -> bool:
        """Whether any loss asked for per-token log-probs."""
        return any(getattr(loss, "needs_token_logps", False) for loss, _ in self.losses)

    @property
    def needs_kl_completions(self) -> bool:
        """Whether any loss reads log-probs of mismatched prompt/completion pairs (KTO's KL estimate)."""
        return any(getattr(loss, "needs_kl_completions", False) for loss, _ in self.losses)

    @property
    def forward_kind(self) -> str:
        """How the model runs on a batch (``aligner.training.micro_batch.FORWARDS``); the same for all its losses."""
        return forward_kind_of([loss for loss, _ in self.losses])


def forward_kind_of(losses: list[Any], where: str = "") -> str:
    """The one ``forward_kind`` the losses share (``logprobs`` unless declared, or without losses); a
    ConfigError if they differ."""
    kinds = {getattr(loss, "forward_kind", "logprobs") for loss in losses} or {"logprobs"}
    if len(kinds) > 1:
        detail = ", ".join(f"{loss.name}: {getattr(loss, 'forward_kind', 'logprobs')}" for loss in losses)
        raise ConfigError(f"{where}losses that need different model forwards cannot share a stage ({detail})")
    return kinds.pop()


def instantiate(kind: str, choice: PluginChoice, loc: tuple, config: RunConfig) -> Any:
    """Look up ``choice.name`` in the ``kind`` registry and build it with its validated options."""
    line = config.origin.where((*loc, "name"))
    cls = get_registry(kind).get(choice.name, where=_where(loc) + line)
    options = validate_plugin_options(cls.Options, choice, loc, config)
    return cls(options)


def _eval_rewards(generate: Any, loc: tuple, config: RunConfig) -> Any:
    """The reward sources that score held-out generations: the one judge, or the listed ``rewards``."""
    from pydantic import ValidationError

    from aligner.errors import AlignerError
    from aligner.online.reward_sources import RewardSourceConfig, RewardSources

    if generate.judge is not None:
        return RewardSources.of_judge(instantiate("judge", generate.judge, (*loc, "judge"), config))
    where = f"'{format_loc((*loc, 'rewards'))}'" + config.origin.where((*loc, "rewards"))
    try:
        return RewardSources([RewardSourceConfig.model_validate(r) for r in generate.rewards], timeout=None)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                           for e in exc.errors())
        raise ConfigError(f"invalid reward source in {where}: {detail}") from None
    except (AlignerError, ValueError) as exc:
        raise ConfigError(f"invalid reward source in {where}: {exc}") from None


def _refuse_algorithm_as_loss(choice: PluginChoice, loc: tuple, config: RunConfig) -> None:
    """``losses: [{name: ppo}]``: an algorithm named where a loss goes gets told where it belongs."""
    if choice.name in get_registry("loss") or choice.name not in get_registry("algorithm"):
        return
    line = config.origin.where((*loc, "name"))
    stage = format_loc(loc[:2])
    raise ConfigError(f"'{choice.name}' at '{format_loc(loc)}'{line} is an algorithm, not a loss: move it and its "
                      f"options to '{stage}.algorithm' ({{name: {choice.name}, ...}})")


def _where(loc: tuple) -> str:
    return f"'{format_loc(loc)}'"


# Per stage key a ``Requires`` can name: the registry kind, and how the error names what is needed.
_ROLES = {"algorithm": ("algorithm", "an algorithm"), "losses": ("loss", "every loss to be one"),
          "reference": ("reference policy", "a reference policy"), "peft": ("peft backend", "a PEFT backend")}


def _stage_plugins(stage: PreparedStage) -> dict[str, list[tuple[Any, tuple]]]:
    """The stage's plugin instances by stage key, each with its key path."""
    base = ("stages", stage.index)
    return {"algorithm": [(stage.algorithm, (*base, "algorithm"))],
            "losses": [(loss, (*base, "losses", j)) for j, (loss, _) in enumerate(stage.losses)],
            "reference": [(stage.reference, (*base, "reference"))],
            "peft": [(stage.peft, (*base, "peft"))]}


def _describe_plugin(stage: PreparedStage, role: str, plugin: Any, loc: tuple, config: RunConfig) -> str:
    """``reference policy 'x' at 'stages[0].reference' (file, line N)``, saying when ``auto`` chose it."""
    chosen = " (chosen by 'auto')" if role == "reference" and stage.config.reference.name == "auto" else ""
    return f"{_ROLES[role][0]} '{plugin.name}'{chosen} at '{format_loc(loc)}'{key_where(config, loc)}"


def _unmet(stage: PreparedStage, role: str, plugin: Any, loc: tuple, need: Requires, other: Any,
           other_loc: tuple, config: RunConfig) -> ConfigError:
    kind, noun = _ROLES[need.role]
    found = getattr(other, need.flag, need.default)
    text = (f"stage '{stage.name}': {_describe_plugin(stage, role, plugin, loc, config)} needs {noun} that "
            f"{need.what or f'has {need.flag} = {need.value}'}, but {_describe_plugin(stage, need.role, other, other_loc, config)} "
            f"does not ({need.flag}: {found})")
    if need.hint:
        text += f"; {need.hint}"
    if need.role != "losses":
        # Name the registered plugins that would do, plugins of other distributions included.
        registry = get_registry(kind)
        fits = [n for n in registry.names() if getattr(registry.get(n), need.flag, need.default) is not None
                and need.satisfied_by(registry.get(n))]
        if fits:
            text += f" ({kind}s that do: {', '.join(fits)})"
    return ConfigError(text)


def check_requirements(stage: PreparedStage, config: RunConfig) -> None:
    """Refuse a stage whose plugins cannot work together, by what each declares in ``requires``.

    Runs when the stage is prepared: before any file is written or any model is loaded. The error
    names the stage, both plugins' keys and where in the config each was set.
    """
    plugins = _stage_plugins(stage)
    for role, entries in plugins.items():
        for plugin, loc in entries:
            for need in getattr(plugin, "requires", ()):
                for other, other_loc in plugins[need.role]:
                    if other is not plugin and not need.satisfied_by(other):
                        raise _unmet(stage, role, plugin, loc, need, other, other_loc, config)


def reads_only_chosen(losses: list[Any], algorithm: Any) -> bool:
    """Whether a stage with these losses (instances or classes) reads only the chosen completion of a
    preference pair, so its rows can run as ``sft`` rows (the algorithm must train on those too)."""
    return bool(losses) and SFT in algorithm.data_formats and all(
        SFT in loss.data_formats and tuple(getattr(loss, "preference_completions", ("chosen", "rejected"))) == ("chosen",)
        for loss in losses)


def chosen_as_sft(rows: list[Row]) -> list[Row]:
    """Preference rows as ``sft`` rows of their prompt and chosen completion (same locations)."""
    return [Row({"prompt": r.data["prompt"], "completion": r.data["chosen"]}, r.location) for r in rows]


def _split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(round(len(rows) * fraction))
    held = set(order[:cut])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def prepare_stage(config: RunConfig, index: int) -> PreparedStage:
    """Resolve one stage's plugins and load and validate its rows."""
    stage = config.stages[index]
    base = ("stages", index)
    algorithm = instantiate("algorithm", stage.algorithm, (*base, "algorithm"), config)
    losses = []
    for i, choice in enumerate(stage.losses):
        _refuse_algorithm_as_loss(choice, (*base, "losses", i), config)
        loss = instantiate("loss", choice, (*base, "losses", i), config)
        losses.append((loss, choice.weight))
    forward_kind = forward_kind_of([loss for loss, _ in losses], where=f"stage '{stage.name}': ")
    if forward_kind == "reward" and stage.eval.generate is not None:
        raise ConfigError(f"stage '{stage.name}': a reward model cannot generate; remove "
                          f"'stages[{index}].eval.generate' (its held-out metric is eval/accuracy)")
    data_format, train_rows = load_validated(stage.data.train, stage.data.format, stage.data.split, stage.data.max_rows)
    if data_format not in algorithm.data_formats:
        online = [n for n in get_registry("algorithm").names()
                  if PROMPT_ONLY in get_registry("algorithm").get(n).data_formats]
        hint = (f"prompt-only data needs an online algorithm: set 'stages[{index}].algorithm.name' to one of "
                f"{', '.join(online)}" if data_format == PROMPT_ONLY else
                f"set 'stages[{index}].data.format' if the guess is wrong")
        raise ConfigError(f"algorithm '{algorithm.name}' of stage '{stage.name}' trains on "
                          f"{'/'.join(algorithm.data_formats)} data, but {stage.data.train} is {data_format} data ({hint})")
    if stage.data.eval is not None:
        _, eval_rows = load_validated(stage.data.eval, data_format, stage.data.split)
    elif stage.data.eval_fraction > 0:
        train_rows, eval_rows = _split_eval(train_rows, stage.data.eval_fraction, config.seed)
    else:
        eval_rows = []
    if data_format == PREFERENCE and reads_only_chosen([loss for loss, _ in losses], algorithm):
        # Only chosen completions are trained on (SFT on a preference set): running the rejected ones
        # too would double the compute and inflate tokens/s for nothing.
        train_rows, eval_rows = chosen_as_sft(train_rows), chosen_as_sft(eval_rows)
        data_format = SFT
        log.info("stage '%s': its losses read only the chosen completions of the preference rows; they run as "
                 "sft rows (prompt + chosen), the rejected completions are not computed", stage.name)
    needs_reference = algorithm.needs_reference(losses)
    scores_extra = any(getattr(loss, "needs_kl_completions", False) for loss, _ in losses)
    # The backend first: whether it adds adapters decides what 'reference: auto' picks.
    peft = instantiate("peft backend", stage.peft, (*base, "peft"), config)
    reference_name = choose_reference(stage.reference.name, needs_reference, data_format, stage.peft.name,
                                      scores_extra_sequences=scores_extra,
                                      peft_adds_adapters=getattr(peft, "adds_adapters", None))
    if needs_reference and reference_name == "none":
        needing = [loss.name for loss, _ in losses if loss.needs_reference]
        raise ConfigError(f"stage '{stage.name}': reference 'none' was chosen but "
                          f"{'loss(es) ' + ', '.join(needing) if needing else 'algorithm ' + repr(algorithm.name)} "
                          f"need(s) reference log-probs ('stages[{index}].reference.name')")
    reference_choice = PluginChoice(name=reference_name, **stage.reference.options())
    reference = instantiate("reference policy", reference_choice, (*base, "reference"), config)
    eval_rewards = None
    if stage.eval.generate is not None:
        eval_rewards = _eval_rewards(stage.eval.generate, (*base, "eval", "generate"), config)
        if not eval_rows:
            raise ConfigError(f"stage '{stage.name}': eval.generate needs held-out prompts; set "
                              f"'stages[{index}].data.eval' or 'stages[{index}].data.eval_fraction'")
    optimizer = instantiate("optimizer", stage.optimizer, (*base, "optimizer"), config)
    prepared = PreparedStage(index, stage, data_format, algorithm, losses, reference_name, reference, peft,
                             eval_rewards, train_rows, eval_rows, optimizer=optimizer)
    check_requirements(prepared, config)
    check_packing(prepared)  # before any model loads, also for a later stage of a multi-stage run
    algorithm.check_stage(prepared)
    check_optimizer = getattr(optimizer, "check_stage", None)  # optional: refuse a stage it cannot train
    if check_optimizer is not None:
        check_optimizer(prepared)
    # Losses may look at the validated data (class balance, batch size) and warn before any training.
    for loss, _ in losses:
        check = getattr(loss, "check_stage", None)
        if check is not None:
            check(prepared)
    return prepared


def prepare_stages(config: RunConfig) -> list[PreparedStage]:
    """Every stage of the run, resolved and validated."""
    return [prepare_stage(config, i) for i in range(len(config.stages))]
