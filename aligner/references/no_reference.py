"""``none``: no reference model at all, for reference-free losses (SFT, ORPO, SimPO, ...)."""

from __future__ import annotations

from typing import Any

from aligner.hookspecs import hookimpl
from aligner.protocols import Options, ReferenceContext, ReferenceNeeds, SequenceLogProbs


class NoReference:
    """Holds nothing and is never asked for log-probs (the loop checks that no loss needs them)."""

    name = "none"
    # ``reference: auto`` picks it exactly when nothing in the stage reads reference log-probs.
    auto_priority = 100

    @classmethod
    def usable_for(cls, needs: ReferenceNeeds) -> bool:
        """Only for a stage that needs no reference (no reference pass at all)."""
        return not needs.needs_reference

    class Options(Options):
        """No options."""

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def setup(self, context: ReferenceContext) -> None:
        """Nothing to prepare."""

    def logprobs(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Never called: a stage whose losses need a reference cannot select ``none``."""
        raise RuntimeError("reference 'none' was asked for log-probs")


@hookimpl
def register_reference_policies(register):
    """Register ``none``."""
    register(NoReference)
