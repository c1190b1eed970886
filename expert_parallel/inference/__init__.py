"""Inference on launcher checkpoints: ``loader.py`` finds a run's checkpoint and config and
builds the model at any EP size; decoding itself is ``models/generation.py``."""
