"""User-facing errors.

Every error a user can cause (bad config, bad data, unknown plugin name, a broken plugin) is an
`AlignerError`. The CLI prints its message on one line and exits with code 2; only `--debug` shows a
traceback. Anything else escaping is a bug in aligner or a plugin and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from pathlib import Path


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


class PathError(AlignerError):
    """A file or directory the user named cannot be read or written.

    Missing, a file where a directory belongs (or the reverse), no permission, a read-only file
    system, a full disk: the message names the path and says which, in one line.
    """


def _blocking_file(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` (or ``path`` itself) that exists as something other than a directory."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def os_error(exc: OSError, path: str | Path | None = None, doing: str = "") -> PathError:
    """A one-line ``PathError`` for an ``OSError``: ``[doing ]PATH: what is wrong``.

    ``path`` is the path the user gave (the OS may name a deeper one, or none: a failed write has
    no file name); ``doing`` says what aligner was doing with it ("could not write"). Raise it
    ``from exc`` so that ``--debug`` still shows the original error.
    """
    target = Path(path if path is not None else (exc.filename or "?"))
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOTDIR:
        # "Not a directory" alone does not say which part of the path is the file in the way.
        blocking = _blocking_file(target)
        reason = f"{blocking} is a file, not a directory" if blocking else "not a directory"
    elif exc.errno == errno.EEXIST and exc.filename and not Path(exc.filename).is_dir():
        # mkdir over a file: the file in the way may be a parent of the path being written.
        named = Path(exc.filename)
        reason = "is a file, not a directory" if named == target else f"{named} is a file, not a directory"
    elif exc.errno == errno.EISDIR:
        reason = "is a directory, not a file"
    elif exc.errno == errno.ENOENT:
        reason = "no such file or directory"
    prefix = f"{doing} " if doing else ""
    return PathError(f"{prefix}{target}: {reason}")


class OptionProblems(ValueError):
    """What is wrong with the options of a plugin named inside another plugin's options (a judge in an
    algorithm's ``judge:``, an advantage estimator, a generation engine, a reward source's judge).

    Raised while the outer options are validated, it travels through pydantic as a value error; the
    config loader then reports each problem with its full key path, file, line and a suggestion
    (``aligner.config.loading``). Each problem's ``loc`` is relative to where the exception is raised;
    :meth:`under` prefixes it when the mapping sits deeper (a list item's ``judge``). ``str()`` is the
    unlocated form, for code that validates outside a config file.
    """

    def __init__(self, problems: list[OptionProblem], label: str | None = None):
        self.problems = problems
        self.label = label
        super().__init__(str(self))

    def under(self, *prefix: str | int, label: str | None = None) -> OptionProblems:
        """The same problems, ``prefix`` keys deeper."""
        return OptionProblems([p.under(prefix) for p in self.problems], label=label)

    def __str__(self) -> str:
        parts = []
        for p in self.problems:
            path = ".".join(str(k) for k in ((self.label,) if self.label else ()) + p.loc)
            message = p.message.replace(OptionProblem.AT, "")
            parts.append(f"{path}: {message}" if p.loc and p.kind != "plugin" else message)
        return "; ".join(parts)


class OptionProblem:
    """One problem: ``kind`` is ``unknown`` (a key the options do not have; ``valid`` lists those they do),
    ``missing``, ``invalid`` or ``plugin`` (an unknown plugin name: ``message`` holds :attr:`AT` where
    the location goes)."""

    AT = " at \0"

    def __init__(self, loc: tuple, message: str, kind: str = "invalid", plugin: str | None = None,
                 valid: tuple[str, ...] = (), shown: str = ""):
        self.loc, self.message, self.kind, self.plugin, self.valid, self.shown = loc, message, kind, plugin, valid, shown

    def under(self, prefix: tuple) -> OptionProblem:
        return OptionProblem((*prefix, *self.loc), self.message, self.kind, self.plugin, self.valid, self.shown)

    def describe(self, path: str, where: str) -> str:
        """The located message, given the key's full path (``stages[0].algorithm.judge.x``) and where it
        was written (`` (FILE, line N)``)."""
        if self.kind == "plugin":
            return self.message.replace(self.AT, f" at '{path}'{where}")
        if self.kind == "unknown":
            return f"unknown option '{path}' for '{self.plugin}'{where}{suggest(self.loc[-1], self.valid)}"
        if self.kind == "missing":
            return f"missing required option '{path}' for '{self.plugin}'{where}"
        return f"invalid value for '{path}'{where}: {self.message}{self.shown}"
