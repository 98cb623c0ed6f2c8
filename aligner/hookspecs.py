"""The hook specifications: the whole public contract between aligner and its plugins.

A plugin is a module or object with functions marked ``@aligner.hookimpl`` whose names match the
specs below. Built-in plugins (``aligner/losses``, ``aligner/references``, ...) use exactly these
hooks; third-party ones are found through the ``aligner`` entry-point group.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("aligner")
hookimpl = pluggy.HookimplMarker("aligner")


# ---------------------------------------------------------------------------------------------
# Registration hooks: called once when the registries are built. Each receives a ``register``
# callback; call it once per object. The registry checks the object against its protocol
# (see ``aligner.protocols``), rejects duplicate names and records which plugin registered it.
# ---------------------------------------------------------------------------------------------


@hookspec
def register_losses(register: Any) -> None:
    """Register loss classes with ``register(LossClass)``.

    A loss class satisfies ``aligner.protocols.Loss``: it has a unique ``name``, the
    ``data_formats`` it trains on, whether it ``needs_reference``, an ``Options`` pydantic model for
    its config keys, and ``compute(inputs) -> LossOutput``.
    """


@hookspec
def register_reference_policies(register: Any) -> None:
    """Register reference-policy classes with ``register(ReferenceClass)``.

    A reference policy satisfies ``aligner.protocols.ReferencePolicy``: it is built from the policy
    at the start of a stage and returns reference log-probs for a batch.
    """


@hookspec
def register_judges(register: Any) -> None:
    """Register judge classes with ``register(JudgeClass)``.

    A judge satisfies ``aligner.protocols.Judge``: it scores completions for prompts.
    """


@hookspec
def register_peft_backends(register: Any) -> None:
    """Register PEFT backend classes with ``register(BackendClass)``.

    A backend satisfies ``aligner.protocols.PeftBackend``: it wraps a model for training and says
    which parameters are trainable.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle hooks: observe and extend a run. ``run`` is the live ``aligner.run.RunState``; a
# hook may read it, add metrics to the dict it is given, or set ``run.should_stop = True``.
# Return values are ignored.
# ---------------------------------------------------------------------------------------------


@hookspec
def on_run_start(run: Any) -> None:
    """Called once per stage after setup (model, data, reference ready), before the first step."""


@hookspec
def on_step_end(run: Any, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step with that step's metrics; plugins may add keys in place."""


@hookspec
def on_evaluate(run: Any, step: int, metrics: dict[str, float]) -> None:
    """Called after each evaluation with the ``eval/...`` metrics; plugins may add keys in place."""


@hookspec
def on_checkpoint_saved(run: Any, step: int, path: str) -> None:
    """Called after a checkpoint directory has been completely and atomically written."""


@hookspec
def on_run_end(run: Any, metrics: dict[str, float]) -> None:
    """Called once per stage after training, with the stage's final metrics."""
