"""A model card (README.md) written next to every final model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aligner.config import RunConfig


def write_model_card(directory: Path, config: RunConfig, stage: Any, metrics: dict[str, float]) -> None:
    """Describe how the model in ``directory`` was trained: algorithm, base model, data, config, metrics."""
    base = config.model.path or f"built-in tiny Llama ({config.model.tiny.model_dump(exclude_none=True)})"
    losses = ", ".join(f"{loss.name} (weight {weight:g})" for loss, weight in stage.losses)
    algorithm = stage.algorithm.name + (f" (losses: {losses})" if losses else "")
    tags = [stage.algorithm.name] + [loss.name for loss, _ in stage.losses]
    data = stage.config.data
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()))
    stage_config = yaml.safe_dump(stage.config.model_dump(mode="json"), sort_keys=False)
    earlier = [s.name for s in config.stages[: stage.index]]
    text = f"""---
library_name: transformers
tags: [aligner, {', '.join(tags)}]
---
# {Path(config.output_dir).name} / {stage.name}

Trained with [aligner](https://github.com/) stage `{stage.name}`{f" after stage(s) {', '.join(earlier)}" if earlier else ""}.

- **Algorithm:** {algorithm}
- **Base model:** {base}
- **Reference policy:** {stage.reference_name}
- **PEFT:** {stage.peft.name}
- **Training data:** `{data.train}` ({stage.data_format}, template `{data.template}`, max length {data.max_length})
- **Evaluation data:** `{data.eval or 'none'}`

## Final metrics

| metric | value |
|---|---|
{rows}

## Stage configuration

```yaml
{stage_config}```

Load it with plain transformers: `AutoModelForCausalLM.from_pretrained("{directory.name}")`.
"""
    (directory / "README.md").write_text(text)
