"""Model computation: loading models, completion log-probs, reward scores, the shared-prompt layout."""
