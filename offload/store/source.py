"""A checkpoint seen through one interface: what every source of weights provides."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Source:
    """A checkpoint seen through one interface.

    Attributes:
        name: a short name for store directories and messages.
        description: what the user passed, for the manifest.
        config: the transformers config (a PretrainedConfig).
        fingerprint: changes whenever the weights or config change.
        shapes: returns tensor name -> (shape, dtype) for every tensor of the checkpoint (may
            have to read the checkpoint, so it is called only when a store must be packed).
        load: tensor name -> tensor (CPU); may read lazily from disk.
        module: the model object when the user passed one (it becomes the skeleton).
        tokenizer_path: where a tokenizer can be loaded from, if anywhere (dir, gguf file).
        row_bytes: returns tensor name -> (encoding, stored bytes per row) for each tensor
            kept in an encoding of the source's own (a GGUF's block-quantized ones), from the
            header alone.
        files: the files the weights are read from (none for a model object).
    """

    name: str
    description: str
    config: object
    fingerprint: str
    shapes: Callable[[], dict[str, tuple[tuple[int, ...], torch.dtype]]]
    load: Callable[[str], torch.Tensor]
    module: torch.nn.Module | None = None
    tokenizer_path: tuple[str, str | None] | None = None
    row_bytes: Callable[[], dict[str, tuple[str, int]]] = dict
    files: tuple = ()
