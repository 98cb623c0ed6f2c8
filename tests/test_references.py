"""Reference policies: disabled_adapter holds no second copy; cached computes once and is reused."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaModel

from aligner import hookimpl
from aligner.api import train
from aligner.errors import ConfigError
from aligner.plugins import temporary_plugin
from aligner.references import choose_reference
from aligner.references.logprob_store import ReferenceCache
from tests.conftest import preference_rows


class Recorder:
    """Captures the stage's reference, counts model forward calls, and records step losses."""

    def __init__(self):
        self.reference = None
        self.forwards = 0
        self.losses: list[float] = []
        self.copies_of_embedding = None

    @hookimpl
    def on_run_start(self, run):
        self.reference = run.stage.reference
        model = run.accelerator.unwrap_model(run.model)
        embedding = model.get_input_embeddings().weight
        # Storages of the embedding matrix held by the policy and by the reference: one per copy.
        holders = [model] + [v for v in vars(run.stage.reference).values() if isinstance(v, torch.nn.Module)]
        self.copies_of_embedding = len({t.untyped_storage().data_ptr() for m in holders
                                        for t in m.state_dict().values() if t.shape == embedding.shape})

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.losses.append(float(metrics["loss"]))


def _run(config):
    """Train with a recorder; count every forward of a causal LM (policy or reference), from setup on."""
    recorder = Recorder()

    def count(module, args, output):
        # The decoder runs once per forward pass on either log-prob path (whole model or decoder + head).
        if isinstance(module, LlamaModel):
            recorder.forwards += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with temporary_plugin(recorder, name="recorder"):
            result = train(config)
    finally:
        handle.remove()
    return recorder, result


def test_auto_picks_cache_offline_on_the_fly_online_and_none_without_need():
    assert choose_reference("auto", True, "preference", "full") == "cached"
    assert choose_reference("auto", True, "prompt", "full") == "frozen_copy"
    assert choose_reference("auto", True, "prompt", "lora") == "disabled_adapter"
    assert choose_reference("auto", False, "preference", "lora") == "none"
    assert choose_reference("frozen_copy", True, "preference", "full") == "frozen_copy"
    # KTO scores mismatched prompt/completion pairs made during training: they cannot be cached.
    assert choose_reference("auto", True, "unpaired", "full", scores_extra_sequences=True) == "frozen_copy"
    assert choose_reference("auto", True, "preference", "lora", scores_extra_sequences=True) == "disabled_adapter"


def test_disabled_adapter_keeps_one_copy_of_the_base_weights(make_config):
    config = make_config("dpo", steps=1, reference={"name": "disabled_adapter"}, peft={"name": "lora", "r": 4})
    disabled, _ = _run(config)
    config = make_config("dpo", steps=1, reference={"name": "frozen_copy"}, peft={"name": "lora", "r": 4})
    config["output_dir"] += "-frozen"
    frozen, _ = _run(config)
    assert disabled.copies_of_embedding == 1
    assert frozen.copies_of_embedding == 2
    assert disabled.reference.forward_passes == 1  # one reference pass for the single step


def test_disabled_adapter_with_full_fine_tuning_is_a_clear_error(make_config):
    config = make_config("dpo", steps=1, reference={"name": "disabled_adapter"})
    with pytest.raises(ConfigError, match="needs a PEFT backend.*'full'"):
        train(config)


def test_cached_second_run_does_no_reference_forward_and_same_losses(make_config, tmp_path):
    cache_dir = tmp_path / "cache"
    rows = preference_rows(16)
    config = make_config("dpo", rows=rows[:12], eval_rows=rows[12:], steps=3,
                         reference={"name": "cached", "dir": str(cache_dir)})
    first, _ = _run(config)
    # 12 train rows in batches of 4 and 4 eval rows in one batch: 3 + 1 reference passes, once.
    assert first.reference.forward_passes == 4
    assert len(ReferenceCache(cache_dir).keys()) == 2  # train and eval entries
    config["output_dir"] += "-again"
    config["stages"][0]["losses"][0]["beta"] = 0.1  # a sweep: the reference values do not depend on beta
    second, _ = _run(config)
    assert second.reference.forward_passes == 0
    assert second.forwards == first.forwards - 4  # only policy forwards are left
    config["stages"][0]["losses"][0].pop("beta")
    config["output_dir"] += "-same"
    third, _ = _run(config)
    assert third.reference.forward_passes == 0
    assert third.losses == first.losses


def test_cached_values_equal_the_frozen_reference(make_config, tmp_path):
    config = make_config("dpo", steps=2, reference={"name": "cached", "dir": str(tmp_path / "c")})
    cached, _ = _run(config)
    config = make_config("dpo", steps=2, reference={"name": "frozen_copy"})
    config["output_dir"] += "-frozen"
    frozen, _ = _run(config)
    assert cached.losses == pytest.approx(frozen.losses, abs=1e-5)


def test_cache_key_changes_with_data_and_weights(make_config, tmp_path):
    cache_dir = tmp_path / "cache"
    config = make_config("dpo", steps=1, reference={"name": "cached", "dir": str(cache_dir)})
    _run(config)
    config["output_dir"] += "-2"
    config["stages"][0]["data"]["max_length"] = 13  # truncation changes the token ids
    second, _ = _run(config)
    assert second.reference.forward_passes > 0
    config["output_dir"] += "-3"
    config["seed"] = 1  # other initial weights
    third, _ = _run(config)
    assert third.reference.forward_passes > 0
    assert len(ReferenceCache(cache_dir).keys()) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_entry_is_rebuilt_with_a_warning(make_config, tmp_path, caplog, damage):
    cache_dir = tmp_path / "cache"
    config = make_config("dpo", steps=2, reference={"name": "cached", "dir": str(cache_dir)})
    first, _ = _run(config)
    (key,) = ReferenceCache(cache_dir).keys()
    path = ReferenceCache(cache_dir).path(key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 9]
    else:
        data[-3] ^= 0xFF  # a flipped bit inside the log-prob values: only the checksum sees it
    path.write_bytes(bytes(data))
    assert ReferenceCache(cache_dir).describe(key)["status"] == "corrupt"
    config["output_dir"] += "-again"
    logging.getLogger("aligner").propagate = True
    with caplog.at_level(logging.WARNING, logger="aligner"):
        second, _ = _run(config)
    assert "corrupt and will be rebuilt" in caplog.text
    assert second.reference.forward_passes == first.reference.forward_passes
    assert second.losses == first.losses
    assert ReferenceCache(cache_dir).describe(key)["status"] == "ok"


def test_cached_with_adapters_scores_the_base_model_like_disabled_adapter(make_config, tmp_path):
    peft = {"name": "lora", "r": 4}
    config = make_config("dpo", steps=2, reference={"name": "cached", "dir": str(tmp_path / "c")}, peft=peft)
    cached, _ = _run(config)
    config = make_config("dpo", steps=2, reference={"name": "disabled_adapter"}, peft=peft)
    config["output_dir"] += "-disabled"
    disabled, _ = _run(config)
    # The cache scores all 16 rows (4 batches) up front; disabled_adapter one batch per step.
    assert cached.reference.forward_passes == 4 and disabled.reference.forward_passes == 2
    assert cached.losses == pytest.approx(disabled.losses, abs=1e-5)
