"""Helpers for tests of online algorithms run in other processes (torchrun).

``score`` is a reward function (``rewards: [{function: tests.online_probe:score}]``): 1.0 for a
completion holding an ``e``, and it records every prompt it scores in ``$ALIGNER_PROBE_FILE.<rank>``.
Run as a script (``python tests/online_probe.py train CONFIG``) it is the ``aligner`` command with one
more plugin: the advantage estimator ``poisoned``, the group-relative one except that it returns NaN
advantages on the estimate calls that ``$ALIGNER_PROBE_NAN`` (``RANK:CALL``, 1-based, of that rank) names.
"""

from __future__ import annotations

import json
import os
import sys

import torch

_calls = {"estimate": 0}


def score(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """1.0 for each completion with an ``e``; the prompts are appended to this rank's probe file."""
    rank = os.environ.get("RANK", "0")
    path = os.environ.get("ALIGNER_PROBE_FILE")
    if path:
        with open(f"{path}.{rank}", "a") as handle:
            for prompt in prompts:
                handle.write(json.dumps({"prompt": prompt}) + "\n")
    return [1.0 if "e" in c else 0.0 for c in completions]


def _poisoned_estimator() -> type:
    from aligner.online.advantages.group_relative import GroupRelative

    class Poisoned(GroupRelative):
        """``group_relative``, with NaN advantages on the configured call of the configured rank."""

        name = "poisoned"

        def estimate(self, inputs):
            result = super().estimate(inputs)
            _calls["estimate"] += 1
            rank, _, call = os.environ.get("ALIGNER_PROBE_NAN", ":").partition(":")
            if rank == os.environ.get("RANK", "0") and call and int(call) == _calls["estimate"]:
                result.advantages = torch.full_like(result.advantages, float("nan"))
            return result

    return Poisoned


def main() -> int:
    """The ``aligner`` command line with the ``poisoned`` estimator registered."""
    import aligner
    from aligner.cli import main as cli
    from aligner.plugins import register_plugin

    class Plugin:
        @aligner.hookimpl
        def register_advantage_estimators(self, register):
            register(_poisoned_estimator())

    register_plugin(Plugin(), "online-probe")
    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
