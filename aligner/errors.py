"""User-facing errors.

Every error a user can cause (bad config, bad data, unknown plugin name, a broken plugin) is an
`AlignerError`. The CLI prints its message on one line and exits with code 2; only `--debug` shows a
traceback. Anything else escaping is a bug in aligner or a plugin and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlignerError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    exit_code = 2


class ConfigError(AlignerError):
    """The configuration is invalid: unknown key, wrong type, missing file, bad override."""


class DataError(AlignerError):
    """A dataset row or file is invalid; the message names the file, line and field."""


class PluginError(AlignerError):
    """A plugin failed to load, registered something invalid, or a name is unknown."""


class Interrupted(AlignerError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint to resume from."""

    exit_code = 130


def suggest(name: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or an empty string.

    Two letters swapped is the likeliest typo of all, and difflib's ratio misses it in short names
    (``rl`` for ``lr`` scores 0.5), so a candidate with the same letters in another order comes first.
    """
    name, options = str(name), [str(c) for c in candidates]
    swapped = [c for c in options if c != name and sorted(c) == sorted(name)]
    matches = swapped[:1] or difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
