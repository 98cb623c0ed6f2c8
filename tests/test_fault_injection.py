"""Fault injection (issue 19): the user's mistakes and the machine's failures, one table of cases.

Wide rather than deep. Every case writes a few files into ``tmp_path``, runs one ``aligner``
command through the CLI entry point (in this process, like ``tests/test_faults_cli.py``: a startup
per case would cost seconds), and checks four things:

- the exit code (2 for a user error);
- the message names where the fault is (file and line, key path, or the path that is wrong);
- no ``Traceback`` anywhere in the output (an exception escaping ``main`` is caught here and
  printed as the interpreter would, so it fails the case like it would fail the user);
- every file that existed before the command is byte-identical afterwards, and nothing new was
  written, except the paths the case lists as the command's documented outputs.

OS faults are made real where the machine allows it: a path under a regular file (``ENOTDIR``),
a directory where a file is expected (``EISDIR``), a symlink to ``/dev/full`` (``ENOSPC`` on write,
a full disk), a symlink to ``/proc/self/mem`` (``EIO`` on read, an unreadable file even for root),
and ``/sys`` (``EPERM`` on mkdir for root too, a read-only place). ``chmod``-based cases are skipped
as root, which ignores permission bits.

Cases whose fix belongs in a module this suite's owner does not edit are ``xfail(strict=True)``
with the fix named in the reason; a strict xfail turns into a failure once the fix lands, so the
mark is removed then.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import stat
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from aligner.cli import main

from .conftest import preference_rows, tiny_model, write_jsonl

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
AS_ROOT = "root ignores permission bits, so chmod cannot make this path unreadable or unwritable"


# --------------------------------------------------------------------------------------------------
# Files a case can put in tmp_path besides plain text and bytes


@dataclass(frozen=True)
class Dir:
    """An (empty) directory, where the command expects a file; ``mode`` locks it (meaningless as root)."""

    mode: int | None = None


@dataclass(frozen=True)
class Link:
    """A symbolic link to ``target``: ``/dev/full`` (writes fail: ENOSPC), ``/proc/self/mem`` (reads fail: EIO)."""

    target: str


@dataclass(frozen=True)
class Mode:
    """A file with ``content`` and permission bits ``mode`` (meaningless as root: such cases skip)."""

    content: str
    mode: int


FileSpec = str | bytes | Dir | Link | Mode

DISK_FULL = Link("/dev/full")
UNREADABLE = Link("/proc/self/mem")  # reading offset 0 of a process's memory is EIO, for root too

# --------------------------------------------------------------------------------------------------
# Shared inputs

CONFIG = """\
# a one-stage DPO run on the tiny model
output_dir: {tmp}/out
model:
  tiny: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}
tokenizer: builtin
stages:
  - name: dpo
    data: {train: train.jsonl, template: plain, max_length: 48}
    losses:
      - name: dpo
        beta: 0.1
    train:
      max_steps: 1
      batch_size: 4
"""
PREFERENCES = "".join(json.dumps(r) + "\n" for r in preference_rows(8))
PROMPTS = "".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in preference_rows(4))
LABEL = """\
output: {tmp}/labelled.jsonl
model:
  tiny: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}
