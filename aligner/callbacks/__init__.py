"""Built-in callbacks: lifecycle plugins with settings, switched on from a run's config.

```yaml
callbacks:
  - {name: early_stopping, metric: eval/loss, patience: 2}
  - {name: extra_metrics, smoothing: 0.9}
```

Each is also a complete, small example of a lifecycle plugin to copy. From Python, register an
instance instead: ``register_plugin(EarlyStopping(patience=2), name="early-stopping")``. A third-party
callback registers its class through the ``register_callbacks`` hook (see docs/plugins.md).
"""
