"""Compute modes: ``exact`` (default) multiplies float weights decoded from their encoding,
bitwise what transformers computes on the same file; ``fast`` (opt-in) keeps the GGUF-quantized
weights of linear layers in their blocks and multiplies them with the fused kernel
(``kernels/qmatmul.py``: activations rounded to 8 bits per block, as llama.cpp does).

The mode is a property of the Units the planner places: ``fused_units`` rewrites each
quantized linear weight as its stored blocks (``fused.<TYPE>``, uint8 ``[rows, row_bytes]``),
so a fused Unit occupies its stored size in a slot or the resident arena, is read straight
into it (nothing to decode), and is priced by the fused kernel's measured speed
(``HardwareProfile.fused_bps``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import OffloadError
from ..kernels import gguf, qmatmul
from ..units import TENSOR_ALIGN, TensorSpec, Unit, align

MODES = ("exact", "fast")


def check_mode(compute) -> None:
    """Raises OffloadError for a ``compute`` that is not one of ``MODES``."""
    if compute not in MODES:
        raise OffloadError(f"compute={compute!r}: use 'exact' (default: bitwise transformers' "
                           "model) or 'fast' (GGUF weights multiplied from their blocks, "
                           "lossy)")


def fused_units(units, linear: Callable[[Unit, TensorSpec], bool]) -> tuple[Unit, ...]:
    """``units`` with every 2-D GGUF tensor of a type the fused kernel multiplies that
    ``linear(unit, tensor)`` accepts (a linear layer's weight, the embedding's rows) kept in
    its blocks; other tensors unchanged."""
    return tuple(_fused(u, linear) for u in units)


def fused_count(units) -> int:
    """Tensors of ``units`` kept for the fused kernel."""
    return sum(1 for u in units for t in u.tensors if qmatmul.type_of(t.encoding))


def prefill_scratch_bytes(units) -> int:
    """The fused kernel's prefill scratch (``qmatmul.CHUNK_BYTES``, or less: the largest
    fused weight decoded); 0 without fused tensors."""
    dense = [t.shape[0] * qmatmul.cols_of(qmatmul.type_of(t.encoding), t.shape[1]) * 4
             for u in units for t in u.tensors if qmatmul.type_of(t.encoding)]
    return min(qmatmul.CHUNK_BYTES, max(dense, default=0))


def _fused(unit: Unit, linear) -> Unit:
    picks = {t.name: gguf.type_of(t.encoding) for t in unit.tensors
             if gguf.type_of(t.encoding) in qmatmul.TYPES and len(t.shape) == 2
             and linear(unit, t)}
    if not picks:
        return unit
    still_encoded = any(t.encoding != "dense" and t.name not in picks for t in unit.tensors)
    tensors = []
    if not still_encoded:   # read straight into its slot: its memory layout is the stored one
        for t in unit.tensors:
            at, n = t.source
            tensors.append(_blocks(t, picks[t.name], at) if t.name in picks else
                           TensorSpec(t.name, t.dtype, t.shape, at, n))
        return dataclasses.replace(unit, tensors=tuple(tensors), nbytes=unit.stored_bytes,
                                   stored_nbytes=None)
    off = 0   # other tensors still decoded: the fused ones are copied as stored beside them
    for t in unit.tensors:
        off = align(off, TENSOR_ALIGN)
        if t.name in picks:
            at, n = t.source
            tensors.append(dataclasses.replace(_blocks(t, picks[t.name], off),
                                               stored_offset=at, stored_nbytes=n))
            off += n
        else:
            tensors.append(dataclasses.replace(t, offset=off))
            off += t.nbytes
    return dataclasses.replace(unit, tensors=tuple(tensors), nbytes=off)


def _blocks(t: TensorSpec, qtype: str, offset: int) -> TensorSpec:
    _, n = t.source
    rows = t.shape[0]
    return TensorSpec(t.name, "uint8", (rows, n // rows), offset, n, qmatmul.encoding(qtype))
