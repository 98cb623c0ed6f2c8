"""The ``aligner revise`` and ``aligner constitutional`` subcommands (imported with the parser: no torch here)."""

from __future__ import annotations

import argparse


def _revise(args: argparse.Namespace) -> int:
    from aligner.constitutional.config import load_revise_config
    from aligner.constitutional.revise import revise

    config = load_revise_config(args.config, args.overrides)
    counts = revise(config)
    print(f"{config.output}: {counts['revised']} revised, {counts['skipped']} already done")
    return 0


def _constitutional(args: argparse.Namespace) -> int:
    from aligner.constitutional.pipeline import run_pipeline

    run_pipeline(args.pipeline)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``revise`` (critique and revision into SFT rows) and ``constitutional`` (the whole recipe)."""
    revise = sub.add_parser("revise", help="Constitutional AI: answer, critique and revise prompts into SFT rows")
    revise.add_argument("config", help="path to a revise YAML config (see aligner.constitutional.config)")
    revise.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. rounds=2")
    revise.set_defaults(handler=_revise)
    pipeline = sub.add_parser("constitutional", help="run a Constitutional AI pipeline: revise, train, label, "
                              "train, one step after another")
    pipeline.add_argument("pipeline", help="path to a pipeline YAML (see aligner.constitutional.pipeline)")
    pipeline.set_defaults(handler=_constitutional)
