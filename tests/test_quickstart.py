"""The quickstart recipe reaches its promised held-out numbers (about 30 s on 2 CPU cores)."""

from __future__ import annotations

import aligner

from .conftest import ROOT


def test_quickstart_dpo_reaches_high_accuracy_and_improves_behaviour(tmp_path):
    result = aligner.train(ROOT / "configs" / "quickstart.yaml", output_dir=tmp_path / "quickstart")
    sft, dpo = result.metrics["sft"], result.metrics["dpo"]
    assert dpo["eval/rewards/accuracies"] >= 0.9
    # DPO makes friendly answers much more common than after SFT alone (measured: 0.61 -> 0.95).
    assert dpo["eval/judge_score"] >= sft["eval/judge_score"] + 0.2
    assert dpo["eval/judge_score"] >= 0.8
