"""The hook specifications: the whole public contract between aligner and its plugins.

A plugin is a module or object with functions marked ``@aligner.hookimpl`` whose names match the
specs below. Built-in plugins (``aligner/losses``, ``aligner/references``, ...) use exactly these
hooks; third-party ones are found through the ``aligner`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from aligner.training.run_state import RunState

# The callback a registration hook receives: call it with each class to register.
Register = Callable[[type], None]

hookspec = pluggy.HookspecMarker("aligner")
hookimpl = pluggy.HookimplMarker("aligner")


# ---------------------------------------------------------------------------------------------
# Registration hooks: called once when the registries are built. Each receives a ``register``
# callback; call it once per object. The registry checks the object against its protocol
# (see ``aligner.protocols``), rejects duplicate names and records which plugin registered it.
# ---------------------------------------------------------------------------------------------


@hookspec
def register_losses(register: Register) -> None:
    """Register loss classes with ``register(LossClass)``.

    A loss class satisfies ``aligner.protocols.Loss``: it has a unique ``name``, the
    ``data_formats`` it trains on, whether it ``needs_reference``, an ``Options`` pydantic model for
    its config keys, and ``compute(inputs) -> LossOutput``.
    """


@hookspec
def register_reference_policies(register: Register) -> None:
    """Register reference-policy classes with ``register(ReferenceClass)``.

    A reference policy satisfies ``aligner.protocols.ReferencePolicy``: it is built from the policy
    at the start of a stage and returns reference log-probs for a batch.
    """


@hookspec
def register_judges(register: Register) -> None:
    """Register judge classes with ``register(JudgeClass)``.

    A judge satisfies ``aligner.protocols.Judge``: it scores completions for prompts.
    """


@hookspec
def register_peft_backends(register: Register) -> None:
    """Register PEFT backend classes with ``register(BackendClass)``.

    A backend satisfies ``aligner.protocols.PeftBackend``: it wraps a model for training and says
    which parameters are trainable.
    """


@hookspec
def register_callbacks(register: Register) -> None:
    """Register callback classes with ``register(CallbackClass)``: lifecycle plugins with settings
    that a run's config switches on by name (``callbacks: [{name: ..., <options>}]``).

    A callback satisfies ``aligner.protocols.Callback``: a unique ``name``, an ``Options`` pydantic
    model for its config keys, and at least one lifecycle hook (``on_run_start`` ... ``on_run_failed``)
    as a ``@hookimpl`` method. aligner builds one instance per entry of ``callbacks`` as
    ``CallbackClass(options)`` and registers it as a plugin for the duration of ``aligner.train``.
    """


@hookspec
def register_algorithms(register: Register) -> None:
    """Register algorithm classes with ``register(AlgorithmClass)``: how a stage trains, chosen by a
    stage's ``algorithm: {name: ..., <options>}`` (default ``offline``, the weighted losses).

    An algorithm satisfies ``aligner.protocols.Algorithm``: a unique ``name``, the ``data_formats``
    it trains on, an ``Options`` pydantic model, ``setup(context)`` and ``train_step(step)``, plus
    members that ``aligner.algorithms.Algorithm`` (the base class to subclass) gives defaults for.
    The stage runner does everything else (optimizer, schedule, guard, checkpoints, resume, hooks).
    """


@hookspec
def register_advantage_estimators(register: Register) -> None:
    """Register advantage-estimator classes with ``register(EstimatorClass)``: how online algorithms
    turn rollout rewards into advantages (``gae``, ``group_relative``, ``rloo``, ...), chosen by an
    algorithm's ``estimator: {name: ..., <options>}``.

    An estimator satisfies ``aligner.protocols.AdvantageEstimator``: a unique ``name``,
    ``needs_critic``, an ``Options`` pydantic model and ``estimate(inputs) -> Advantages``.
    """


@hookspec
def register_generation_engines(register: Register) -> None:
    """Register generation-engine classes with ``register(EngineClass)``: how online algorithms sample
    rollouts (``hf``, ``openai_server``, ``vllm``), chosen by an algorithm's ``engine: {name: ..., <options>}``.

    An engine satisfies ``aligner.protocols.GenerationEngine``: a unique ``name``, an ``Options``
    pydantic model, ``check_stage(stage)``, ``generate(policy, tokenizer, request) -> Generations`` and
    ``close()``; ``aligner.online.engines.GenerationEngine`` is the base class with the defaults.
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register optimizer classes with ``register(OptimizerClass)``: how a stage's trainable weights are
    updated (``adamw``, ``adamw_8bit``, ``lora_plus``, ``lora_fa``), chosen by a stage's
    ``optimizer: {name: ..., <options>}`` (default ``adamw``).

    An optimizer satisfies ``aligner.protocols.Optimizer``: a unique ``name``, an ``Options`` pydantic
    model and ``build(context) -> torch.optim.Optimizer``, ``context`` being an
    ``aligner.optimizers.OptimizerContext`` (the trainable named parameters, the module and the policy,
    the stage's learning rate and weight decay). The stage runner keeps the schedule, clipping, the
    non-finite guard and checkpointing of the optimizer's ``state_dict``.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle hooks: observe and extend a run. ``run`` is the live ``aligner.training.run_state.RunState``; a
# hook may read it, add metrics to the dict it is given, or set ``run.should_stop = True``.
# Return values are ignored.
# ---------------------------------------------------------------------------------------------


@hookspec
def on_run_start(run: RunState) -> None:
    """Called once per stage after setup (model wrapped, reference ready, optimizer built), before
    the evaluation at the start and the first step. ``run.step`` is 0; ``run.total_steps`` is known."""


@hookspec
def on_step_end(run: RunState, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step with that step's training metrics (``loss``, the losses'
    metrics, ``learning_rate``, ...), before they are logged: keys added to ``metrics`` are logged too."""


@hookspec
def on_evaluate(run: RunState, step: int, metrics: dict[str, float]) -> None:
    """Called after each held-out evaluation (at the start, every ``eval_every`` steps, at the end)
    with the ``eval/...`` metrics, before they are logged: keys added to ``metrics`` are logged too."""


@hookspec
def on_checkpoint_saved(run: RunState, step: int, path: str) -> None:
    """Called after a checkpoint directory has been completely and atomically written."""


@hookspec
def on_run_end(run: RunState, metrics: dict[str, float]) -> None:
    """Called once per stage after training and the final save, with the stage's final metrics
    (``train/...`` from the last step and ``eval/...`` from the final evaluation)."""


@hookspec
def on_run_failed(run: RunState, error: BaseException) -> None:
    """Called once when a stage stops without finishing, instead of ``on_run_end``: ``error`` is what
    stopped it (``aligner.errors.Interrupted`` after SIGINT/SIGTERM, once its checkpoint is saved;
    ``NonFiniteError`` after too many non-finite steps; any other exception). The error is raised
    again afterwards; an exception from the hook itself is logged, not raised."""
