"""Example lifecycle plugins: complete, tested, and small enough to copy.

They are not loaded by default. Use one from Python with ``aligner.plugins.register_plugin``::

    from aligner.examples.early_stopping import EarlyStopping
    from aligner.plugins import register_plugin

    register_plugin(EarlyStopping(metric="eval/loss", patience=2), name="early-stopping")
    aligner.train("configs/quickstart.yaml")

or from your own distribution, with an entry point in the group ``aligner`` naming an instance
(``stop = "my_package.plugins:early_stopping"``). See docs/plugins.md.
"""