tokenizer: builtin
prompts: prompts.jsonl
judge: {name: rule, callable: "aligner.quickstart.task:behaviour_score"}
num_completions: 2
max_new_tokens: 4
"""
RUN = {"c.yaml": CONFIG, "train.jsonl": PREFERENCES}  # a valid config and its data
LABELLING = {"label.yaml": LABEL, "prompts.jsonl": PROMPTS}
ADAPTER = {"adapter/adapter_config.json": json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}),
           "adapter/adapter_model.safetensors": b"\0" * 64}
METRICS = "".join(json.dumps({"stage": "dpo", "step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2))


def latin1(text: str) -> bytes:
    """``text`` with its first 'e' written as a latin-1 e-acute: one byte that is not UTF-8."""
    return text.replace("e", "\xe9", 1).encode("latin-1", errors="replace")


def bad_byte_in_line(text: str, line: int) -> bytes:
    """``text`` (UTF-8) with a latin-1 byte put into its ``line``-th line (1-based)."""
    lines = text.encode().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b"e", b"\xe9", 1)
    return b"\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Case:
    """One fault: the files it sets up, the command, and what the user must be told."""

    id: str
    files: dict[str, FileSpec]
    argv: list[str]
    where: list[str]  # fragments of the message (``{tmp}`` is the case's directory)
    code: int = 2
    writes: tuple[str, ...] = ()  # globs (relative to tmp_path) the command is documented to write
    report: bool = False  # the location is in a report on stdout (data check, verify), not an error line
    run: bool = False  # start from a copy of the trained, interrupted run in tmp/run
    skip: str | None = None
    xfail: str | None = None


def config_with(old: str, new: str) -> str:
    """The run config with ``old`` replaced by ``new``."""
    assert old in CONFIG, old
    return CONFIG.replace(old, new)


SYS_DIR = "/sys/aligner-fault-injection"


def _sys_is_read_only() -> bool:
    """Whether creating a directory directly under /sys fails here (it does on Linux, for root too)."""
    try:
        os.mkdir(SYS_DIR)
    except OSError:
        return True
    os.rmdir(SYS_DIR)
    return False


SYS_WRITABLE = None if _sys_is_read_only() else "/sys is writable here: it cannot stand for a read-only place"


CKPT = "run/dpo/checkpoints"

CASES = [
    # ---- config -------------------------------------------------------------------------------
    Case("config-yaml-syntax", {**RUN, "c.yaml": CONFIG + "  oops: [unclosed\n"}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml, line", "not valid YAML"]),
    Case("config-top-level-list", {**RUN, "c.yaml": "- a\n- b\n"}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml", "YAML mapping"]),
    Case("config-unknown-key", {**RUN, "c.yaml": CONFIG + "epoch: 3\n"}, ["train", "{tmp}/c.yaml"],
         ["unknown key 'epoch'", "{tmp}/c.yaml, line 15"]),
    Case("config-wrong-type", {**RUN, "c.yaml": config_with("batch_size: 4", "batch_size: many")},
         ["train", "{tmp}/c.yaml"], ["'stages[0].train.batch_size'", "{tmp}/c.yaml, line 14", "'many'"]),
    Case("config-unknown-loss", {**RUN, "c.yaml": config_with("- name: dpo", "- name: dpoo")},
         ["train", "{tmp}/c.yaml"], ["unknown loss 'dpoo'", "{tmp}/c.yaml, line 10", "did you mean 'dpo'"]),
    Case("config-unknown-plugin-option", {**RUN, "c.yaml": config_with("beta: 0.1", "betta: 0.1")},
         ["train", "{tmp}/c.yaml"], ["'stages[0].losses[0].betta'", "{tmp}/c.yaml, line 11", "did you mean 'beta'"]),
    Case("config-credential", {**RUN, "c.yaml": CONFIG + "wandb_api_key: abc123\n"},
         ["train", "{tmp}/c.yaml"], ["'wandb_api_key'", "{tmp}/c.yaml, line 15", "credential"]),
    Case("override-not-key-value", RUN, ["train", "{tmp}/c.yaml", "foo"], ["override 'foo'", "key.path=value"]),
    Case("override-unknown-item", RUN, ["train", "{tmp}/c.yaml", "stages.dpx.train.batch_size=3"],
         ["no item named 'dpx' in 'stages'", "did you mean 'dpo'"]),
    Case("override-unknown-key", RUN, ["train", "{tmp}/c.yaml", "stages.dpo.train.batchsize=3"],
         ["unknown key 'stages[0].train.batchsize'", "did you mean 'batch_size'"]),
    Case("override-wrong-type", RUN, ["train", "{tmp}/c.yaml", "stages.dpo.train.learning_rate=fast"],
         ["'stages[0].train.learning_rate'", "override 'stages.dpo.train.learning_rate=fast'"]),
    Case("override-index-out-of-range", RUN, ["train", "{tmp}/c.yaml", "stages.3.name=x"],
         ["index 3 out of range for 'stages'"]),
    Case("config-missing", RUN, ["train", "{tmp}/nope.yaml"], ["config file not found", "{tmp}/nope.yaml"]),
    Case("config-under-a-file", RUN, ["train", "{tmp}/train.jsonl/c.yaml"], ["{tmp}/train.jsonl/c.yaml"]),
    Case("config-is-a-directory", {**RUN, "c.yaml": Dir()}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml", "is a directory"]),

    Case("config-not-utf8", {**RUN, "c.yaml": bad_byte_in_line(CONFIG, 1)}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml, line 1", "not UTF-8"]),

    Case("config-unreadable-io-error", {**RUN, "c.yaml": UNREADABLE}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml", "Input/output error"]),

    Case("config-permission-denied", {**RUN, "c.yaml": Mode(CONFIG, 0)}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml", "Permission denied"], skip=AS_ROOT if ROOT_USER else None),

    Case("config-tokenizer-missing", RUN, ["train", "{tmp}/c.yaml", "tokenizer=./no-such-dir"],
         ["file not found for 'tokenizer'", "{tmp}/no-such-dir"]),
    Case("config-tokenizer-is-a-file", RUN, ["data", "check", "{tmp}/c.yaml", "tokenizer=train.jsonl"],
         ["could not load the tokenizer", "{tmp}/train.jsonl"]),
    Case("config-tokenizer-empty-directory", {**RUN, "tok": Dir()}, ["train", "{tmp}/c.yaml", "tokenizer=./tok"],
         ["could not load the tokenizer", "{tmp}/tok"]),

    # ---- data ---------------------------------------------------------------------------------
    Case("data-missing", RUN, ["train", "{tmp}/c.yaml", "stages.dpo.data.train=missing.jsonl"],
         ["file not found for 'stages[0].data.train'", "{tmp}/missing.jsonl"]),
    Case("data-under-a-file", RUN, ["train", "{tmp}/c.yaml", "stages.dpo.data.train=train.jsonl/x.jsonl"],
         ["'stages[0].data.train'", "{tmp}/train.jsonl/x.jsonl"]),
    Case("data-is-a-directory", {**RUN, "train.jsonl": Dir()}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/train.jsonl", "is a directory"]),
    Case("data-not-utf8", {**RUN, "train.jsonl": bad_byte_in_line(PREFERENCES, 3)}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/train.jsonl, line 3", "not UTF-8"]),
    Case("data-bad-json-line", {**RUN, "train.jsonl": PREFERENCES.replace("{", "{,", 1)},
         ["train", "{tmp}/c.yaml"], ["{tmp}/train.jsonl, line 1", "not valid JSON"]),
    Case("data-line-not-an-object", {**RUN, "train.jsonl": PREFERENCES + "[1, 2]\n"},
         ["train", "{tmp}/c.yaml"], ["{tmp}/train.jsonl, line 9", "JSON object"]),
    Case("data-empty-file", {**RUN, "train.jsonl": ""}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/train.jsonl", "no rows"]),
    Case("data-wrong-columns", {**RUN, "train.jsonl": '{"question": "a", "answer": "b"}\n'},
         ["train", "{tmp}/c.yaml"], ["{tmp}/train.jsonl, line 1"]),
    Case("data-wrong-field-type", {**RUN, "train.jsonl": PREFERENCES.replace('"chosen": "', '"chosen": 3, "x": "', 1)},
         ["train", "{tmp}/c.yaml"], ["{tmp}/train.jsonl, line 1", "field 'chosen'"]),
    Case("data-unsupported-suffix", {**RUN, "train.txt": PREFERENCES},
         ["train", "{tmp}/c.yaml", "stages.dpo.data.train=train.txt"], ["{tmp}/train.txt", "unsupported"]),
    Case("data-unreadable-io-error", {**RUN, "train.jsonl": UNREADABLE}, ["train", "{tmp}/c.yaml"],
         ["could not read {tmp}/train.jsonl", "Input/output error"]),
    Case("data-permission-denied", {**RUN, "train.jsonl": Mode(PREFERENCES, 0)}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/train.jsonl", "Permission denied"], skip=AS_ROOT if ROOT_USER else None),
    Case("check-data-missing", RUN, ["data", "check", "{tmp}/c.yaml", "stages.dpo.data.train=missing.jsonl"],
         ["file not found for 'stages[0].data.train'", "{tmp}/missing.jsonl"]),
    Case("check-eval-missing", RUN, ["data", "check", "{tmp}/c.yaml", "stages.dpo.data.eval=eval.jsonl"],
         ["file not found for 'stages[0].data.eval'", "{tmp}/eval.jsonl"]),
    Case("check-data-is-a-directory", {**RUN, "train.jsonl": Dir()}, ["data", "check", "{tmp}/c.yaml"],
         ["{tmp}/train.jsonl", "is a directory"], report=True),
    Case("check-data-not-utf8", {**RUN, "train.jsonl": bad_byte_in_line(PREFERENCES, 2)},
         ["data", "check", "{tmp}/c.yaml"], ["{tmp}/train.jsonl, line 2", "not UTF-8"], report=True),
    Case("check-data-empty", {**RUN, "train.jsonl": "\n\n"}, ["data", "check", "{tmp}/c.yaml"],
         ["{tmp}/train.jsonl", "no rows"], report=True),
    Case("check-data-unreadable", {**RUN, "train.jsonl": UNREADABLE}, ["data", "check", "{tmp}/c.yaml"],
         ["{tmp}/train.jsonl", "Input/output error"], report=True),
    Case("check-config-not-yaml", {**RUN, "c.yaml": "stages: [\n"}, ["data", "check", "{tmp}/c.yaml"],
         ["{tmp}/c.yaml, line", "not valid YAML"]),
    Case("check-eval-not-utf8", {**RUN, "eval.jsonl": bad_byte_in_line(PREFERENCES, 4)},
         ["data", "check", "{tmp}/c.yaml", "stages.dpo.data.eval=eval.jsonl"],
         ["{tmp}/eval.jsonl, line 4", "not UTF-8"], report=True),
    # ---- runs ---------------------------------------------------------------------------------
    Case("run-output-under-a-file", RUN, ["train", "{tmp}/c.yaml", "--output-dir", "{tmp}/train.jsonl/out"],
         ["'output_dir'", "{tmp}/train.jsonl/out", "{tmp}/train.jsonl is a file"]),
    Case("run-output-is-a-file", RUN, ["train", "{tmp}/c.yaml", "--output-dir", "{tmp}/train.jsonl"],
         ["'output_dir'", "{tmp}/train.jsonl is a file"]),
    Case("run-output-read-only", RUN, ["train", "{tmp}/c.yaml", "--output-dir", SYS_DIR + "/out"],
         ["'output_dir'", SYS_DIR], skip=SYS_WRITABLE),
    Case("run-output-permission-denied", {**RUN, "locked": Dir(0o555)},
         ["train", "{tmp}/c.yaml", "--output-dir", "{tmp}/locked/out"], ["'output_dir'", "{tmp}/locked/out"],
         skip=AS_ROOT if ROOT_USER else None),
    Case("run-output-holds-a-run", {**RUN, "out/config.yaml": "output_dir: x\n"}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/out", "already holds a run", "--resume"]),
    Case("run-resume-of-nothing", {**RUN, "empty": Dir()},
         ["train", "{tmp}/c.yaml", "--resume", "--output-dir", "{tmp}/empty"], ["{tmp}/empty", "no run to resume"]),
    Case("run-resume-of-a-file", RUN, ["train", "{tmp}/c.yaml", "--resume", "--output-dir", "{tmp}/train.jsonl"],
         ["{tmp}/train.jsonl", "no run to resume"]),
    Case("run-disk-full-while-training", {**RUN, "out/metrics.jsonl": DISK_FULL}, ["train", "{tmp}/c.yaml"],
         ["{tmp}/out/metrics.jsonl", "No space left on device"], writes=("out", "out/*", "out/**")),

    Case("run-reference-cache-under-a-file", RUN,
         ["train", "{tmp}/c.yaml", "stages.dpo.reference.name=cached", "stages.dpo.reference.dir={tmp}/train.jsonl/c"],
         ["could not write the reference cache {tmp}/train.jsonl/c", "{tmp}/train.jsonl is a file"],
         writes=("out", "out/*", "out/**")),
    Case("run-resume-no-intact-checkpoint",
         {f"{CKPT}/step-1/trainer_state.json": "{", f"{CKPT}/step-2/trainer_state.json": "{"},
         ["train", "{tmp}/c.yaml", "--resume", "--output-dir", "{tmp}/run"],
         ["no checkpoint of stage 'dpo'", "{tmp}/run", "trainer_state.json"], run=True),
    Case("run-resume-weights-are-a-directory",
         {f"{CKPT}/step-1/model.safetensors": Dir(), f"{CKPT}/step-2/model.safetensors": Dir()},
         ["train", "{tmp}/c.yaml", "--resume", "--output-dir", "{tmp}/run"],
         ["no checkpoint of stage 'dpo'", f"{{tmp}}/{CKPT}/step-2/model.safetensors", "a directory"], run=True),
    Case("run-resume-checkpoints-is-a-file", {CKPT: "not a directory\n"},
         ["train", "{tmp}/c.yaml", "--resume", "--output-dir", "{tmp}/run"], [f"{{tmp}}/{CKPT}"], run=True),

    Case("verify-damaged-weights", {f"{CKPT}/step-2/model.safetensors": b"\0" * 16}, ["verify", "{tmp}/run"],
         [f"{{tmp}}/{CKPT}/step-2/model.safetensors", "truncated"], run=True, report=True),
    Case("verify-file-is-a-directory", {f"{CKPT}/step-2/trainer_state.json": Dir()}, ["verify", "{tmp}/run"],
         [f"{{tmp}}/{CKPT}/step-2/trainer_state.json", "a directory"], run=True, report=True),
    Case("verify-unreadable-file", {f"{CKPT}/step-2/optimizer.pt": UNREADABLE}, ["verify", "{tmp}/run"],
         [f"{{tmp}}/{CKPT}/step-2/optimizer.pt"], run=True, report=True),
    Case("verify-missing", {}, ["verify", "{tmp}/nope"], ["{tmp}/nope"]),
    Case("verify-a-file", RUN, ["verify", "{tmp}/train.jsonl"], ["{tmp}/train.jsonl"]),
    # ---- label --------------------------------------------------------------------------------
    Case("label-config-missing", LABELLING, ["label", "{tmp}/nope.yaml"], ["config file not found", "{tmp}/nope.yaml"]),
    Case("label-unknown-key", {**LABELLING, "label.yaml": LABEL + "num_completion: 3\n"},
         ["label", "{tmp}/label.yaml"],
         ["'num_completion'", "{tmp}/label.yaml, line 9", "did you mean 'num_completions'"]),
    Case("label-prompts-missing", {**LABELLING, "label.yaml": LABEL.replace("prompts.jsonl", "none.jsonl")},
         ["label", "{tmp}/label.yaml"], ["'prompts' ({tmp}/label.yaml, line 5)", "{tmp}/none.jsonl"]),
    Case("label-prompts-not-utf8", {**LABELLING, "prompts.jsonl": bad_byte_in_line(PROMPTS, 2)},
         ["label", "{tmp}/label.yaml"], ["{tmp}/prompts.jsonl, line 2", "not UTF-8"]),
    Case("label-prompts-is-a-directory", {**LABELLING, "prompts.jsonl": Dir()},
         ["label", "{tmp}/label.yaml"], ["{tmp}/prompts.jsonl", "is a directory"]),
    Case("label-prompts-unreadable", {**LABELLING, "prompts.jsonl": UNREADABLE}, ["label", "{tmp}/label.yaml"],
         ["could not read {tmp}/prompts.jsonl", "Input/output error"]),
    Case("label-output-under-a-file", LABELLING, ["label", "{tmp}/label.yaml", "output={tmp}/prompts.jsonl/out.jsonl"],
         ["{tmp}/prompts.jsonl", "not a directory"]),
    Case("label-output-is-a-directory", {**LABELLING, "labelled.jsonl": Dir()}, ["label", "{tmp}/label.yaml"],
         ["{tmp}/labelled.jsonl", "is a directory"]),
    Case("label-output-read-only", LABELLING, ["label", "{tmp}/label.yaml", f"output={SYS_DIR}/out.jsonl"],
         [SYS_DIR], skip=SYS_WRITABLE),
    Case("label-output-not-utf8", {**LABELLING, "labelled.jsonl": b'{"prompt": "x"}\n\xff\xfe\n'},
         ["label", "{tmp}/label.yaml"], ["{tmp}/labelled.jsonl, line 2", "not UTF-8"]),
    # Both files full: the tiny model's answers may all tie, or none.
    Case("label-disk-full", {**LABELLING, "labelled.jsonl": DISK_FULL, "labelled.jsonl.ties.jsonl": DISK_FULL},
         ["label", "{tmp}/label.yaml"], ["could not write {tmp}/labelled.jsonl", "No space left on device"]),
    # ---- export -------------------------------------------------------------------------------
    Case("export-run-missing", {}, ["export", "{tmp}/nope"], ["{tmp}/nope", "no such directory"]),
    Case("export-run-is-a-file", RUN, ["export", "{tmp}/train.jsonl"], ["{tmp}/train.jsonl", "not a directory"]),
    Case("export-summary-not-utf8", {"r/summary.json": latin1('{"final_model": "e"}')}, ["export", "{tmp}/r"],
         ["{tmp}/r/summary.json", "not UTF-8"]),
    Case("export-summary-is-a-directory", {"r/summary.json": Dir()}, ["export", "{tmp}/r"],
         ["{tmp}/r/summary.json", "is a directory"]),
    Case("export-summary-unreadable", {"r/summary.json": UNREADABLE}, ["export", "{tmp}/r"],
         ["could not read {tmp}/r/summary.json", "Input/output error"]),
    Case("export-summary-of-another-tool", {"r/summary.json": '{"accuracy": 0.9}'}, ["export", "{tmp}/r"],
         ["{tmp}/r/summary.json", "not an aligner run summary"]),
    Case("export-final-model-missing", {"r/summary.json": json.dumps({"final_model": "/nonexistent/final"})},
         ["export", "{tmp}/r"], ["/nonexistent/final", "not found"]),
    Case("export-output-under-a-file", {**ADAPTER, "f": "x"}, ["export", "{tmp}/adapter", "--output", "{tmp}/f/out"],
         ["{tmp}/f/out", "{tmp}/f is a file, not a directory"]),
    Case("export-output-is-a-file", {**ADAPTER, "f": "x"}, ["export", "{tmp}/adapter", "--output", "{tmp}/f"],
         ["{tmp}/f", "not a directory"]),
    Case("export-disk-full", {**ADAPTER, "out/adapter_config.json": DISK_FULL},
         ["export", "{tmp}/adapter", "--output", "{tmp}/out"], ["{tmp}/out", "No space left on device"],
         writes=("out/*",)),
    Case("export-read-only", ADAPTER, ["export", "{tmp}/adapter", "--output", SYS_DIR + "/out"], [SYS_DIR],
         skip=SYS_WRITABLE),
    # ---- cache --------------------------------------------------------------------------------
    Case("cache-dir-is-a-file", RUN, ["cache", "list", "--dir", "{tmp}/train.jsonl"],
         ["{tmp}/train.jsonl", "not a directory"]),
    Case("cache-unknown-key", {"cache/.keep": ""}, ["cache", "info", "abc", "--dir", "{tmp}/cache"],
         ["'abc'", "{tmp}/cache"]),
    Case("cache-entry-is-a-directory", {"cache/abcd.safetensors": Dir(), "cache/ef01.safetensors": b"x"},
         ["cache", "clear", "--dir", "{tmp}/cache"], ["{tmp}/cache/abcd.safetensors", "is a directory"]),
    # ---- plot ---------------------------------------------------------------------------------
    Case("plot-run-missing", {}, ["plot", "{tmp}/nope"], ["{tmp}/nope"]),
    Case("plot-metrics-bad-json", {"r/metrics.jsonl": METRICS + '{"stage": "dpo", "step": 3, "loss": \n'},
         ["plot", "{tmp}/r"], ["{tmp}/r/metrics.jsonl, line 3", "not valid JSON"]),
    Case("plot-metrics-not-utf8", {"r/metrics.jsonl": bad_byte_in_line(METRICS, 2)}, ["plot", "{tmp}/r"],
         ["{tmp}/r/metrics.jsonl, line 2", "not UTF-8"]),
    Case("plot-metrics-is-a-directory", {"r/metrics.jsonl": Dir()}, ["plot", "{tmp}/r"],
         ["{tmp}/r/metrics.jsonl", "is a directory"]),
    Case("plot-metrics-unreadable", {"r/metrics.jsonl": UNREADABLE}, ["plot", "{tmp}/r"],
         ["could not read {tmp}/r/metrics.jsonl", "Input/output error"]),
    Case("plot-run-is-a-file", RUN, ["plot", "{tmp}/train.jsonl"], ["{tmp}/train.jsonl", "not a directory"]),
    Case("plot-record-without-stage", {"r/metrics.jsonl": METRICS + '{"step": 3, "loss": 0.1}\n'},
         ["plot", "{tmp}/r"], ["{tmp}/r/metrics.jsonl, line 3", "'stage'"]),
    Case("plot-plots-is-a-file", {"r/metrics.jsonl": METRICS, "r/plots": "x"}, ["plot", "{tmp}/r"],
         ["{tmp}/r/plots", "not a directory"]),
    Case("plot-disk-full", {"r/metrics.jsonl": METRICS, "r/plots/dpo.png": DISK_FULL}, ["plot", "{tmp}/r"],
         ["{tmp}/r/plots/dpo.png", "No space left on device"]),
]

# A case's id is its row's identity in reports and in docs/failures.md's count.
assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# --------------------------------------------------------------------------------------------------
# Running a case


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A tiny DPO run stopped by SIGTERM after step 2, with complete checkpoints step-1 and step-2 (no final)."""
    import aligner
    from aligner.errors import Interrupted
    from aligner.plugins import temporary_plugin

    from .test_resume import KillAt

    root = tmp_path_factory.mktemp("fault-run")
    data = write_jsonl(root / "train.jsonl", preference_rows(8))
    run = {"output_dir": str(root / "run"), "seed": 0, "model": tiny_model(), "tokenizer": "builtin",
           "stages": [{"name": "dpo", "data": {"train": str(data), "template": "plain", "max_length": 48},
                       "losses": [{"name": "dpo"}],
                       "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "save_every": 1}}]}
    with temporary_plugin(KillAt(2), "killer"), pytest.raises(Interrupted):
        aligner.train(run)
    (root / "config.yaml").write_text(yaml.safe_dump(run))
    assert sorted(p.name for p in (root / "run" / "dpo" / "checkpoints").iterdir()) == ["step-1", "step-2"]
    return root


def fill(text: str, tmp: Path) -> str:
    """``text`` with ``{tmp}`` standing for the case's directory (JSON braces are left alone)."""
    return text.replace("{tmp}", str(tmp))


def materialise(tmp: Path, files: dict[str, FileSpec]) -> None:
    """Create ``files`` under ``tmp``, replacing whatever is at each path."""
    for name, spec in files.items():
        path = tmp / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, Dir):
            path.mkdir()
            if spec.mode is not None:
                path.chmod(spec.mode)
        elif isinstance(spec, Link):
            path.symlink_to(spec.target)
        elif isinstance(spec, Mode):
            path.write_text(fill(spec.content, tmp))
            path.chmod(spec.mode)
        elif isinstance(spec, bytes):
            path.write_bytes(spec)
        else:
            path.write_text(fill(spec, tmp))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: file contents' SHA-256, ``dir``, or a symlink's target (never followed)."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                kind = f"link -> {os.readlink(path)}"
            elif stat.S_ISDIR(info.st_mode):
                kind = "dir"
            else:
                try:
                    kind = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError:  # a mode-000 file as a normal user: its size and mode still show a change
                    kind = f"unreadable {info.st_size} {info.st_mode:o}"
            found[str(path.relative_to(root))] = kind
    return found


def invoke(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI as ``python -m aligner`` would: an escaping exception prints a traceback and exits 1."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever escapes main is what the user would see
        traceback.print_exc()
        code = 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _param(case: Case) -> Any:
    """The case as a pytest parameter, with its skip or strict xfail mark."""
    marks = []
    if case.skip:
        marks.append(pytest.mark.skip(reason=case.skip))
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_fault(case: Case, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture) -> None:
    if case.run:
        source = request.getfixturevalue("interrupted_run")
        shutil.copytree(source / "run", tmp_path / "run", symlinks=True)
        shutil.copy(source / "config.yaml", tmp_path / "c.yaml")
    files = case.files
    materialise(tmp_path, files)
    before = snapshot(tmp_path)
    argv = [fill(a, tmp_path) for a in case.argv]
    try:
        code, out, err = invoke(argv, capsys)
    finally:
        for path, spec in files.items():  # let pytest clean up what chmod locked
            if isinstance(spec, Mode) or (isinstance(spec, Dir) and spec.mode is not None):
                (tmp_path / path).chmod(0o755 if isinstance(spec, Dir) else 0o644)
    after = snapshot(tmp_path)

    output = out + err
    assert "Traceback" not in output, output
    assert code == case.code, (code, output)
    where = [fill(w, tmp_path) for w in case.where]
    if case.report:
        for fragment in where:
            assert fragment in output, (fragment, output)
    else:
        errors = [line for line in err.splitlines() if line.startswith("aligner: error: ")]
        assert len(errors) == 1, err
        for fragment in where:
            assert fragment in errors[0], (fragment, errors[0])

    def documented(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in case.writes)

    changed = sorted(p for p, digest in before.items() if not documented(p) and after.get(p) != digest)
    assert not changed, f"changed or deleted: {changed}"
    created = sorted(p for p in after if p not in before and not documented(p))
    assert not created, f"written although the command failed: {created}"


def test_the_table_is_wide() -> None:
    """At least 40 cases that run and pass here (skips and xfails do not count), across every kind of fault."""
    runnable = [c for c in CASES if not c.skip and not c.xfail]
    assert len(runnable) >= 40, len(runnable)
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert {"config", "override", "data", "check", "run", "verify", "label", "export", "cache", "plot"} <= prefixes


def test_debug_shows_the_traceback_of_an_os_error(tmp_path: Path) -> None:
    """``--debug`` turns the located line back into the exception, with its cause for an OS error."""
    from aligner.errors import AlignerError

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(METRICS)
    (tmp_path / "r" / "plots").write_text("x")
    with pytest.raises(AlignerError, match="not a directory") as raised:
        main(["--debug", "plot", str(tmp_path / "r")])
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno in (errno.ENOTDIR, errno.EEXIST)

