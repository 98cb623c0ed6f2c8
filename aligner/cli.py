"""The ``aligner`` command line.

Every user error exits with code 2 and one line on stderr saying what and where; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable

from aligner.errors import AlignerError
from aligner.training.distributed import launch_is_main_process


def _train(args: argparse.Namespace) -> int:
    from aligner.api import train

    result = train(args.config, args.overrides, output_dir=args.output_dir, resume=True if args.resume else None,
                   overwrite=args.overwrite)
    if launch_is_main_process():  # once per run, not once per process
        print(f"final model: {result.final_model_dir}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from aligner.commands.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from aligner.data.check import check_data, format_reports

    # Library chatter while plugins and data load goes to stderr: stdout is the report (valid --json).
    with contextlib.redirect_stdout(sys.stderr):
        # Unset, check_data's own default (SHOW_TOKENS) applies: the number lives in one place.
        shown = {} if args.show_tokens is None else {"show_tokens": max(args.show_tokens, 0)}
        reports = check_data(args.config, args.overrides, **shown)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print(format_reports(reports))
    return 2 if any(r.failed for r in reports) else 0


def _label(args: argparse.Namespace) -> int:
    from aligner.commands.label import label, load_label_config

    config = load_label_config(args.config, args.overrides)
    counts = label(config)
    print(f"{config.output}: {counts['labelled']} labelled, {counts['ties']} ties, "
          f"{counts['skipped']} already done")
    return 0


def _plugin_kinds(as_json: bool) -> int:
    """``aligner plugins --kinds``: the table of plugin kinds (``aligner.kinds.KINDS``) and what is
    registered of each."""
    from aligner.kinds import KINDS
    from aligner.plugins import get_registry

    with contextlib.redirect_stdout(sys.stderr):
        names = {kind.name: get_registry(kind.name).names() for kind in KINDS}
    rows = [{"kind": kind.name, "hook": kind.hook, "protocol": kind.protocol_path, "base": kind.base,
             "docs": f"docs/plugins.md#{kind.anchor}", "description": kind.description,
             "optional": sorted(kind.defaults), "registered": names[kind.name]} for kind in KINDS]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['kind']} ({row['hook']}, {row['protocol']}): {row['description']}; "
              f"registered: {', '.join(row['registered']) or 'none'}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from aligner.plugins import plugin_infos

    if args.kinds:
        return _plugin_kinds(args.json)
    # Libraries imported while plugins load may print (transformers announces "[INFO] Running in WANDB
    # offline mode" on stdout): that goes to stderr, so stdout holds only the listing (valid --json).
    with contextlib.redirect_stdout(sys.stderr):
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


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted.

    ``main`` may run many times in one process (tests, notebooks) with stderr swapped in between;
    a handler bound to the first stream would write into a closed one.
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """aligner's own messages at INFO on stderr; other libraries only at WARNING."""
    logger = logging.getLogger("aligner")
    # Our own handler, not "any handler": another one left on the logger (a test's capture handler)
    # must not keep aligner's messages off stderr.
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[aligner] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # bitsandbytes (imported by peft) warns at import about an optional kernels package on CPUs.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def version() -> str:
    """The installed distribution's version (``aligner-trainer``; the import package is ``aligner``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return f"aligner-trainer {distribution_version('aligner-trainer')}"
    except PackageNotFoundError:  # imported from a source tree that pip never installed
        from aligner.version import __version__

        return f"aligner-trainer {__version__} (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="aligner", description="Plugin-based alignment trainer.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="path to a YAML config")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.dpo.train.learning_rate=1e-5")
    train.add_argument("--output-dir", default=None, help="replace the config's output_dir")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    train.set_defaults(handler=_train)

    plot = sub.add_parser("plot", help="draw loss/reward/margin/accuracy/KL curves of a run to PNG")
    plot.add_argument("run_dir", help="a run's output directory")
    plot.set_defaults(handler=_plot)

    data = sub.add_parser("data", help="inspect the data a config points to")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate every stage's data and report rows, drops and lengths "
                                "(exit 2 on rejected rows or too many drops)")
    check.add_argument("config", help="path to a YAML config")
    check.add_argument("overrides", nargs="*", help="key.path=value overrides")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.add_argument("--show-tokens", type=int, default=None, metavar="N",
                       help="show the first N rows of each source as tokens, prompt and trained marked "
                            "(default 2; 0: none)")
    check.set_defaults(handler=_data_check)
    label = sub.add_parser("label", help="sample k completions per prompt and have a judge label preferences")
    label.add_argument("config", help="path to a label YAML config (see aligner.commands.label)")
    label.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. num_completions=8")
    label.set_defaults(handler=_label)

    plugins = sub.add_parser("plugins", help="list loaded plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--all", action="store_true", help="include the built-in plugins (shown when none else)")
    plugins.add_argument("--kinds", action="store_true",
                         help="list the kinds of plugin (hook, protocol, docs section) and the names registered of each")
    plugins.set_defaults(handler=_plugins)

    from aligner.commands import cache, export, generate, push, verify
    from aligner.constitutional import cli as constitutional_cli

    cache.add_parser(sub)
    export.add_parser(sub)
    generate.add_parser(sub)  # generate: sample, switching named adapters
    verify.add_parser(sub)
    push.add_parser(sub)
    constitutional_cli.add_parsers(sub)  # revise, constitutional
    return parser


def _is_override(arg: str) -> bool:
    """``key.path=value``: an override, not a flag or a file (a path may hold '=', but not before a '/')."""
    key, equals, _ = arg.partition("=")
    return bool(equals) and bool(key) and not arg.startswith("-") and "/" not in key


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, taking ``key.path=value`` overrides anywhere on the line, before or after flags.

    argparse gives a ``nargs="*"`` positional only the values next to it, so
    ``aligner train c.yaml --resume seed=1`` would leave ``seed=1`` unrecognised; such leftovers are
    the command's overrides when it takes any, kept in the order written.
    """
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if _is_override(a)]
    unknown = [a for a in extra if not _is_override(a)]
    if overrides and not hasattr(args, "overrides"):
        unknown = extra  # this command takes no overrides: report them as argparse would
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aligner`` command."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Parsed before logging is set up: that imports transformers, which --help and --version never need.
    args = parse_args(build_parser(), argv)
    setup_logging()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
        # Flushed here, so a reader that went away is met below rather than at the interpreter's exit.
        sys.stdout.flush()
        return code
    except AlignerError as exc:
        if debug:
            raise
        print(f"aligner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("aligner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`aligner plugins | head`): nothing left to say. Point stdout at devnull
        # so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
