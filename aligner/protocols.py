"""What the loop expects of each registrable kind, and the values passed between them.

Each protocol declares its kind's required members (annotations without a value, methods whose body
is ``...``) and its optional members with their defaults (class attributes with a value, methods
with a body). ``aligner.kinds.KINDS`` lists the kinds; a registry checks a registered class against
its kind's required members when it is registered, so a plugin missing a member fails at start-up,
naming the plugin and the member, never in the middle of training, and gives the class every
optional member it lacks, with the default declared here, so aligner reads them without ``getattr``.
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

    The members with a value below are optional: a class without one gets that default when it is
    registered.
    """

    name: ClassVar[str]
    data_formats: ClassVar[tuple[str, ...]]
    needs_reference: ClassVar[bool]
    Options: ClassVar[type[Options]]

    # Per-token values in ``inputs.policy`` (``token_logps``/``mask``).
    needs_token_logps: ClassVar[bool] = False
    # Log-probs of completions rotated within the batch (``inputs.extra["kl_policy"]`` and
    # ``["kl_reference"]``), for KL estimates (KTO).
    needs_kl_completions: ClassVar[bool] = False
    # How the model runs on a batch: ``"logprobs"``, or ``"reward"`` for a scalar-score model
    # (``aligner.training.micro_batch.FORWARDS``); the losses of a stage must agree.
    forward_kind: ClassVar[str] = "logprobs"
    # Which completions of a preference pair it reads; a stage whose losses all read ``("chosen",)``
    # (like ``sft``) runs preference rows as ``sft`` rows of their chosen completion.
    preference_completions: ClassVar[tuple[str, ...]] = ("chosen", "rejected")
    # What it needs of the stage's other plugins.
    requires: ClassVar[tuple[Requires, ...]] = ()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Return the loss for one micro-batch and its metrics."""
        ...

    def check_stage(self, stage: Any) -> None:
        """Look at the prepared stage (validated rows, batch sizes) before any model loads: warn about
        the data, or raise ``ConfigError``. The default accepts every stage."""
        return None


@dataclass
class ReferenceContext:
    """What a reference policy gets to set itself up at the start of a stage.

    ``policy`` is the live policy module, the very object that trains (not a copy), as the PEFT
    backend returned it (a peft ``PeftModel`` when the backend adds adapters), before any update and
    before a resumed checkpoint's weights are loaded into it; the stage's algorithm may wrap it later
    (PPO's value head, the accelerate/DDP wrapper), which does not change this object or its
    parameter names. ``logprobs_fn(model, batch, token_level=False)`` computes ``SequenceLogProbs``
    exactly as the policy's forward does, so reference values are comparable; with
    ``token_level=True`` it also fills ``token_logps``/``mask`` (PPO and GRPO's per-token KL needs
    them). ``peft_backend`` is the backend wrapping ``policy``. ``device`` is where this process's
    tensors go, ``run_dir`` the run's output directory. ``stage`` (the prepared stage: tokenized
    ``train_data``/``eval_data``, the stage's config with its batch sizes), ``collate_fn(examples)``
    (the stage's collate function, padding with the tokenizer's pad id) and ``autocast()`` (a context
    manager: the run's mixed precision) let a reference precompute values for the whole stage exactly
    as the loop would batch and run them; ``pad_token_id`` and ``share_prompt`` are what
    ``collate_fn`` pads with and whether it lays a preference pair out with its prompt once.
    """

    policy: torch.nn.Module
    logprobs_fn: Any
    peft_backend: Any
    device: torch.device
    run_dir: str
    stage: Any = None
    collate_fn: Any = None
    autocast: Any = None
    pad_token_id: int | None = None
    share_prompt: bool = False


@dataclass
class ReferenceStep:
    """What a reference policy's optional ``after_optimizer_step`` gets after each applied update.

    ``policy`` is the live policy module with its new weights (the same object as
    ``ReferenceContext.policy``: PEFT-wrapped, without the DDP wrapper or PPO's value head);
    ``updates`` is how many optimizer updates the stage has applied, this one included (the LR
    schedule's count: it continues across a resume, and an algorithm making several updates per
    training step, like PPO, counts each).
    """

    policy: torch.nn.Module
    updates: int


@dataclass(frozen=True)
class ReferenceNeeds:
    """What ``reference: auto`` knows of a stage when it asks a reference policy's ``usable_for``.

    ``needs_reference``: some loss (or the algorithm) reads reference log-probs. ``data_format``: the
    stage's rows (``prompt`` rows are completed during training, so no value can be precomputed).
    ``scores_extra_sequences``: a loss scores sequences made during training (KTO's mismatched
    pairs). ``peft_name``, ``peft_adds_adapters``: the stage's PEFT backend, and whether it adds
    adapters that ``disable_adapter()`` switches off (a backend that does not say counts as adding them).
    """

    needs_reference: bool
    data_format: str | None = None
    scores_extra_sequences: bool = False
    peft_name: str | None = None
    peft_adds_adapters: bool = False

    @property
    def offline(self) -> bool:
        """Whether every sequence the stage scores is in its dataset, so values can be precomputed."""
        return self.data_format != PROMPT_ONLY and not self.scores_extra_sequences


@runtime_checkable
class ReferencePolicy(Protocol):
    """Supplies reference log-probs. Instantiated as ``ReferenceClass(options)``.

    Optional class attribute ``requires``: ``Requires`` entries saying what it needs of the stage's
    other plugins (``disabled_adapter`` needs a PEFT backend with ``adds_adapters``); default none.

    Optional methods, for a reference that follows training (the built-in ``ema``):
    ``after_optimizer_step``, ``state_dict`` and ``load_state_dict`` (below, with their defaults).
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    # What it needs of the stage's other plugins.
    requires: ClassVar[tuple[Requires, ...]] = ()
    # ``reference: auto`` picks, among the registered references whose ``usable_for`` accepts the
    # stage, the one with the highest ``auto_priority``; ``None``: ``auto`` never picks it.
    auto_priority: ClassVar[float | None] = None

    @classmethod
    def usable_for(cls, needs: ReferenceNeeds) -> bool:
        """Whether ``reference: auto`` may pick this reference for a stage (read only when
        ``auto_priority`` is set). The default: when the stage needs reference log-probs."""
        return needs.needs_reference

    def setup(self, context: ReferenceContext) -> None:
        """Prepare before the first step (copy weights, open a cache, ...)."""
        ...

    def logprobs(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Reference log-probs for the sequences of ``batch``, without gradient."""
        ...

    def after_optimizer_step(self, step: ReferenceStep) -> None:
        """Called on every process after every applied optimizer update (not one the non-finite
        guard skipped), with the live policy: a reference that follows training updates itself here
        (``ema``). The default does nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State an exact resume needs, saved with every checkpoint: ``torch.Tensor`` values (also in
        nested dicts with string keys) go to ``reference_state.safetensors`` in the checkpoint, the
        rest (JSON) under ``reference`` in ``trainer_state.json``. The default: ``{}``, nothing saved."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called on resume, after ``setup``, with what ``state_dict`` returned at the checkpoint
        (tensors on the CPU; ``{}`` when the checkpoint holds none). The default does nothing."""
        return None


@runtime_checkable
class Judge(Protocol):
    """Scores completions. Instantiated as ``JudgeClass(options)``; higher scores are better."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    # Optional method ``compare(prompts, completions_a, completions_b) -> list[float]``: per prompt,
    # the probability that ``a`` is better than ``b`` (what pairwise ``aligner label`` calls).
    # Default ``None``: the judge only scores.
    compare: ClassVar[Any] = None

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion) pair."""
        ...

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Optional: receive the policy's tokenizer (the run's transformers tokenizer), once, before the
        first ``score`` or ``compare`` (in training and in ``aligner label``); for a judge that counts or
        reads the policy's tokens. Default: ignores it."""
        return None


@runtime_checkable
class PeftBackend(Protocol):
    """Decides which weights train. Instantiated as ``BackendClass(options)``.

    The members with a value below are optional: a class without one gets that default when it is
    registered.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    # ``True`` when ``apply`` wraps the model in peft adapters that ``disable_adapter()`` switches
    # off, ``False`` when the weights themselves train; ``None``: not known (``reference: auto`` then
    # counts it as adding adapters). Read by references that need adapters and by ``auto``.
    adds_adapters: ClassVar[bool | None] = None
    # What it needs of the stage's other plugins.
    requires: ClassVar[tuple[Requires, ...]] = ()

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the model to train (wrapped or not), with only trainable weights requiring grad."""
        ...

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """Called after every applied optimizer step, before gradients are cleared, with the unwrapped
        policy and the update count (AdaLoRA re-allocates ranks here). The default does nothing."""
        return None

    def release(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the next stage starts from, given the stage's unwrapped policy (LoRA merges its
        adapters). The default returns it unchanged."""
        return model


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

    # Optional (the registry fills it; the base class does not set it): what it needs of the
    # stage's other plugins.
    requires: ClassVar[tuple[Requires, ...]] = ()

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
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    def build(self, context: Any) -> torch.optim.Optimizer:
        """The optimizer over ``context.named_parameters``."""
        ...

    def check_stage(self, stage: Any) -> None:
        """Optional: refuse (``ConfigError`` naming the key) a stage this optimizer cannot train, when
        the stage is prepared, before any model loads. The default accepts every stage."""
        return None


# Lifecycle hooks a callback may implement (``aligner.hookspecs``); it must implement one.
LIFECYCLE_HOOKS = ("on_run_start", "on_step_end", "on_evaluate", "on_checkpoint_saved", "on_run_end",
                   "on_run_failed")
