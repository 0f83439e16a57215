"""The training loop and what it writes: checkpoints, logs, evaluation answers, plots."""
