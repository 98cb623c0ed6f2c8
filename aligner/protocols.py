"""What the loop expects of each registrable kind, and the values passed between them.

Registries check a registered class against the ``REQUIRED_MEMBERS`` of its kind when it is
registered, so a plugin missing a member fails at start-up, naming the plugin and the member,
never in the middle of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict

# Data formats a stage can train on. A loss lists the ones it accepts in ``data_formats``.
SFT = "sft"  # prompt + completion (or chat messages)
PREFERENCE = "preference"  # prompt + chosen + rejected
UNPAIRED = "unpaired"  # prompt + completion + boolean label
PROMPT_ONLY = "prompt"  # prompt alone (online methods generate the completion)
DATA_FORMATS = (SFT, PREFERENCE, UNPAIRED, PROMPT_ONLY)


class Options(BaseModel):
    """Base class for a plugin's options: unknown keys are rejected with their path."""

    model_config = ConfigDict(extra="forbid")


# The stage keys of the plugins a ``Requires`` can name: ``losses`` means every loss of the stage.
REQUIREMENT_ROLES = ("algorithm", "losses", "reference", "peft")


@dataclass(frozen=True)
class Requires:
    """What a plugin needs of another plugin of its stage, declared in its ``requires`` class attribute.

    ``role`` names the other plugin by its stage key (``"algorithm"``, ``"losses"`` for every loss,
    ``"reference"`` or ``"peft"``); that plugin's class attribute ``flag`` must equal ``value``. An
    absent attribute counts as ``default``; ``None`` means "not known", and such a plugin is not
    refused here (plugins written before the flag existed keep working; the needing plugin may still
    refuse at setup). ``what`` says in words what the flag means, ``hint`` how to fix the config; both
    go into the error, which names the stage, both keys and their config lines. Checked when the
    stage is prepared, before any file is written or any model is loaded.

    Example: ``requires = (Requires("peft", "adds_adapters", what="adds adapters that can be switched
    off"),)`` on a reference that runs the policy with its adapters disabled.
    """

    role: Literal["algorithm", "losses", "reference", "peft"]
    flag: str
    value: bool = True
    default: bool | None = None
    what: str = ""
    hint: str = ""

    def satisfied_by(self, other: Any) -> bool:
        """Whether ``other`` (a plugin class or instance) has what is needed; unknown counts as yes."""
        found = getattr(other, self.flag, self.default)
        return found is None or bool(found) == self.value


