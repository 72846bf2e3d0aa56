"""Training: the loop, checkpoints, safety gates and fault injection."""
