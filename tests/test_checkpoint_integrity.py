"""Verified checkpoints (issue 19): damage found after completion is skipped, named, and never deleted.

One tiny SFT run is trained twice per session: straight to step 6, and killed at step 4 (checkpoints
step-2 and step-4). Each test damages a copy of them and resumes or verifies it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import aligner
from aligner.cli import main
from aligner.errors import Interrupted
from aligner.plugins import temporary_plugin
from aligner.training.checkpoint_manifest import MARKER, manifest, verify_checkpoint
from aligner.training.checkpoint_writing import write_atomically

from .conftest import sft_rows, tiny_model, write_jsonl
from .test_resume import KillAt


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A straight run to step 6 and one killed at step 4, plus the YAML config both came from."""
    root = tmp_path_factory.mktemp("integrity")
    data = write_jsonl(root / "sft.jsonl", sft_rows(16))
    config = {"output_dir": str(root / "straight"), "seed": 0, "model": tiny_model(), "tokenizer": "builtin",
              "stages": [{"name": "sft", "data": {"train": str(data), "template": "plain", "max_length": 48},
                          "losses": [{"name": "sft"}],
                          "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "save_every": 2}}]}
    aligner.train(config)
    config["output_dir"] = str(root / "killed")
    with temporary_plugin(KillAt(4), "killer"), pytest.raises(Interrupted):
        aligner.train(config)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"straight": root / "straight", "killed": root / "killed", "config": path}


def copy_run(runs: dict[str, Path], which: str, tmp_path: Path) -> Path:
    target = tmp_path / which
    shutil.copytree(runs[which], target)
    return target


def resume(runs: dict[str, Path], run_dir: Path, capsys) -> tuple[int, str]:
    code = main(["train", str(runs["config"]), "--resume", "--output-dir", str(run_dir)])
    return code, capsys.readouterr().err


def same_final_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(str(d / "sft" / "final" / "model.safetensors")) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def tree(root: Path, with_times: bool = True) -> dict[str, tuple]:
    """Every file and directory under ``root`` with its content hash (and modification time)."""
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(root))] = (digest, stat.st_mtime_ns) if with_times else (digest,)
    return found


def flip_byte(path: Path, offset: int = -100) -> bytes:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def make_legacy(checkpoint: Path) -> None:
    """What an aligner from before manifests wrote: a marker reading ``ok``."""
    (checkpoint / MARKER).write_text("ok\n")


# --- resume -------------------------------------------------------------------------------------