@dataclass
class SequenceLogProbs:
    """Log-probabilities of the completion tokens of each sequence in a batch.

    ``logps[i]`` is the sum over completion tokens of sequence ``i``; ``num_tokens[i]`` how many
    there are. ``token_logps``/``mask`` (shape ``[N, T]``) are filled only when a loss asks for
    per-token values. For preference batches the first half of the sequences are the chosen
    completions and the second half the rejected ones, pair ``i`` being rows ``i`` and ``i + N/2``.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def pairs(self) -> tuple[SequenceLogProbs, SequenceLogProbs]:
        """Split a preference batch into its (chosen, rejected) halves."""
        half = self.logps.shape[0] // 2
        return self.select(slice(0, half)), self.select(slice(half, None))

    def select(self, index: slice | torch.Tensor) -> SequenceLogProbs:
        """The same values for a subset of the sequences."""
        return SequenceLogProbs(
            logps=self.logps[index],
            num_tokens=self.num_tokens[index],
            token_logps=None if self.token_logps is None else self.token_logps[index],
            mask=None if self.mask is None else self.mask[index],
        )

    def mean_logps(self) -> torch.Tensor:
        """Per-sequence average log-probability per completion token."""
        return self.logps / self.num_tokens.clamp(min=1)

    def detach(self) -> SequenceLogProbs:
        """A copy with no autograd history (for reference values)."""
        return SequenceLogProbs(
            logps=self.logps.detach(),
            num_tokens=self.num_tokens,
            token_logps=None if self.token_logps is None else self.token_logps.detach(),
            mask=self.mask,
        )


@dataclass
class LossInputs:
    """Everything a loss may read for one micro-batch.

    ``reference`` is ``None`` unless the loss declared ``needs_reference``; ``batch`` holds the
    collated tensors (``labels`` for unpaired data, ``margin`` when the rows have one, ``row_ids``,
    ...); ``extra`` carries values other forward passes produced for losses that asked for them
    (``kl_policy``/``kl_reference`` for ``needs_kl_completions``). Losses with
    ``forward_kind = "reward"`` get ``scores`` (one scalar per sequence) and ``policy = None``.
    """

    data_format: str
    policy: SequenceLogProbs | None
    reference: SequenceLogProbs | None
    batch: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = None


@dataclass
class LossOutput:
    """A loss value to minimise and the metrics to log for it (plain floats or 0-d tensors)."""

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Loss(Protocol):
    """A training objective. Instantiated as ``LossClass(options)``, options an ``Options`` model.

    Optional class attributes: ``needs_token_logps`` (per-token values in ``policy``),
    ``needs_kl_completions`` (log-probs of completions rotated within the batch, for KL estimates),
    ``forward_kind`` (``"logprobs"``, the default, or ``"reward"`` for a scalar-score model; see
    ``aligner.training.micro_batch.FORWARDS``), ``preference_completions`` (which completions of a preference
    pair it reads: ``("chosen", "rejected")`` by default; a loss that reads only ``("chosen",)``, like
    ``sft``, lets a stage of such losses run preference rows as ``sft`` rows of their chosen
    completion, so the rejected ones are never computed), ``requires`` (``Requires`` entries: what it
    needs of the stage's other plugins; default none). Optional method ``check_stage(stage)``: called
    once the stage's rows are validated, to warn about the data before training.
    """

    name: ClassVar[str]
    data_formats: ClassVar[tuple[str, ...]]
    needs_reference: ClassVar[bool]
    Options: ClassVar[type[Options]]

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Return the loss for one micro-batch and its metrics."""
        ...


@dataclass
class ReferenceContext:
    """What a reference policy gets to set itself up at the start of a stage.

    ``logprobs_fn(model, batch)`` computes ``SequenceLogProbs`` exactly as the policy's forward
    does, so reference values are comparable. ``peft_backend`` is the backend wrapping ``policy``.
    ``stage`` (the prepared stage: tokenized ``train_data``/``eval_data``, batch sizes),
    ``collate_fn(examples)`` and ``autocast()`` let a reference precompute values for the whole
    stage exactly as the loop would batch and run them.
    """

    policy: torch.nn.Module
    logprobs_fn: Any
    peft_backend: Any
    device: torch.device
    run_dir: str
    stage: Any = None
    collate_fn: Any = None
    autocast: Any = None


@runtime_checkable
class ReferencePolicy(Protocol):
    """Supplies reference log-probs. Instantiated as ``ReferenceClass(options)``.

    Optional class attribute ``requires``: ``Requires`` entries saying what it needs of the stage's
    other plugins (``disabled_adapter`` needs a PEFT backend with ``adds_adapters``); default none.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    def setup(self, context: ReferenceContext) -> None:
        """Prepare before the first step (copy weights, open a cache, ...)."""
        ...

    def logprobs(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Reference log-probs for the sequences of ``batch``, without gradient."""
        ...


@runtime_checkable
class Judge(Protocol):
    """Scores completions. Instantiated as ``JudgeClass(options)``; higher scores are better."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion) pair."""
        ...


@runtime_checkable
class PeftBackend(Protocol):
    """Decides which weights train. Instantiated as ``BackendClass(options)``.

    Optional class attributes: ``adds_adapters`` (``True`` when ``apply`` wraps the model in peft
    adapters that ``disable_adapter()`` switches off, ``False`` when the weights themselves train;
    absent: not known), read by references that need adapters and by ``reference: auto``;
    ``requires`` (``Requires`` entries); default none.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the model to train (wrapped or not), with only trainable weights requiring grad."""
        ...


@runtime_checkable
class Callback(Protocol):
    """A lifecycle plugin with settings, switched on from a run's config (``callbacks:``).

    Instantiated as ``CallbackClass(options)`` for each entry naming it, and registered as a plugin
    while ``aligner.train`` runs; it implements one or more lifecycle hooks (``on_run_start``,
    ``on_step_end``, ``on_evaluate``, ``on_checkpoint_saved``, ``on_run_end``, ``on_run_failed``)
    as ``@hookimpl`` methods.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]


@runtime_checkable
class Algorithm(Protocol):
    """How a stage trains: the offline weighted-losses loop, PPO, GRPO, ... Instantiated as
    ``AlgorithmClass(options)`` from the stage's ``algorithm: {name: ..., <options>}``.

    The stage runner (``aligner.training.runner``) owns everything algorithms share: setup order, the
    optimizer and LR schedule, evaluation, hooks, signals, the non-finite guard, clipping,
    checkpoints, exact resume and the final save. An algorithm owns its data stream, what one
    training step does, its extra checkpoint state and which model is final. Subclass
    ``aligner.algorithms.Algorithm``: it gives every member but ``setup`` and ``train_step`` a default.
    """

    name: ClassVar[str]
    data_formats: ClassVar[tuple[str, ...]]
    Options: ClassVar[type[Options]]

    def check_stage(self, stage: Any) -> None:
        """Refuse (``ConfigError``) a stage whose other choices this algorithm cannot run, before any model loads."""
        ...

    def needs_reference(self, losses: list[tuple[Any, float]]) -> bool:
        """Whether the stage, with these (loss, weight) pairs, needs reference log-probs (``reference:
        auto`` picks ``none`` otherwise, and no reference is built or run)."""
        ...

    def generation_tokens(self) -> int:
        """The most tokens generated per prompt (0 for offline algorithms); prompts are cut to leave room."""
        ...

    def setup(self, context: Any) -> Any:
        """Build what trains and the data stream; return an ``aligner.algorithms.AlgorithmSetup``."""
        ...

    def train_step(self, step: Any) -> Any:
        """One training step through ``step`` (an ``aligner.algorithms.StepServices``); return a ``StepResult``."""
        ...

    def evaluate(self, run: Any, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (``eval/...``) of the model being trained."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Extra JSON state for a checkpoint (e.g. an adaptive KL coefficient)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (saved under ``algorithm`` in ``trainer_state.json``)."""
        ...

    def load_weights(self, module: torch.nn.Module, directory: Any) -> None:
        """Load a checkpoint's weights into the (unwrapped) module ``setup`` returned."""
        ...

    def policy_of(self, module: torch.nn.Module) -> torch.nn.Module:
        """The policy inside the (unwrapped) trained module: the final model and the next stage's start."""
        ...

    def close(self) -> None:
        """Release what the algorithm holds (e.g. its generation engine) when its stage's loop ends."""
        ...


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Turns rollout rewards into per-token advantages. Instantiated as ``EstimatorClass(options)``.

    ``needs_critic`` says whether it reads critic values (GAE); ``estimate(inputs)`` takes an
    ``aligner.online.advantages.AdvantageInputs`` and returns ``aligner.online.advantages.Advantages``.
    """

    name: ClassVar[str]
    needs_critic: ClassVar[bool]
    Options: ClassVar[type[Options]]

    def estimate(self, inputs: Any) -> Any:
        """Advantages (and returns, for a critic) of one rollout batch."""
        ...


@runtime_checkable
class GenerationEngine(Protocol):
    """Samples an online stage's rollouts. Instantiated as ``EngineClass(options)``, once per stage.

    ``generate(policy, tokenizer, request)`` takes the unwrapped policy module, the run's tokenizer and an
    ``aligner.online.engines.GenerationRequest`` and returns ``aligner.online.engines.Generations``:
    completion token ids (prompt-major, cut after EOS) and the generator's log-probability of every
    token. An engine holding its own copy of the weights refreshes it when ``request.policy_version``
    changes. ``check_stage(stage)`` refuses a stage it cannot serve before any model loads; ``close()``
    releases what it holds when the stage ends.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    def check_stage(self, stage: Any) -> None:
        """Raise ``aligner.errors.ConfigError`` naming the key if the stage cannot use this engine."""
        ...

    def generate(self, policy: torch.nn.Module, tokenizer: Any, request: Any) -> Any:
        """The sampled completions and their log-probs."""
        ...

    def close(self) -> None:
        """Release connections or a colocated engine."""
        ...


@runtime_checkable
class Optimizer(Protocol):
    """Builds the ``torch.optim.Optimizer`` of a stage. Instantiated as ``OptimizerClass(options)``, once
    per stage, from the stage's ``optimizer: {name: ..., <options>}`` (default ``adamw``).

    ``build(context)`` gets an ``aligner.optimizers.OptimizerContext``: the trainable named parameters
    of the module the algorithm trains, that module, the PEFT-wrapped policy (for methods that need
    its structure, such as LoRA+ grouping A and B matrices), and the stage's ``train.learning_rate``
    and ``train.weight_decay``. It may freeze parameters (LoRA-FA freezes A): the runner re-reads what
    requires grad afterwards. The runner owns everything else: the LR schedule (every param group's
    ``lr`` is scaled by it), gradient clipping, the non-finite guard and checkpointing; the optimizer's
    ``state_dict``/``load_state_dict`` must round-trip its state for an exact resume.
    Optional method ``check_stage(stage)``: refuse (``ConfigError`` naming the key) a stage this
    optimizer cannot train, when the stage is prepared, before any model loads.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    def build(self, context: Any) -> torch.optim.Optimizer:
        """The optimizer over ``context.named_parameters``."""
        ...


# Lifecycle hooks a callback may implement (``aligner.hookspecs``); it must implement one.
LIFECYCLE_HOOKS = ("on_run_start", "on_step_end", "on_evaluate", "on_checkpoint_saved", "on_run_end",
                   "on_run_failed")

# The members each registry checks at registration time, per kind.
REQUIRED_MEMBERS: dict[str, tuple[str, ...]] = {
    "loss": ("name", "data_formats", "needs_reference", "Options", "compute"),
    "reference policy": ("name", "Options", "setup", "logprobs"),
    "judge": ("name", "Options", "score"),
    "peft backend": ("name", "Options", "apply"),
    "callback": ("name", "Options"),
    "algorithm": ("name", "data_formats", "Options", "check_stage", "needs_reference", "generation_tokens", "setup",
                  "train_step", "evaluate", "state_dict", "load_state_dict", "load_weights", "policy_of", "close"),
    "advantage estimator": ("name", "needs_critic", "Options", "estimate"),
    "generation engine": ("name", "Options", "check_stage", "generate", "close"),
    "optimizer": ("name", "Options", "build"),
}
