"""The launcher's training loop, data, config and reporting."""
