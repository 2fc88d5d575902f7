"""Losses, optimizer, train/eval steps, checkpoints, metrics and the training loop."""
