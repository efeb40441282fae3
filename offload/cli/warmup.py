"""The code a run executes, loaded before anything is measured."""
from __future__ import annotations

import importlib

from ..errors import OffloadError


def load_code(model_path) -> None:
    """Import and run once the code this run will execute: the model family's modules (a
    two-layer miniature's prefill and decode, ``workspace.warm_code_paths``) and the
    tokenizer's. Their pages are the interpreter's, so the first run's pack is measured above
    them; what the pack itself holds (tensors, the tokenizer it saves) is what it reports.
    The model's header only is read here (a GGUF's metadata, a checkpoint's config); a model
    that cannot be read is left to ``pack`` to report."""
    import torch

    from ..kernels import workspace
    from ..store.sources import open_source

    try:
        config = open_source(model_path).config
    except OffloadError:
        return
    importlib.import_module("transformers.tokenization_utils_tokenizers")   # the tokenizer's

    dtype = getattr(config, "dtype", None)
    workspace.warm_code_paths(config, dtype if isinstance(dtype, torch.dtype) else torch.float32)

