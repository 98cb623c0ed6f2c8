"""Turning a stage's config into resolved plugins and validated data, before any model is loaded.

Everything a user can get wrong in a stage (an unknown loss, a bad option, a loss that cannot train
on the data's format, a bad row) is found here, so a run fails in seconds, not after loading weights.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aligner.config import (
    PluginChoice,
    RunConfig,
    StageConfig,
    format_loc,
    key_where,
    located_option_problems,
    validate_located,
    validate_plugin_options,
)
from aligner.data.loading import RejectedRow, Row, SourceReport, load_validated
from aligner.data.packing import check_packing
from aligner.data.rows import Rows
from aligner.data.sources import source_label
from aligner.data.templates import load_template
from aligner.data.tokenize import TokenizedData
from aligner.errors import AlignerError, ConfigError, DataError
from aligner.plugins import get_registry
from aligner.protocols import PREFERENCE, PROMPT_ONLY, SFT, Requires
from aligner.references import choose_reference

log = logging.getLogger("aligner")

T = TypeVar("T")


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
    rows: StageRows | None = None  # what reading the rows found (rejected rows, per-source reports)

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
        return any(loss.needs_token_logps for loss, _ in self.losses)

    @property
    def needs_kl_completions(self) -> bool:
        """Whether any loss reads log-probs of mismatched prompt/completion pairs (KTO's KL estimate)."""
        return any(loss.needs_kl_completions for loss, _ in self.losses)

    @property
    def forward_kind(self) -> str:
        """How the model runs on a batch (``aligner.training.micro_batch.FORWARDS``); the same for all its losses."""
        return forward_kind_of([loss for loss, _ in self.losses])


def forward_kind_of(losses: list[Any], where: str = "") -> str:
    """The one ``forward_kind`` the losses share (``logprobs`` unless declared, or without losses); a
    ConfigError if they differ."""
    kinds = {loss.forward_kind for loss in losses} or {"logprobs"}
    if len(kinds) > 1:
        detail = ", ".join(f"{loss.name}: {loss.forward_kind}" for loss in losses)
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
    from aligner.errors import AlignerError, OptionProblems
    from aligner.online.reward_sources import RewardSourceConfig, RewardSources

    if generate.judge is not None:
        return RewardSources.of_judge(instantiate("judge", generate.judge, (*loc, "judge"), config))
    where = f"'{format_loc((*loc, 'rewards'))}'" + config.origin.where((*loc, "rewards"))
    sources = [validate_located(RewardSourceConfig, r, (*loc, "rewards", i), config.origin, "reward source")
               for i, r in enumerate(generate.rewards)]
    try:
        return RewardSources(sources, timeout=None)
    except OptionProblems as exc:  # a source's judge: rewards[i].judge.<key>
        raise located_option_problems(exc, (*loc, "rewards"), config.origin) from None
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
            for need in plugin.requires:
                for other, other_loc in plugins[need.role]:
                    if other is not plugin and not need.satisfied_by(other):
                        raise _unmet(stage, role, plugin, loc, need, other, other_loc, config)


def reads_only_chosen(losses: list[Any], algorithm: Any) -> bool:
    """Whether a stage with these losses (instances or classes) reads only the chosen completion of a
    preference pair, so its rows can run as ``sft`` rows (the algorithm must train on those too)."""
    return bool(losses) and SFT in algorithm.data_formats and all(
        SFT in loss.data_formats and tuple(loss.preference_completions) == ("chosen",)
        for loss in losses)


def chosen_as_sft(rows: list[Row]) -> list[Row]:
    """Preference rows as ``sft`` rows of their prompt and chosen completion (same locations)."""
    if isinstance(rows, Rows):  # loaded rows stay compact (aligner.data.rows)
        return rows.map_data(lambda d: {"prompt": d["prompt"], "completion": d["chosen"]})
    return [Row({"prompt": r.data["prompt"], "completion": r.data["chosen"]}, r.location) for r in rows]


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """``rows`` split into (train, held out): a seeded random ``fraction`` held out, order kept in both."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(round(len(rows) * fraction))
    held = set(order[:cut])
    if isinstance(rows, Rows):  # index arrays over the same compact rows, not lists of decoded ones
        return rows.select([i for i in range(len(rows)) if i not in held]), rows.select(sorted(held))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


class Problems:
    """Where stage preparation puts what is wrong: raised at once by default (training stops at the
    first problem, before any model loads), or collected (``aligner data check`` runs the same
    preparation and reports every problem, every rejected row included)."""

    def __init__(self, collect: bool = False) -> None:
        self.collecting = collect
        self.messages: list[str] = []

    def report(self, error: AlignerError) -> None:
        """Raise ``error``, or keep its message when collecting."""
        if not self.collecting:
            raise error
        self.messages.append(str(error))

    def attempt(self, step: Callable[[], T]) -> T | None:
        """``step()``, or ``None`` after reporting the ``AlignerError`` it raised (when collecting)."""
        try:
            return step()
        except AlignerError as exc:
            self.report(exc)
            return None


@dataclass
class StageRows:
    """A stage's validated rows, with what reading them found (for ``aligner data check``).

    ``row_format`` is the rows' own format; ``data_format`` the one training runs them as (``sft``
    for preference rows of a stage whose losses read only the chosen completion). ``train`` is
    ``None`` when the training data could not be read at all (collected problems say why).
    """

    row_format: str | None
    data_format: str | None
    train: list[Row] | None
    eval: list[Row]
    eval_label: str | None = None  # the eval split's source in reports; None: no eval split
    train_rejected: list[RejectedRow] = field(default_factory=list)
    eval_rejected: list[RejectedRow] = field(default_factory=list)
    train_sources: list[SourceReport] = field(default_factory=list)
    eval_sources: list[SourceReport] = field(default_factory=list)
    generation_tokens: int = 0  # the most tokens the stage's algorithm generates per prompt (0: offline)


def _format_mismatch(algorithm: Any, stage: StageConfig, index: int, data_format: str) -> ConfigError:
    """The error for rows whose format the stage's algorithm does not train on, with the key to change."""
    online = [n for n in get_registry("algorithm").names()
              if PROMPT_ONLY in get_registry("algorithm").get(n).data_formats]
    hint = (f"prompt-only data needs an online algorithm: set 'stages[{index}].algorithm.name' to one of "
            f"{', '.join(online)}" if data_format == PROMPT_ONLY else
            f"set 'stages[{index}].data.format' if the guess is wrong")
    return ConfigError(f"algorithm '{algorithm.name}' of stage '{stage.name}' trains on "
                       f"{'/'.join(algorithm.data_formats)} data, but {source_label(stage.data.train)} is "
                       f"{data_format} data ({hint})")


