"""What every online algorithm shares: rollout options (the reward sources, sampling, the samples
table), the reward sources built once, and the prompt stream of a stage sharded over processes."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from aligner.algorithms.base import Algorithm, AlgorithmContext, require_token_level_reference
from aligner.errors import AlignerError, ConfigError
from aligner.online.engines import build_engine
from aligner.online.reward_sources import RewardSourceConfig, RewardSources
from aligner.online.rewards import build_judge
from aligner.online.rollout import prompt_batches
from aligner.protocols import PROMPT_ONLY, Options


class RolloutOptions(Options):
    """The rollout settings of every online algorithm; each algorithm's ``Options`` extends them."""

    judge: dict[str, Any] | None = Field(None, description=(
        "the judge plugin that scores rollouts: {name: ..., options} (or several sources: rewards)"))
    rewards: list[RewardSourceConfig] | None = Field(None, description=(
        "weighted reward sources: [{judge: {...}} or {function: module:name, options: {...}}, with weight]"))
    normalize_rewards: bool = Field(False, description="standardise each source over the batch before weighting")
    reward_timeout: float | None = Field(60.0, gt=0, description="seconds a source may take per batch")
    engine: dict[str, Any] = Field(default_factory=lambda: {"name": "hf"}, description=(
        "the generation-engine plugin that samples rollouts: {name: hf | openai_server | vllm, options}"))
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    generation_batch_size: int = Field(64, gt=0, description=(
        "rows (samples) decoded together by a local engine; whole groups"))
    sample_every: int = Field(10, gt=0, description="write/print a table of rollout samples every N steps")
    num_samples: int = Field(4, gt=0, description="rows in that table")

    # Each source is built while the options are validated, so a bad judge or function fails before any
    # model loads, with the key path of the option.
    @field_validator("judge")
    @classmethod
    def _judge_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            build_judge(value)
        return value

    @field_validator("engine")
    @classmethod
    def _engine_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        build_engine(value)
        return value

    @field_validator("rewards")
    @classmethod
    def _rewards_are_valid(cls, value: list[RewardSourceConfig] | None) -> list[RewardSourceConfig] | None:
        if value is not None:
            if not value:
                raise ValueError("list at least one reward source")
            try:
                RewardSources(value, timeout=None)
            except AlignerError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_kind_of_source(self):
        if (self.judge is None) == (self.rewards is None):
            raise ValueError("set exactly one of 'judge' (one judge) and 'rewards' (weighted reward sources)")
        return self

    def reward_sources(self) -> RewardSources:
        """The sources that score rollouts: the one ``judge``, or the weighted ``rewards``."""
        sources = self.rewards if self.rewards is not None else [RewardSourceConfig(judge=self.judge)]
        return RewardSources(sources, normalize=self.normalize_rewards, timeout=self.reward_timeout)


class OnlineAlgorithm(Algorithm):
    """An algorithm that trains on prompts, sampling its completions: the judge and the prompt stream."""

    data_formats = (PROMPT_ONLY,)
    Options = RolloutOptions

    def __init__(self, options: RolloutOptions):
        super().__init__(options)
        self.rewards = options.reward_sources()
        self.engine = build_engine(options.engine)
        self._prompts: Any = None

    def check_own_loss_stage(self, stage: Any) -> None:
        """For algorithms that compute their own loss: no stage ``losses``, no gradient accumulation
        (they split rollouts themselves), and a reference with per-token log-probs when a KL term needs one."""
        where = f"'stages[{stage.index}]"
        if stage.losses:
            raise ConfigError(f"stage '{stage.name}': {self.name} computes its own loss; remove {where}.losses'")
        if stage.config.train.gradient_accumulation_steps != 1:
            raise ConfigError(f"stage '{stage.name}': {self.name} splits each rollout into updates itself; "
                              f"{where}.train.gradient_accumulation_steps' must be 1")
        if self.needs_reference(stage.losses):
            require_token_level_reference(stage, self.name)
        self.engine.check_stage(stage)

    def close(self) -> None:
        """Close the generation engine."""
        self.engine.close()

    def generation_tokens(self) -> int:
        """``max_new_tokens``."""
        return self.options.max_new_tokens

    def start_prompts(self, context: AlgorithmContext) -> int:
        """Start the stream of global prompt batches at the resumed position; return the steps per epoch.

        Every process draws the same global batches and samples its own share of each, so the batch
        size must divide over the processes (their update counts, collectives, must match).
        """
        run = context.run
        batch_size, processes = run.stage.config.train.batch_size, run.accelerator.num_processes
        where = f"'stages[{run.stage.index}].train.batch_size' ({batch_size})"
        if batch_size % processes:
            raise ConfigError(f"stage '{run.stage.name}': {where} must be a multiple of the number of processes "
                              f"({processes})")
        prompts = len(run.stage.train_data.examples)
        if prompts < batch_size:
            raise ConfigError(f"stage '{run.stage.name}': {where} is larger than the {prompts} training prompts")
        self._prompts = prompt_batches(run, context.position)
        return prompts // batch_size  # full batches only
