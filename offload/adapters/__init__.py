"""Adapters: the only model-aware code. One per model family; adding a family is adding one.
``kvbuffer``: transformers' dynamic KV cache written in place, for every family."""
from .base import Adapter
from .registry import adapter_for, supported_model_types

__all__ = ["Adapter", "adapter_for", "supported_model_types"]
