"""The CLI's commands beyond ``train``: label, export, generate, plot, push, verify, cache."""
