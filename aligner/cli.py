"""The ``aligner`` command line.

Every user error exits with code 2 and one line on stderr saying what and where; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from aligner.errors import AlignerError


def _train(args: argparse.Namespace) -> int:
    from aligner.api import train

    result = train(args.config, args.overrides, output_dir=args.output_dir)
    print(f"final model: {result.final_model_dir}")
    return 0


def _label(args: argparse.Namespace) -> int:
    from aligner.label import label, load_label_config

    config = load_label_config(args.config, args.overrides)
    counts = label(config)
    print(f"{config.output}: {counts['labelled']} labelled, {counts['ties']} ties, "
          f"{counts['skipped']} already done")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from aligner.plugins import plugin_infos

    infos = plugin_infos()
    if not args.all:
        infos = [i for i in infos if i.source != "builtin"] or infos
    rows = [
        {"name": i.name, "source": i.source, "distribution": i.distribution, "version": i.version,
         "registers": i.registers}
        for i in infos
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        what = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in row["registers"].items()) or "hooks only"
        print(f"{row['name']} ({row['source']}, {row['distribution'] or '-'} {row['version'] or ''}): {what}")
    return 0


def setup_logging() -> None:
    """aligner's own messages at INFO on stderr; other libraries only at WARNING."""
    logger = logging.getLogger("aligner")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[aligner] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="aligner", description="Plugin-based alignment trainer.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="path to a YAML config")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.dpo.train.learning_rate=1e-5")
    train.add_argument("--output-dir", default=None, help="replace the config's output_dir")
    train.set_defaults(handler=_train)

    label = sub.add_parser("label", help="sample k completions per prompt and have a judge label preferences")
    label.add_argument("config", help="path to a label YAML config (see aligner.label)")
    label.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. num_completions=8")
    label.set_defaults(handler=_label)

    plugins = sub.add_parser("plugins", help="list loaded plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--all", action="store_true", help="include the built-in plugins (shown when none else)")
    plugins.set_defaults(handler=_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aligner`` command."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except AlignerError as exc:
        if debug:
            raise
        print(f"aligner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("aligner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
