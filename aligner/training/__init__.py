"""The training runner: stages, the step loop, checkpoints and resume, the run directory."""
