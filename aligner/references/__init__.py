"""Built-in reference policies, and the choice of one when a stage says ``reference: auto``."""

from __future__ import annotations

from aligner.errors import ConfigError
from aligner.plugins import get_registry
from aligner.protocols import ReferenceNeeds


def choose_reference(requested: str, needs_reference: bool, data_format: str | None = None,
                     peft_name: str | None = None, scores_extra_sequences: bool = False,
                     peft_adds_adapters: bool | None = None) -> str:
    """Resolve ``auto`` by asking the registered reference policies (``auto_reference``); any other
    name is returned as it is.

    ``peft_adds_adapters`` is the backend's ``adds_adapters`` declaration; when it is not known
    (``None``) the registered backend ``peft_name`` is asked, and a backend that does not say either
    counts as adding adapters (as before the declaration existed).
    """
    if requested != "auto":
        return requested
    backends = get_registry("peft backend")
    if peft_adds_adapters is None and peft_name in backends:
        peft_adds_adapters = backends.get(peft_name).adds_adapters
    if peft_adds_adapters is None:
        peft_adds_adapters = peft_name is not None
    return auto_reference(ReferenceNeeds(needs_reference, data_format, scores_extra_sequences, peft_name,
                                         peft_adds_adapters))


def auto_reference(needs: ReferenceNeeds) -> str:
    """The registered reference policy with the highest ``auto_priority`` whose ``usable_for(needs)``
    is true (ties: the first name in alphabetical order).

    With the built-ins this is the fastest correct reference: ``none`` when nothing needs one (no
    reference pass at all); ``cached`` for offline data (every value computed once, before training,
    and reused by later runs on the same model and data); for online data (prompts only: completions
    are generated during training and cannot be precomputed) or a loss that scores sequences made
    during training (KTO's mismatched pairs), on the fly: ``disabled_adapter`` (the base model with
    adapters off, no second copy) when the PEFT backend adds adapters, else ``frozen_copy``. A
    third-party reference takes part by declaring ``auto_priority`` (and ``usable_for``) on its own
    class: a subclass of a built-in does not inherit its place in ``auto``.
    """
    registry = get_registry("reference policy")
    usable = sorted((-priority, name) for name in registry.names()
                    if (priority := _own_auto_priority(cls := registry.get(name))) is not None and cls.usable_for(needs))
    if not usable:
        raise ConfigError(f"no registered reference policy can serve 'reference: auto' for this stage ({needs}); "
                          "name one in 'reference'")
    return usable[0][1]


def _own_auto_priority(cls: type) -> int | None:
    """The ``auto_priority`` ``cls`` declares itself (``None`` when only inherited): a plugin that
    subclasses ``none`` or ``cached`` to add logging must not silently replace it in ``auto``."""
    return vars(cls).get("auto_priority")
