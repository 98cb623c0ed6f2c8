"""Built-in loss plugins. Each module registers its losses through ``register_losses``."""
