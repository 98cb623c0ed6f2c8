"""aligner: a plugin-based alignment trainer for language models.

Plugin authors use ``aligner.hookimpl``; users call ``aligner.train(config)``.
"""

from aligner.hookspecs import hookimpl

__version__ = "0.1.0"


def train(config, overrides=(), **kwargs):
    """Run training from a YAML path, a dict or a ``RunConfig``; see ``aligner.api.train``."""
    from aligner.api import train as _train

    return _train(config, overrides, **kwargs)


__all__ = ["__version__", "hookimpl", "train"]
