"""aligner: a plugin-based alignment trainer for language models.

Plugin authors use ``aligner.hookimpl``; users call ``aligner.train(config)``.
"""

from aligner.hookspecs import hookimpl
from aligner.version import __version__


def train(config, overrides=(), **kwargs):
    """Run training from a YAML path, a dict or a ``RunConfig``; see ``aligner.api.train``."""
    from aligner.api import train as _train

    return _train(config, overrides, **kwargs)


__all__ = ["__version__", "hookimpl", "train"]
