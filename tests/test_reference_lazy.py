"""``reference: cached`` scores only what a run uses: a short run of a large dataset does not wait for a whole pass."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from aligner import hookimpl
from aligner.api import train
from aligner.errors import Interrupted
from aligner.plugins import temporary_plugin
from aligner.references.cached import CachedReference
from aligner.references.logprob_store import ReferenceCache
from tests.conftest import preference_rows

ROWS = 200  # 50 batches of 4: two steps draw a small part of them


class Recorder:
    """The stage's reference, the rows each training lookup asked for, and the step losses."""

    def __init__(self):
        self.reference = None
        self.losses: list[float] = []

    @hookimpl
    def on_run_start(self, run):
        self.reference = run.stage.reference

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.losses.append(float(metrics["loss"]))


@pytest.fixture
def looked_up(monkeypatch) -> list[int]:
    """Row ids of every batch the cached reference was asked for during training."""
    rows: list[int] = []
    original = CachedReference.logprobs

    def recording(self, batch):
        rows.extend(batch["row_ids"].tolist())
        return original(self, batch)

    monkeypatch.setattr(CachedReference, "logprobs", recording)
    return rows


def _run(config: dict, suffix: str) -> Recorder:
    config["output_dir"] += suffix
    recorder = Recorder()
    with temporary_plugin(recorder, name="recorder"):
        train(config)
    return recorder


def test_a_short_run_scores_only_the_batches_its_steps_draw(make_config, tmp_path, looked_up, caplog):
    cache = tmp_path / "cache"
    config = make_config("dpo", rows=preference_rows(ROWS), steps=2, reference={"name": "cached", "dir": str(cache)})
    # One spare step for an update the non-finite guard might skip: 3 steps of 4 rows are covered.
    config["stages"][0]["train"]["max_nonfinite_steps"] = 1
    logging.getLogger("aligner").propagate = True
    with caplog.at_level(logging.INFO, logger="aligner"):
        short = _run(config, "-short")
    drawn = set(looked_up)
    assert len(drawn) == 2 * 4
    scored = short.reference.scored_rows["train"]
    assert drawn <= scored
    # At most one reference batch per covered row (12 rows, 2 sequences each), far from the 200 rows.
    assert short.reference.forward_passes <= 2 * 12
    assert len(scored) < ROWS // 2
    assert "scoring reference log-probs of" in caplog.text and f"of {ROWS} rows the run's steps draw" in caplog.text
    assert "the reference pass will take about" in caplog.text

    # The same run with every row scored up front: bit-identical losses.
    full_config = make_config("dpo", rows=preference_rows(ROWS), steps=2,
                              reference={"name": "cached", "dir": str(tmp_path / "full"), "fill": "all"})
    full = _run(full_config, "-full")
    assert full.reference.scored_rows["train"] == set(range(ROWS))
    assert short.losses == full.losses

    # A warm rerun reads everything from the cache.
    looked_up.clear()
    warm = _run(config, "-warm")
    assert warm.reference.forward_passes == 0
    assert warm.losses == short.losses

    # A run that needs every row scores only the batches the short run left out, and completes the entry.
    config["stages"][0]["reference"]["fill"] = "all"
    rest = _run(config, "-rest")
    assert rest.reference.forward_passes == full.reference.forward_passes - short.reference.forward_passes
    (key,) = ReferenceCache(cache).keys()
    described = ReferenceCache(cache).describe(key)
    assert described["sequences"] == described["of"] == 2 * ROWS


class StopAt:
    """Sends this process a real SIGTERM at the end of a given step (an interrupted run)."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def on_step_end(self, run, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_resumed_run_finds_every_value_it_needs(make_config, tmp_path):
    cache = tmp_path / "cache"
    config = make_config("dpo", rows=preference_rows(ROWS), steps=3, reference={"name": "cached", "dir": str(cache)})
    config["stages"][0]["train"].update({"max_nonfinite_steps": 1, "save_every": 1})
    straight = _run(config, "-straight")
    # Interrupted after step 1, then resumed with a longer run: it continues from a data position
    # its reference setup does not see, so the setup scores every row (the cache adds the rest).
    with temporary_plugin(StopAt(1), name="stopper"), pytest.raises(Interrupted):
        _run(config, "-stopped")
    resumed = Recorder()
    with temporary_plugin(resumed, name="recorder"):
        train(config, resume=True)
    assert resumed.reference.forward_passes > 0
    assert len(resumed.reference.scored_rows["train"]) + len(straight.reference.scored_rows["train"]) >= ROWS
    assert resumed.losses == straight.losses[1:]
