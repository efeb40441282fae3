"""Which adapter serves which ``config.model_type``."""
from __future__ import annotations

from ..errors import ModelError
from .dense import DenseAdapter
from .moe import MoEAdapter

_ADAPTERS = (DenseAdapter(), MoEAdapter())


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for a in _ADAPTERS for t in a.model_types)


def adapter_for(config):
    """The adapter for a transformers config.

    Raises:
        ModelError: the architecture is not supported; the message lists those that are.
    """
    model_type = getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = supported_model_types()
    raise ModelError(f"unsupported architecture {model_type!r}: offload runs "
                     f"{', '.join(supported)}", supported=supported)
