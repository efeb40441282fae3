"""The packer's per-tensor step for sparse stores: prune (opt-in), then choose the encoding.

A tensor is stored ``bitmap`` only where that saves bytes: decoding costs compute-device time,
so a tensor must save at least ``MIN_SAVING`` of its bytes (a dense model's tensors never do:
0% sparsity encodes to 106% of dense in bf16).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels import bitmap
from ..units import TensorPart, UnitSpec
from .pack import Encoder
from .prune import prune_rows

SPARSE_ENCODINGS = ("bitmap",)
MIN_ELEMENTS = 4096    # smaller tensors (norms, biases) are not worth a decode
MIN_SAVING = 0.05


def make_encoder(options, adapter, input_norms: Callable[[], dict[str, torch.Tensor]]
                 ) -> Encoder | None:
    """An ``Encoder`` for ``write_store`` from ``PackOptions``, or None for a dense store.

    ``input_norms`` is called once, on the first weight Wanda prunes."""
    if options.sparse is None:
        return None
    norms: dict[str, torch.Tensor] = {}

    def encoder(spec: UnitSpec, part: TensorPart, t: torch.Tensor):
        if options.prune and adapter.prunable(spec, part):
            norm = None
            if options.method == "wanda":
                if not norms:
                    norms.update(input_norms())
                norm = norms[part.source.removesuffix(".weight")]
            t = prune_rows(t, options.prune, norm)
        return t, (choose(t) if adapter.encodable(spec) else None)

    return encoder


def choose(tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(encoded bytes, nnz)`` if storing ``tensor`` as a bitmap saves bytes, else None."""
    if tensor.dtype not in bitmap.DTYPES or tensor.numel() < MIN_ELEMENTS:
        return None
    elem = tensor.dtype.itemsize
    nnz = int(torch.count_nonzero(tensor.reshape(-1).view({2: torch.int16, 4: torch.int32}[elem])))
    dense = tensor.numel() * elem
    if bitmap.encoded_nbytes(tensor.numel(), nnz, elem) > dense * (1 - MIN_SAVING):
        return None
    return bitmap.encode(tensor)
