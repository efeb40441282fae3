"""A Unit's tensors from their stored bytes: each tensor decoded by its encoding's kernel.

The one place that maps an encoding name to its decoder, so movers (the CPU pipeline, the GPU
host staging, the resident loader) only ask for a Unit to be decoded.
"""
from __future__ import annotations

import torch

from ..errors import StoreError
from ..units import Unit
from . import bitmap, gguf


def validate_unit(unit: Unit, stored: torch.Tensor) -> None:
    """Check every bitmap of ``unit`` (its stored bytes, on the CPU) before it is decoded.

    Raises:
        StoreError: naming the Unit and tensor whose set bits disagree with its values.
    """
    for t in unit.tensors:
        if t.encoding == "bitmap":
            at, n = t.source
            try:
                bitmap.validate(stored[at:at + n], t.numel, t.nnz)
            except bitmap.CorruptBitmap as e:
                raise _corrupt(unit, t.name, e) from None


def decode_unit(unit: Unit, stored: torch.Tensor, dest: torch.Tensor, *, stream=None,
                names: tuple[str, ...] | None = None) -> None:
    """Decode ``unit`` (its tensors ``names``, default all) from its stored bytes into its
    dense layout in ``dest`` (same device).

    On the CPU each bitmap is validated as it is decoded (``StoreError`` naming the Unit)."""
    for t in unit.tensors:
        if names is not None and t.name not in names:
            continue
        at, n = t.source
        src, out = stored[at:at + n], dest[t.offset:t.offset + t.nbytes]
        qtype = gguf.type_of(t.encoding)
        if qtype is not None:
            gguf.dequantize(src, out, qtype, t.numel, stream=stream)
        elif t.encoding == "bitmap":
            try:
                bitmap.decode(src, out, t.numel, t.nnz, t.torch_dtype.itemsize, stream=stream)
            except bitmap.CorruptBitmap as e:
                raise _corrupt(unit, t.name, e) from None
        else:
            out.copy_(src, non_blocking=True)


def prepare(units, device: torch.device) -> None:
    """Build (or load) the decoders ``units`` need on ``device`` now, before a budget is taken
    (a first build runs a compiler of ~100 MB).

    Raises:
        HardwareError: GGUF-quantized Units on a GPU where no CUDA decoder can be built.
    """
    encodings = {t.encoding for u in units if u.encoded for t in u.tensors}
    if any(gguf.type_of(e) for e in encodings):
        gguf.prepare(device)
    if "bitmap" in encodings:
        bitmap.prepare(device)


def _corrupt(unit: Unit, tensor: str, e: Exception) -> StoreError:
    return StoreError(f"unit {unit.key}, tensor {tensor}: {e}: the store is corrupt; delete it "
                      "and pack again", unit=unit.key)