def test_flipped_bytes_in_the_newest_model_fall_back_to_the_previous_checkpoint(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    model = run / "sft" / "checkpoints" / "step-4" / "model.safetensors"
    damaged = flip_byte(model)
    code, err = resume(runs, run, capsys)
    assert code == 0, err
    assert "Traceback" not in err
    warning = next(line for line in err.splitlines() if "is damaged and was skipped" in line)
    assert str(model) in warning and "contents differ from the manifest" in warning
    assert f"kept as {run / 'sft' / 'checkpoints' / 'damaged-step-4'} (nothing was deleted)" in warning
    assert f"resuming from {run / 'sft' / 'checkpoints' / 'step-2'}" in warning
    # Exact resume from step 2 gives the weights of the run that never stopped.
    assert same_final_weights(run, runs["straight"])
    # The damaged copy is still there, byte for byte: neither pruning nor the new step-4 touched it.
    assert (run / "sft" / "checkpoints" / "damaged-step-4" / "model.safetensors").read_bytes() == damaged
    assert sorted(p.name for p in (run / "sft" / "checkpoints").iterdir()) == ["damaged-step-4", "step-4", "step-6"]


def test_a_truncated_file_falls_back_and_says_truncated(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    optimizer = run / "sft" / "checkpoints" / "step-4" / "optimizer.pt"
    size = optimizer.stat().st_size
    with optimizer.open("r+b") as handle:
        handle.truncate(size // 2)
    code, err = resume(runs, run, capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{optimizer}: {size // 2} bytes, the manifest says {size} (truncated)" in err
    assert same_final_weights(run, runs["straight"])


def test_a_deleted_file_falls_back_and_says_missing(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    rng = run / "sft" / "checkpoints" / "step-4" / "rng.pt"
    rng.unlink()
    code, err = resume(runs, run, capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{rng}: missing; the manifest lists a file of" in err
    assert same_final_weights(run, runs["straight"])


def test_an_added_weights_file_is_unexpected_layout(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    step4 = run / "sft" / "checkpoints" / "step-4"
    # A stray shard would be loaded along with the real weights (load_weights reads model*.safetensors).
    shutil.copy(step4 / "model.safetensors", step4 / "model-00002-of-00002.safetensors")
    code, err = resume(runs, run, capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{step4 / 'model-00002-of-00002.safetensors'}: not in the manifest" in err
    assert same_final_weights(run, runs["straight"])


def test_when_no_checkpoint_is_intact_resume_stops_with_one_located_line_and_changes_nothing(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    checkpoints = run / "sft" / "checkpoints"
    flip_byte(checkpoints / "step-4" / "model.safetensors")
    (checkpoints / "step-2" / "trainer_state.json").unlink()
    before = tree(run, with_times=False)
    code, err = resume(runs, run, capsys)
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("aligner: error: ")]
    assert len(lines) == 1, err
    line = lines[0]
    assert f"no checkpoint of stage 'sft' in {run} is intact" in line
    assert str(checkpoints / "step-4" / "model.safetensors") in line
    assert str(checkpoints / "step-2" / "trainer_state.json") in line
    assert "nothing was changed or deleted" in line and "aligner verify" in line
    # No rename, no deletion. (config.yaml is the one file resume itself writes, before any checkpoint is
    # read: it now records this copy's output_dir and resume: true.)
    after = tree(run, with_times=False)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {k: v for k, v in before.items()
                                                                      if k != "config.yaml"}


def test_debug_shows_the_traceback_when_no_checkpoint_is_intact(runs, tmp_path):
    from aligner.training.checkpoint_manifest import CheckpointError

    run = copy_run(runs, "killed", tmp_path)
    for step in ("step-2", "step-4"):
        flip_byte(run / "sft" / "checkpoints" / step / "rng.pt")
    with pytest.raises(CheckpointError, match="is intact"):
        main(["--debug", "train", str(runs["config"]), "--resume", "--output-dir", str(run)])


def test_a_damaged_final_model_is_set_aside_and_the_stage_finished_again(runs, tmp_path, capsys):
    run = copy_run(runs, "straight", tmp_path)
    final = run / "sft" / "final"
    damaged = flip_byte(final / "model.safetensors")
    code, err = resume(runs, run, capsys)
    assert code == 0 and "Traceback" not in err
    assert f"final model {final} is damaged and was skipped: {final / 'model.safetensors'}" in err
    assert f"the stage continues from {run / 'sft' / 'checkpoints' / 'step-6'}" in err
    assert (run / "sft" / "damaged-final" / "model.safetensors").read_bytes() == damaged
    assert same_final_weights(run, runs["straight"])
    assert verify_checkpoint(final).status == "ok"


def test_a_damaged_final_model_and_no_intact_checkpoint_stop_resume_and_change_nothing(runs, tmp_path, capsys):
    run = copy_run(runs, "straight", tmp_path)
    final = run / "sft" / "final"
    flip_byte(final / "model.safetensors")
    for step in ("step-4", "step-6"):
        (run / "sft" / "checkpoints" / step / "optimizer.pt").unlink()
    before = tree(run, with_times=False)
    code, err = resume(runs, run, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"final: {final / 'model.safetensors'}: contents differ" in err
    assert f"step-6: {run / 'sft' / 'checkpoints' / 'step-6' / 'optimizer.pt'}: missing" in err
    assert "is damaged and was skipped" not in err  # nothing set aside: resume stopped instead
    after = tree(run, with_times=False)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {k: v for k, v in before.items()
                                                                      if k != "config.yaml"}


def test_a_checkpoint_without_manifest_is_used_with_a_note(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    make_legacy(run / "sft" / "checkpoints" / "step-4")
    code, err = resume(runs, run, capsys)
    assert code == 0 and "Traceback" not in err
    assert "step-4 has no checksums (written by an older aligner); only its structure was checked" in err
    assert "resumed from" in err and "step-4" in err
    assert same_final_weights(run, runs["straight"])


def test_a_truncated_checkpoint_without_manifest_still_falls_back(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    step4 = run / "sft" / "checkpoints" / "step-4"
    make_legacy(step4)
    make_legacy(run / "sft" / "checkpoints" / "step-2")
    model = step4 / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])  # a partial copy
    code, err = resume(runs, run, capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{model}: " in err and "its header describes" in err and "(truncated)" in err
    assert same_final_weights(run, runs["straight"])


def test_a_checkpoint_without_manifest_that_fails_to_load_is_one_located_line(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    step4 = run / "sft" / "checkpoints" / "step-4"
    make_legacy(step4)
    model = step4 / "model.safetensors"
    # Same length, valid JSON header, but a dtype no reader knows: only loading can find this one.
    data = model.read_bytes()
    assert data.count(b'"F32"') >= 1
    model.write_bytes(data.replace(b'"F32"', b'"Q32"', 1))
    code, err = resume(runs, run, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"aligner: error: could not load {model}: " in err and "aligner verify" in err


# --- aligner verify -----------------------------------------------------------------------------


def test_verify_a_good_run_exits_0_and_lists_every_checkpoint(runs, capsys):
    before = tree(runs["straight"])
    assert main(["verify", str(runs["straight"])]) == 0
    out = capsys.readouterr().out
    for name in ("step-4", "step-6", "final"):
        assert any(line.split()[:2] == [name, "ok"] for line in out.splitlines()), out
    assert "--resume would load the final model" in out
    assert f"verify: all 3 complete checkpoints in {runs['straight']} are intact" in out
    assert tree(runs["straight"]) == before


def test_verify_a_damaged_run_exits_2_names_the_file_and_changes_nothing(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    checkpoints = run / "sft" / "checkpoints"
    model = checkpoints / "step-4" / "model.safetensors"
    flip_byte(model)
    (checkpoints / ".tmp-step-6").mkdir()  # a write killed midway
    before = tree(run)
    assert main(["verify", str(run)]) == 2
    out = capsys.readouterr().out
    assert f"{model}: contents differ from the manifest" in out
    assert any(line.split()[:2] == ["step-4", "DAMAGED"] for line in out.splitlines())
    assert any(line.split()[:2] == [".tmp-step-6", "incomplete"] for line in out.splitlines())
    assert "--resume would continue from step-2" in out
    assert f"verify: 1 of 2 complete checkpoints in {run} are damaged" in out

    assert main(["verify", str(run), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    (stage,) = report["stages"]
    assert stage["resume"] == {"action": "checkpoint", "from": str(checkpoints / "step-2")}
    by_name = {c["name"]: c for c in stage["checkpoints"]}
    assert by_name["step-2"]["status"] == "ok" and by_name[".tmp-step-6"]["status"] == "incomplete"
    assert by_name["step-4"]["status"] == "damaged"
    assert [d["path"] for d in by_name["step-4"]["damage"]] == [str(model)]
    assert tree(run) == before  # verification only reads


def test_verify_one_checkpoint_and_one_stage(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    step2, step4 = run / "sft" / "checkpoints" / "step-2", run / "sft" / "checkpoints" / "step-4"
    (step4 / "optimizer.pt").unlink()
    assert main(["verify", str(step2)]) == 0
    assert main(["verify", str(step4)]) == 2
    assert main(["verify", str(run / "sft")]) == 2
    out = capsys.readouterr().out
    assert f"{step4 / 'optimizer.pt'}: missing" in out


def test_verify_reports_set_aside_and_legacy_checkpoints_without_failing(runs, tmp_path, capsys):
    run = copy_run(runs, "killed", tmp_path)
    flip_byte(run / "sft" / "checkpoints" / "step-4" / "model.safetensors")
    code, _ = resume(runs, run, capsys)
    assert code == 0
    make_legacy(run / "sft" / "checkpoints" / "step-6")
    assert main(["verify", str(run)]) == 0  # the damaged one was set aside by resume: known, not failing
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["damaged-step-4", "set", "aside"] for line in out.splitlines()), out
    assert any(line.split()[:2] == ["step-6", "unverified"] for line in out.splitlines()), out
    assert "(1 without checksums: structure checked only)" in out


def test_verify_of_a_directory_without_a_run_is_a_located_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing'} is not a directory" in err
    assert f"{tmp_path} holds no aligner run" in err and "Traceback" not in err


# --- the manifest itself ------------------------------------------------------------------------


def test_the_marker_holds_size_and_sha256_of_every_other_file(runs):
    step = runs["killed"] / "sft" / "checkpoints" / "step-4"
    written = json.loads((step / MARKER).read_text())
    names = sorted(p.name for p in step.iterdir() if p.name != MARKER)
    assert sorted(written["files"]) == names
    for name in names:
        data = (step / name).read_bytes()
        assert written["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert written == manifest(step)


def test_files_in_subdirectories_and_a_damaged_manifest(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))

    def extra(directory: Path) -> None:
        (directory / "head").mkdir()
        (directory / "head" / "value.bin").write_bytes(b"\1" * 5000)

    target = write_atomically(tmp_path / "step-1", model, None, {"step": 1}, extra=extra)
    assert "head/value.bin" in json.loads((target / MARKER).read_text())["files"]
    (target / "head" / "value.bin").write_bytes(b"\2" * 5000)
    found = verify_checkpoint(target)
    assert found.status == "damaged" and found.damage[0].path == target / "head" / "value.bin"
    (target / MARKER).write_text('{"format": "aligner-checkpoint-manifest", "version": 1, "files": {"../x": {}}}')
    found = verify_checkpoint(target)
    assert found.status == "damaged" and "invalid path '../x'" in found.describe()
    (target / MARKER).write_bytes(b"\xff\x00")
    assert "manifest unreadable" in verify_checkpoint(target).describe()
