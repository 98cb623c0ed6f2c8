"""``aligner cache list|info|clear``: look into and empty the reference log-prob cache."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from aligner.errors import ConfigError, PathError

if TYPE_CHECKING:  # aligner.references.logprob_store imports torch: only when the command runs, so `aligner --help` stays fast
    from aligner.references.logprob_store import ReferenceCache


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``cache`` subcommand to the CLI."""
    cache = sub.add_parser("cache", help="list, inspect or clear the reference log-prob cache")
    cache.add_argument("action", choices=["list", "info", "clear"])
    cache.add_argument("key", nargs="?", help="entry key (or a unique prefix) for info/clear")
    cache.add_argument("--dir", default=None, help="cache directory (default: $ALIGNER_CACHE_DIR/reference "
                                                   "or ~/.cache/aligner/reference)")
    cache.add_argument("--json", action="store_true", help="print JSON")
    cache.set_defaults(handler=run)


def _resolve(cache: ReferenceCache, prefix: str) -> str:
    matches = [k for k in cache.keys() if k.startswith(prefix)]
    if len(matches) != 1:
        raise ConfigError(f"cache key '{prefix}' matches {len(matches)} entries in {cache.directory}")
    return matches[0]


def run(args: argparse.Namespace) -> int:
    """Handle ``aligner cache ...``."""
    from aligner.references.logprob_store import ReferenceCache

    cache = ReferenceCache(args.dir)
    # A missing directory is an empty cache; a file in its place is a mistake that listing would hide.
    if cache.directory.exists() and not cache.directory.is_dir():
        raise PathError(f"{cache.directory}: is a file, not a directory (the cache directory, --dir or "
                        "$ALIGNER_CACHE_DIR/reference)")
    if args.action == "clear":
        if args.key:
            cache.remove(_resolve(cache, args.key))
            removed = 1
        else:
            removed = cache.clear()
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.directory}")
        return 0
    keys = [_resolve(cache, args.key)] if args.key else cache.keys()
    rows = [cache.describe(k) for k in keys]
    if args.json or args.action == "info":
        print(json.dumps(rows if args.action == "list" or len(rows) != 1 else rows[0], indent=2))
        return 0
    print(f"{cache.directory}: {len(rows)} entries, {sum(r['bytes'] for r in rows)} bytes")
    for r in rows:
        what = f"{r.get('stage', '?')}/{r.get('split', '?')} {r.get('sequences', '?')} sequences" \
            if r["status"] == "ok" else r["status"]
        print(f"{r['key'][:16]}  {r['bytes']:>10}  {r.get('created') or '-':25}  {what}")
    return 0
