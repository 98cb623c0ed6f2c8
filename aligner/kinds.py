"""The one table of plugin kinds: everything aligner knows about a kind of plugin, in one place.

Each ``Kind`` says what registers it (its registration hook), what it must provide (its protocol in
``aligner.protocols`` and the required members), where docs/plugins.md describes it, and what it is
for. The registries (``aligner.plugins``), the checks at registration (``aligner.registry``),
``aligner plugins`` and the meta-tests on the docs all read ``KINDS``; adding a kind means adding a
row here, a hook in ``aligner.hookspecs``, a protocol and a docs section, and the tests say which is
missing.

A kind's optional members are the members its protocol gives a value (a class attribute with a
default, a method with a body): ``Kind.defaults``. When a class is registered, every optional member
it lacks is set on it to that default (``Kind.fill_defaults``), so a third-party class that does not
subclass anything still has them, and aligner reads them as plain attributes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aligner import protocols
from aligner.protocols import DATA_FORMATS, LIFECYCLE_HOOKS, REQUIREMENT_ROLES, Requires

# A per-kind check run when a class is registered: it returns what is wrong (completing "registered
# <kind> '<name>' ...") or None.
Check = Callable[[Any], "str | None"]


def valid_data_formats(obj: Any) -> str | None:
    """``data_formats`` names known formats, at least one."""
    unknown = [f for f in obj.data_formats if f not in DATA_FORMATS]
    if unknown or not obj.data_formats:
        return f"with invalid data_formats {obj.data_formats!r}; valid formats: {', '.join(DATA_FORMATS)}"
    return None


def valid_requires(obj: Any) -> str | None:
    """``requires`` is a tuple of ``Requires`` naming known roles (else the mistake would surface only
    when a stage is prepared)."""
    requires = obj.requires
    if not isinstance(requires, tuple | list) or not all(
            isinstance(r, Requires) and r.role in REQUIREMENT_ROLES and isinstance(r.flag, str) for r in requires):
        return ("whose 'requires' is not a tuple of aligner.protocols.Requires with a role among "
                f"{', '.join(REQUIREMENT_ROLES)}")
    return None


def implements_a_lifecycle_hook(obj: Any) -> str | None:
    """A callback has at least one lifecycle hook as a method."""
    if not any(callable(getattr(obj, hook, None)) for hook in LIFECYCLE_HOOKS):
        return f"which implements none of the lifecycle hooks ({', '.join(LIFECYCLE_HOOKS)}) as @hookimpl methods"
    return None


@dataclass(frozen=True)
class Kind:
    """One kind of plugin."""

    name: str  # the registry's key and how messages name the kind: "loss", "reference policy", ...
    hook: str  # the registration hook in aligner.hookspecs
    protocol: type  # the protocol class in aligner.protocols
    required: tuple[str, ...]  # members a registered class must have
    anchor: str  # the section of docs/plugins.md describing it (docs/plugins.md#<anchor>)
    description: str  # one line: what a plugin of this kind does
    values: tuple[str, ...] = ("name", "Options")  # required members that are values, not methods
    base: str | None = None  # a base class giving defaults to subclass, as "module.Class"
    checks: tuple[Check, ...] = ()  # further checks at registration

    @property
    def protocol_path(self) -> str:
        """``aligner.protocols.Loss``: where the protocol is imported from."""
        return f"{self.protocol.__module__}.{self.protocol.__name__}"

    @property
    def defaults(self) -> dict[str, Any]:
        """Each optional member and its default, as the protocol declares them."""
        return {name: value for name, value in vars(self.protocol).items()
                if not name.startswith("_") and name not in self.required}

    @property
    def methods(self) -> tuple[str, ...]:
        """The required members that must be callable."""
        return tuple(m for m in self.required if m not in self.values)

    def fill_defaults(self, obj: Any) -> list[str]:
        """Give ``obj`` (a registered class) every optional member it lacks, with its default; return
        the names filled."""
        filled = []
        for name, default in self.defaults.items():
            method = inspect.isfunction(default) or isinstance(default, classmethod)
            # ``check_stage = None`` meant "none" when optional members were read with getattr(..., None):
            # a method set to None still gets the default (a no-op), as such plugins always behaved.
            if hasattr(obj, name) and not (method and getattr(obj, name) is None):
                continue
            if not isinstance(obj, type) and (inspect.isfunction(default) or isinstance(default, classmethod)):
                default = default.__get__(obj, type(obj))  # an instance registered: bind the method to it
            setattr(obj, name, default)
            filled.append(name)
        return filled

    def not_methods(self, obj: Any) -> list[str]:
        """Members that must be methods but are not: the required ones, and optional ones whose
        default is a method."""
        optional = [n for n, d in self.defaults.items() if (inspect.isfunction(d) or isinstance(d, classmethod))
                    and getattr(obj, n, None) is not None]  # None: absent, filled with the default
        return [m for m in (*self.methods, *optional) if hasattr(obj, m) and not callable(getattr(obj, m))]


KINDS: tuple[Kind, ...] = (
    Kind("loss", "register_losses", protocols.Loss,
         ("name", "data_formats", "needs_reference", "Options", "compute"), "loss",
         "a training objective on a micro-batch's log-probs (or scores), weighted in a stage's losses",
         values=("name", "data_formats", "needs_reference", "Options"),
         checks=(valid_data_formats, valid_requires)),
    Kind("reference policy", "register_reference_policies", protocols.ReferencePolicy,
         ("name", "Options", "setup", "logprobs"), "referencepolicy",
         "supplies the reference log-probs losses and KL terms compare against",
         checks=(valid_requires,)),
    Kind("judge", "register_judges", protocols.Judge, ("name", "Options", "score"), "judge",
         "scores (or compares) completions: online rewards, held-out generation metrics, aligner label"),
    Kind("peft backend", "register_peft_backends", protocols.PeftBackend, ("name", "Options", "apply"),
         "peftbackend", "decides which weights train (full, LoRA, QLoRA, any peft method, ...)",
         checks=(valid_requires,)),
    Kind("callback", "register_callbacks", protocols.Callback, ("name", "Options"), "callback",
         "a lifecycle plugin with settings, switched on by a config's callbacks: list",
         checks=(implements_a_lifecycle_hook,)),
    Kind("algorithm", "register_algorithms", protocols.Algorithm,
         ("name", "data_formats", "Options", "check_stage", "needs_reference", "generation_tokens", "setup",
          "train_step", "evaluate", "state_dict", "load_state_dict", "load_weights", "policy_of", "close"),
         "algorithm", "what one training step of a stage does (offline losses, PPO, GRPO, ...)",
         values=("name", "data_formats", "Options"), base="aligner.algorithms.Algorithm",
         checks=(valid_data_formats, valid_requires)),
    Kind("advantage estimator", "register_advantage_estimators", protocols.AdvantageEstimator,
         ("name", "needs_critic", "Options", "estimate"), "advantageestimator",
         "turns an online rollout's rewards into per-token advantages",
         values=("name", "needs_critic", "Options")),
    Kind("generation engine", "register_generation_engines", protocols.GenerationEngine,
         ("name", "Options", "check_stage", "generate", "close"), "generationengine",
         "samples an online stage's rollouts (hf, an OpenAI-compatible server, vLLM)",
         base="aligner.online.engines.GenerationEngine"),
    Kind("optimizer", "register_optimizers", protocols.Optimizer, ("name", "Options", "build"), "optimizer",
         "builds the torch optimizer over a stage's trainable weights"),
)

KINDS_BY_NAME: dict[str, Kind] = {kind.name: kind for kind in KINDS}


def get_kind(name: str) -> Kind:
    """The kind called ``name`` (``"loss"``, ``"reference policy"``, ...)."""
    return KINDS_BY_NAME[name]
