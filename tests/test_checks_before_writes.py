"""Issue 19, "checks before any write": a refused run changes nothing on disk and says where it is wrong.

Each test is one defect that was there before: plugins that cannot work together refused only
after the model loaded and the run directory was written (and, with ``--overwrite``, after the
earlier run was deleted); an unwritable output directory as an ``OSError`` traceback; a refused
``--resume`` that had already rewritten ``config.yaml``; an SFT stage on preference rows running
the rejected completions too; ``data check`` reporting a missing chat template for train only.

Every refusal is checked the same way: exit code 2, one ``aligner: error:`` line naming the stage,
the key path and the config file and line, no traceback, and every file under the test's
directory byte-identical afterwards (nothing added, nothing removed).

As root (the usual container) permission bits do not stop writes, so the ``chmod`` cases are
skipped there; an output directory under a regular file, a file as output directory, ``/sys``
(not writable, even for root, where it is mounted read-only) and a simulated read-only file system
cover the same path through the code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import aligner
from aligner.cli import main
from aligner.config import load_config
from aligner.errors import ConfigError, PluginError
from aligner.hookspecs import hookimpl
from aligner.plugins import get_registry, temporary_plugin
from aligner.protocols import Options, Requires
from aligner.training.stages import prepare_stage
from tests.conftest import ROOT, preference_rows, sft_rows, write_jsonl

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# Line numbers matter: errors must point at them.
CONFIG = """\
output_dir: {out}
model:
  tiny: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
tokenizer: builtin
stages:
  - name: dpo
    data: {{train: train.jsonl, template: plain, max_length: 48}}
    reference: {{name: {reference}}}
    losses:
      - name: {loss}
    train: {{max_steps: 2, batch_size: 4, save_every: 1}}
"""
REFERENCE_LINE, LOSS_LINE, OUTPUT_LINE = 8, 10, 1


def write_config(directory: Path, out: Path | str, reference: str = "auto", loss: str = "dpo",
                 extra: str = "", name: str = "c.yaml") -> Path:
    """A one-stage config in ``directory`` (data beside it) training into ``out``."""
    if not (directory / "train.jsonl").exists():
        write_jsonl(directory / "train.jsonl", preference_rows(8))
    path = directory / name
    path.write_text(CONFIG.format(out=out, reference=reference, loss=loss) + extra)
    return path


def tree(directory: Path) -> dict[str, str]:
    """Every file and directory under ``directory``: relative path -> SHA-256 (``dir`` for directories)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), directory)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the ``aligner`` command in this process; (exit code, stderr)."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def run_module(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m aligner ...`` in a fresh process, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "aligner", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_refused(code: int, err: str, *fragments: str) -> str:
    """Exit 2, no traceback, one located error line holding every fragment; returns that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("aligner: error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished DPO run (checkpoints step-1 and step-2, final model) to copy into each test."""
    directory = tmp_path_factory.mktemp("finished")
    config = write_config(directory, directory / "out")
    aligner.train(str(config))
    return directory