def load_stage_rows(config: RunConfig, index: int, algorithm: Any, losses: list[Any] | None,
                    problems: Problems) -> StageRows:
    """Read and validate a stage's train and eval rows, check their format against ``algorithm`` and
    run preference rows as ``sft`` rows when ``losses`` read only the chosen completion. ``algorithm``
    or ``losses`` is ``None`` when it could not be built (collected problems): the checks that need
    it are skipped."""
    stage = config.stages[index]
    data = stage.data
    collecting = problems.collecting
    rows = StageRows(None, None, None, [])
    try:
        row_format, train = load_validated(data.train, data.format, data.split, data.max_rows,
                                           rows.train_rejected if collecting else None,
                                           sources=rows.train_sources)
    except DataError as exc:
        problems.report(exc)
        return rows
    rows.row_format = rows.data_format = row_format
    rows.train = train
    if algorithm is not None and row_format not in algorithm.data_formats:
        problems.report(_format_mismatch(algorithm, stage, index, row_format))
    if data.eval is not None:
        rows.eval_label = source_label(data.eval)
        try:
            _, rows.eval = load_validated(data.eval, row_format, data.split,
                                          collect_errors=rows.eval_rejected if collecting else None,
                                          sources=rows.eval_sources)
        except DataError as exc:
            problems.report(exc)
    elif data.eval_fraction > 0:
        rows.train, rows.eval = split_eval(rows.train, data.eval_fraction, config.seed)
        rows.eval_label = f"{data.eval_fraction:g} of train held out"
    if (row_format == PREFERENCE and algorithm is not None and losses is not None
            and reads_only_chosen(losses, algorithm)):
        # Only chosen completions are trained on (SFT on a preference set): running the rejected ones
        # too would double the compute and inflate tokens/s for nothing.
        rows.train, rows.eval = chosen_as_sft(rows.train), chosen_as_sft(rows.eval)
        rows.data_format = SFT
        log.info("stage '%s': its losses read only the chosen completions of the preference rows; they run as "
                 "sft rows (prompt + chosen), the rejected completions are not computed", stage.name)
    return rows


def _build_loss(choice: PluginChoice, loc: tuple, config: RunConfig) -> Any:
    _refuse_algorithm_as_loss(choice, loc, config)
    return instantiate("loss", choice, loc, config)


def _check_forward_kind(losses: list[Any], stage: StageConfig, index: int) -> None:
    forward_kind = forward_kind_of(losses, where=f"stage '{stage.name}': ")
    if forward_kind == "reward" and stage.eval.generate is not None:
        raise ConfigError(f"stage '{stage.name}': a reward model cannot generate; remove "
                          f"'stages[{index}].eval.generate' (its held-out metric is eval/accuracy)")


