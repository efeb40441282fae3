"""Hooks into other loaders: ``offload.integrations.accelerate``."""
