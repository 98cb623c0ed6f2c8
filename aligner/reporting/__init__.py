"""Where results go: metrics and the console report, the model card."""
