"""Atomic, checksummed DCP checkpoints that reshard between EP sizes."""
