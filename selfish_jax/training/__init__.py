"""The training loop, its pure steps, checkpoints and metrics."""
