"""A full disk or a kill while a checkpoint is written leaves the previous checkpoint usable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aligner.training.checkpoint_manifest import MARKER, CheckpointError
from aligner.training.checkpoint_writing import complete_checkpoints, write_atomically


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_full_disk_midway_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    first = _model(0)
    write_atomically(directory / "step-2", first, None, {"step": 2},
                     extra=lambda d: torch.save({"optimizer": {}}, d / "optimizer.pt"))

    def disk_full(self, path, **kwargs):
        (path / "model.safetensors").write_bytes(b"\0" * 100)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", disk_full)
    with pytest.raises(CheckpointError) as info:
        write_atomically(directory / "step-4", _model(1), None, {"step": 4})
    message = str(info.value)
    assert "could not write" in message and "step-4" in message and "No space left on device" in message
    assert f"the previous checkpoint is intact: {directory / 'step-2'}" in message
    # Nothing half-written is left, and readers see only the old checkpoint.
    assert sorted(p.name for p in directory.iterdir()) == ["step-2"]
    assert complete_checkpoints(directory) == [directory / "step-2"]
    monkeypatch.undo()
    reloaded = LlamaForCausalLM.from_pretrained(directory / "step-2")
    assert _same_weights(reloaded, first)
    assert torch.load(directory / "step-2" / "optimizer.pt", weights_only=True) == {"optimizer": {}}


def test_a_full_disk_while_replacing_final_keeps_the_old_final(tmp_path, monkeypatch):
    first = _model(0)
    write_atomically(tmp_path / "final", first, None, {})
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained",
                        lambda self, path, **kw: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match="previous checkpoint is intact: .*final"):
        write_atomically(tmp_path / "final", _model(1), None, {})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert _same_weights(LlamaForCausalLM.from_pretrained(tmp_path / "final"), first)


def test_half_written_directories_are_ignored(tmp_path):
    directory = tmp_path / "checkpoints"
    write_atomically(directory / "step-2", _model(0), None, {"step": 2})
    # What transformers' own non-atomic save leaves after a crash: files but no marker.
    half = directory / "step-4"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    (directory / ".tmp-step-6").mkdir()
    assert complete_checkpoints(directory) == [directory / "step-2"]
    # The next write over a stale temporary directory replaces it.
    (directory / ".tmp-step-8").mkdir()
    (directory / ".tmp-step-8" / "junk").write_text("x")
    write_atomically(directory / "step-8", _model(1), None, {"step": 8})
    assert not (directory / ".tmp-step-8").exists()
    assert complete_checkpoints(directory) == [directory / "step-2", directory / "step-8"]


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from aligner.training.checkpoint_writing import write_atomically

    class SlowModel:
        def state_dict(self):
            return {}
        def save_pretrained(self, path, **kwargs):
            (Path(path) / "model.safetensors").write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)

    write_atomically(Path(sys.argv[1]) / "step-4", SlowModel(), None, {"step": 4})
""")


def test_a_kill_during_writing_leaves_the_previous_checkpoint_usable(tmp_path):
    directory = tmp_path / "checkpoints"
    first = _model(0)
    write_atomically(directory / "step-2", first, None, {"step": 2})
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert (directory / ".tmp-step-4" / "model.safetensors").is_file()  # killed mid-write
    assert not (directory / ".tmp-step-4" / MARKER).exists()
    assert complete_checkpoints(directory) == [directory / "step-2"]
    assert _same_weights(LlamaForCausalLM.from_pretrained(directory / "step-2"), first)


def test_a_kill_between_the_replacing_renames_is_recovered(tmp_path):
    first = _model(0)
    write_atomically(tmp_path / "final", first, None, {})
    # The state a kill leaves after "final -> .old-final" and before ".tmp-final -> final".
    (tmp_path / "final").rename(tmp_path / ".old-final")
    (tmp_path / ".tmp-final").mkdir()
    write_atomically(tmp_path / "final", _model(1), None, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert _same_weights(LlamaForCausalLM.from_pretrained(tmp_path / "final"), _model(1))
