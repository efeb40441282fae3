"""Per-tensor encoding: a tensor is stored ``bitmap`` only where that saves bytes.

Decoding costs compute-device time, so a tensor must save at least ``MIN_SAVING`` of its bytes
(a dense model's tensors never do: 0% sparsity encodes to 106% of dense in bf16).
"""
from __future__ import annotations

import torch

from ..kernels import bitmap

SPARSE_ENCODINGS = ("bitmap",)
MIN_ELEMENTS = 4096    # smaller tensors (norms, biases) are not worth a decode
MIN_SAVING = 0.05


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
