"""Built-in reference policies, and the choice of one when a stage says ``reference: auto``."""

from __future__ import annotations


def choose_reference(requested: str, needs_reference: bool) -> str:
    """Resolve ``auto``: no reference pass when no loss needs one, else a frozen copy of the policy."""
    if requested != "auto":
        return requested
    return "frozen_copy" if needs_reference else "none"