def _resolve_rest(config: RunConfig, index: int, algorithm: Any, losses: list[tuple[Any, float]],
                  rows: StageRows) -> PreparedStage:
    """The plugins that depend on the rows (PEFT backend, reference, held-out scoring, optimizer) and
    the prepared stage (its checks: ``_stage_checks``)."""
    stage = config.stages[index]
    base = ("stages", index)
    needs_reference = algorithm.needs_reference(losses)
    scores_extra = any(loss.needs_kl_completions for loss, _ in losses)
    # The backend first: whether it adds adapters decides what 'reference: auto' picks.
    peft = instantiate("peft backend", stage.peft, (*base, "peft"), config)
    reference_name = choose_reference(stage.reference.name, needs_reference, rows.data_format, stage.peft.name,
                                      scores_extra_sequences=scores_extra,
                                      peft_adds_adapters=peft.adds_adapters)
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
        if not rows.eval:
            raise ConfigError(f"stage '{stage.name}': eval.generate needs held-out prompts; set "
                              f"'stages[{index}].data.eval' or 'stages[{index}].data.eval_fraction'")
    optimizer = instantiate("optimizer", stage.optimizer, (*base, "optimizer"), config)
    return PreparedStage(index, stage, rows.data_format, algorithm, losses, reference_name, reference, peft,
                         eval_rewards, rows.train, rows.eval, optimizer=optimizer, rows=rows)


def _stage_checks(prepared: PreparedStage, config: RunConfig) -> list[list[Callable[[], None]]]:
    """The checks of a prepared stage, in groups: each check of a group runs on its own, so that
    ``aligner data check`` reports all that fail (training stops at the first); a group runs only when
    the groups before it passed (the losses' own checks may assume the stage is otherwise sound)."""
    return [
        [lambda: check_requirements(prepared, config),
         lambda: check_packing(prepared),  # before any model loads, also for a later stage of a multi-stage run
         lambda: prepared.algorithm.check_stage(prepared),
         lambda: prepared.optimizer.check_stage(prepared)],  # refuses a stage it cannot train (the default accepts)
        # Losses may look at the validated data (class balance, batch size) and warn before any training.
        [lambda loss=loss: loss.check_stage(prepared) for loss, _ in prepared.losses],
    ]


def prepare_stage_collecting(config: RunConfig, index: int,
                             problems: Problems) -> tuple[PreparedStage | None, StageRows]:
    """Resolve one stage's plugins and load and validate its rows, reporting each problem to
    ``problems``: every step that can still run does. The prepared stage is ``None`` when some plugin
    or the training rows could not be built (only when collecting; the problems say why)."""
    stage = config.stages[index]
    base = ("stages", index)
    algorithm = problems.attempt(lambda: instantiate("algorithm", stage.algorithm, (*base, "algorithm"), config))
    built = [problems.attempt(lambda i=i, c=c: _build_loss(c, (*base, "losses", i), config))
             for i, c in enumerate(stage.losses)]
    losses = None if None in built else [(loss, choice.weight) for loss, choice in zip(built, stage.losses, strict=True)]
    if losses is not None:
        problems.attempt(lambda: _check_forward_kind([loss for loss, _ in losses], stage, index))
    rows = load_stage_rows(config, index, algorithm, None if losses is None else [loss for loss, _ in losses],
                           problems)
    rows.generation_tokens = algorithm.generation_tokens() if algorithm is not None else 0
    if algorithm is None or losses is None or rows.train is None:
        return None, rows
    prepared = problems.attempt(lambda: _resolve_rest(config, index, algorithm, losses, rows))
    if prepared is None:
        return None, rows
    for group in _stage_checks(prepared, config):
        if [check for check in group if problems.attempt(lambda c=check: c() or True) is None]:
            return None, rows
    return prepared, rows


def prepare_stage(config: RunConfig, index: int) -> PreparedStage:
    """Resolve one stage's plugins and load and validate its rows; the first problem raises.

    ``aligner data check`` runs the same preparation collecting every problem
    (``prepare_stage_collecting``)."""
    prepared, _ = prepare_stage_collecting(config, index, Problems())
    assert prepared is not None  # without collecting, whatever left it unbuilt has raised
    return prepared


def stage_template(stage: StageConfig, index: int, chat_rows: bool, tokenizer: Any) -> Any:
    """The template ``stages[index]``'s rows render with (training and ``aligner data check`` alike);
    an ``AlignerError`` names the stage and its key."""
    try:
        return load_template(stage.data.template, tokenizer, chat_data=chat_rows)
    except AlignerError as exc:
        # Say which stage's setting it is; the template module only knows the name.
        raise type(exc)(f"stage '{stage.name}' ('stages[{index}].data.template'): {exc}") from None


def is_chat(*splits: list[Row] | None) -> bool:
    """Whether a stage's rows hold chat messages (either split: chat eval rows need a chat template
    as much as chat train rows do)."""
    return any(bool(rows) and isinstance(rows[0].data.get("prompt"), list) for rows in splits)


def prepare_stages(config: RunConfig) -> list[PreparedStage]:
    """Every stage of the run, resolved and validated."""
    return [prepare_stage(config, i) for i in range(len(config.stages))]