@pytest.fixture
def earlier_run(finished_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run in ``tmp_path/out``, its config at ``tmp_path/c.yaml``; (config, out)."""
    shutil.copytree(finished_run / "out", tmp_path / "out")
    config = write_config(tmp_path, tmp_path / "out")
    return config, tmp_path / "out"


# -- plugins that cannot work together ------------------------------------------------------------


def test_incompatible_plugins_are_refused_before_anything_is_written(tmp_path):
    config = write_config(tmp_path, tmp_path / "out", reference="disabled_adapter")
    before = tree(tmp_path)
    result = run_module("train", str(config), cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, "stage 'dpo'", "'stages[0].reference'",
                   f"{config}, line {REFERENCE_LINE}", "'stages[0].peft'", "not set: the default", "'full'",
                   "lora")
    # Before: the model loaded, out/config.yaml was written, then setup refused without a location.
    assert tree(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_a_refused_run_does_not_block_the_fixed_rerun(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "out", reference="disabled_adapter")
    assert_refused(*cli(capsys, "train", str(config)), "'stages[0].reference'")
    fixed = write_config(tmp_path, tmp_path / "out", reference="frozen_copy")
    code, err = cli(capsys, "train", str(fixed), "stages.dpo.train.max_steps=1")
    assert code == 0, err  # before: "output_dir ... already holds a run"
    assert (tmp_path / "out" / "dpo" / "final").is_dir()


def test_overwrite_with_a_refused_config_keeps_the_earlier_run(earlier_run, tmp_path, capsys):
    _, out = earlier_run
    bad = write_config(tmp_path, out, reference="disabled_adapter", name="bad.yaml")
    before = tree(tmp_path)
    assert_refused(*cli(capsys, "train", str(bad), "--overwrite"), "stage 'dpo'", "'stages[0].reference'",
                   f"{bad}, line {REFERENCE_LINE}", "'stages[0].peft'")
    # Before: the finished run was deleted and replaced by a lone config.yaml.
    assert tree(tmp_path) == before


def test_the_peft_key_is_located_where_the_file_sets_it(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "out", reference="disabled_adapter",
                          extra="    peft: {name: full}\n")
    before = tree(tmp_path)
    assert_refused(*cli(capsys, "train", str(config)), f"'stages[0].peft' ({config}, line 12)",
                   f"'stages[0].reference' ({config}, line {REFERENCE_LINE})")
    assert tree(tmp_path) == before


def test_a_loss_that_scores_extra_sequences_is_refused_with_the_cached_reference(tmp_path, capsys):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0}
            for i, r in enumerate(preference_rows(8))]
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = write_config(tmp_path, tmp_path / "out", reference="cached", loss="kto")
    before = tree(tmp_path)
    # Before: the run started and failed at its first batch ("has no value for a sequence").
    assert_refused(*cli(capsys, "train", str(config)), "stage 'dpo'", "reference policy 'cached'",
                   f"'stages[0].reference' ({config}, line {REFERENCE_LINE})",
                   f"loss 'kto' at 'stages[0].losses[0]' ({config}, line {LOSS_LINE})", "needs_kl_completions")
    assert tree(tmp_path) == before


def test_auto_picks_what_the_backends_declare(tmp_path):
    # KTO scores mismatched pairs, so 'auto' runs a reference on the fly: with adapters, the base model.
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0}
            for i, r in enumerate(preference_rows(8))]
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = write_config(tmp_path, tmp_path / "out", loss="kto")
    assert prepare_stage(load_config(config), 0).reference_name == "frozen_copy"
    lora = load_config(config, ["stages.dpo.peft={name: lora}"])
    assert prepare_stage(lora, 0).reference_name == "disabled_adapter"


class NeedsFlaggedLosses:
    """A reference that declares a need of the stage's losses, as a plugin of another distribution would."""

    name = "test_needs_flagged_losses"
    requires = (Requires("losses", "test_flag", default=False, what="sets test_flag", hint="add one that does"),)

    class Options(Options):
        """No options."""

    def __init__(self, options=None):
        self.options = options

    def setup(self, context):
        """Nothing to set up."""

    def logprobs(self, batch):
        """Never called here."""
        raise AssertionError


class BadRequires(NeedsFlaggedLosses):
    name = "test_bad_requires"
    requires = ("peft needs adapters",)


class Registrations:
    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def register_reference_policies(self, register):
        for cls in self.classes:
            register(cls)


def test_a_plugin_declares_what_it_needs_of_the_others(tmp_path):
    config = write_config(tmp_path, tmp_path / "out", reference=NeedsFlaggedLosses.name)
    with temporary_plugin(Registrations(NeedsFlaggedLosses), name="needs"):
        with pytest.raises(ConfigError) as caught:
            prepare_stage(load_config(config), 0)
    message = str(caught.value)
    assert "needs every loss to be one that sets test_flag" in message and "loss 'dpo' at 'stages[0].losses[0]'" in message
    assert f"({config}, line {LOSS_LINE})" in message and "add one that does" in message


def test_a_malformed_requires_is_refused_when_registered():
    with temporary_plugin(Registrations(BadRequires), name="bad"), pytest.raises(PluginError, match="'requires'"):
        get_registry("reference policy")


# -- the output directory -------------------------------------------------------------------------


def test_an_output_dir_under_a_regular_file_is_one_located_line(tmp_path):
    config = write_config(tmp_path, tmp_path / "train.jsonl" / "run")
    before = tree(tmp_path)
    result = run_module("train", str(config), cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, "'output_dir'", f"{config}, line {OUTPUT_LINE}",
                   str(tmp_path / "train.jsonl" / "run"), "Not a directory", f"{tmp_path / 'train.jsonl'} is a file")
    assert tree(tmp_path) == before


def test_an_output_dir_that_is_a_file_is_one_located_line(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "train.jsonl")
    before = tree(tmp_path)
    assert_refused(*cli(capsys, "train", str(config)), "'output_dir'", f"{config}, line {OUTPUT_LINE}",
                   "is a file, not a directory")
    assert_refused(*cli(capsys, "train", str(config), "--output-dir", str(tmp_path / "c.yaml")),
                   "'output_dir' (from --output-dir)", str(tmp_path / "c.yaml"))
    assert tree(tmp_path) == before


def test_a_read_only_file_system_is_one_located_line(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    # Root can write anywhere a test can reach, and mounting needs privileges: the probe is told EROFS.
    monkeypatch.setattr("aligner.training.run_dir.tempfile.mkdtemp", read_only)
    config = write_config(tmp_path, tmp_path / "out")
    before = tree(tmp_path)
    assert_refused(*cli(capsys, "train", str(config)), "'output_dir'", f"{config}, line {OUTPUT_LINE}",
                   "read-only file system", str(tmp_path))
    assert tree(tmp_path) == before


def _sys_is_writable() -> bool:
    try:
        os.mkdir("/sys/aligner-checks-before-writes")
    except OSError:
        return False
    os.rmdir("/sys/aligner-checks-before-writes")
    return True


@pytest.mark.skipif(not os.path.isdir("/sys") or _sys_is_writable(), reason="/sys is writable here")
def test_a_place_nobody_may_write_is_one_located_line(tmp_path, capsys):
    config = write_config(tmp_path, "/sys/aligner-checks-before-writes/out")
    assert_refused(*cli(capsys, "train", str(config)), "'output_dir'", f"{config}, line {OUTPUT_LINE}", "/sys")
    assert not os.path.exists("/sys/aligner-checks-before-writes")


@pytest.mark.skipif(AS_ROOT, reason="root ignores permission bits, so chmod cannot make a directory unwritable")
def test_a_parent_without_write_permission_is_one_located_line(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "locked" / "out")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)
    try:
        before = tree(tmp_path)
        assert_refused(*cli(capsys, "train", str(config)), "'output_dir'", f"{config}, line {OUTPUT_LINE}",
                       "permission denied", str(tmp_path / "locked"))
        assert tree(tmp_path) == before
    finally:
        (tmp_path / "locked").chmod(0o755)


@pytest.mark.skipif(AS_ROOT, reason="root ignores permission bits, so chmod cannot make a directory unwritable")
def test_overwrite_that_could_not_remove_the_earlier_run_changes_nothing(earlier_run, tmp_path, capsys):
    config, out = earlier_run
    (out / "dpo").chmod(0o555)
    try:
        before = tree(tmp_path)
        assert_refused(*cli(capsys, "train", str(config), "--overwrite"), "'output_dir'", "--overwrite",
                       str(out / "dpo"), "nothing was changed")
        assert tree(tmp_path) == before
    finally:
        (out / "dpo").chmod(0o755)


def test_a_run_that_fails_before_writing_anything_takes_its_config_back(tmp_path):
    # A failure only the model can show (no module named so): config.yaml was written, nothing else.
    config = write_config(tmp_path, tmp_path / "out", extra="    peft: {name: lora, target_modules: [no_such]}\n")
    with pytest.raises(Exception, match="no_such"):
        aligner.train(str(config))
    assert not (tmp_path / "out").exists()


# -- resume ---------------------------------------------------------------------------------------


def test_a_refused_resume_leaves_config_yaml_as_it_was(earlier_run, tmp_path, capsys):
    config, out = earlier_run
    # An interrupted run whose every checkpoint was damaged since (a bad copy): resume must stop.
    shutil.rmtree(out / "dpo" / "final")
    for step in ("step-1", "step-2"):
        weights = out / "dpo" / "checkpoints" / step / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    before = tree(tmp_path)
    assert_refused(*cli(capsys, "train", str(config), "stages.dpo.train.learning_rate=0.002", "--resume"),
                   "--resume", "no checkpoint of stage 'dpo'", "model.safetensors")
    # Before: config.yaml already held the new learning rate when resume found no intact checkpoint.
    assert tree(tmp_path) == before


def test_resume_rewrites_config_yaml_once_it_is_validated(earlier_run, tmp_path, capsys):
    config, out = earlier_run
    shutil.rmtree(out / "dpo" / "final")  # interrupted after step 2's checkpoint
    metrics = (out / "metrics.jsonl").read_bytes()
    code, err = cli(capsys, "train", str(config), "--resume")
    assert code == 0, err
    # Continued from step-2 of 2: no step trained again (a fresh start would log steps 1 and 2 anew).
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "dpo" / "final").is_dir() and (out / "config.yaml").is_file()


