"""Built-in reference policies, and the choice of one when a stage says ``reference: auto``."""

from __future__ import annotations

from aligner.protocols import PROMPT_ONLY


def choose_reference(requested: str, needs_reference: bool, data_format: str | None = None,
                     peft_name: str | None = None) -> str:
    """Resolve ``auto`` to the fastest correct reference for the stage.

    - no loss needs a reference: ``none`` (no reference pass at all);
    - offline data (the completions are in the dataset): ``cached``, every value computed once,
      before training, and reused by later runs on the same model and data;
    - online data (prompts only; completions are generated during training, so they cannot be
      precomputed): on the fly, from the base model with adapters off when a PEFT backend is used
      (no second copy), else from a frozen copy.
    """
    if requested != "auto":
        return requested
    if not needs_reference:
        return "none"
    if data_format != PROMPT_ONLY:
        return "cached"
    return "frozen_copy" if peft_name in (None, "full") else "disabled_adapter"