# -- SFT on preference rows -----------------------------------------------------------------------


def test_sft_on_preference_rows_runs_only_the_chosen_completions(tmp_path, monkeypatch):
    import aligner.algorithms.offline as offline

    config = write_config(tmp_path, tmp_path / "out", loss="sft")
    stage = prepare_stage(load_config(config), 0)
    assert stage.data_format == "sft"  # before: preference, with chosen and rejected in every batch
    rows = preference_rows(8)
    assert [r.data["completion"] for r in stage.train_rows] == [r["chosen"] for r in rows]

    seen = []
    original = offline.compute_losses

    def spy(model, stage, batch):
        # Every sequence that runs is one row's prompt + chosen completion: none is a rejected one.
        seen.append((len(batch["input_ids"]), len(batch["row_ids"])))
        return original(model, stage, batch)

    monkeypatch.setattr(offline, "compute_losses", spy)
    result = aligner.train(str(config), ["stages.dpo.train.save_every=null"])
    assert seen and all(sequences == rows_in_batch for sequences, rows_in_batch in seen)
    assert result.final_metrics["train/tokens_per_second"] > 0


def test_data_check_says_preference_rows_run_as_sft(tmp_path, capsys):
    rows = preference_rows(8)
    rows[0]["rejected"] = rows[0]["chosen"]  # an identical pair: dropped by DPO, a fine SFT row
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = write_config(tmp_path, tmp_path / "out", loss="sft")
    code = main(["data", "check", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "preference format, run as sft rows (chosen completions only)): 8 rows read, 0 rejected, 0 dropped, 8 kept" \
        in out


# -- data check -----------------------------------------------------------------------------------


def test_data_check_reports_a_missing_chat_template_for_the_eval_split_too(tmp_path, capsys):
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in sft_rows(8)]
    write_jsonl(tmp_path / "train.jsonl", chat)
    write_jsonl(tmp_path / "eval.jsonl", chat[:3])
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "out", reference="auto", loss="sft")
                    .replace("template: plain", "template: auto, eval: eval.jsonl"))
    code = main(["data", "check", str(path), "--json"])
    reports = json.loads(capsys.readouterr().out)
    assert code == 2
    train, evaluation = reports
    assert evaluation["split"] == "eval" and evaluation["failed"], evaluation  # before: no problem, "? kept"
    for report in (train, evaluation):
        assert any("no chat template" in p and "'stages[0].data.template'" in p for p in report["problems"]), report
