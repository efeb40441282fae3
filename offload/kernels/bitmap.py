"""The ``bitmap`` tensor encoding: a bitmap of non-zero positions plus the packed values.

Layout of one encoded tensor of ``n`` elements (``elem`` = 2 or 4 bytes), little-endian:

====================  ===========================  ============================================
``masks``             ``uint64[ntiles]``           bit ``j`` of mask ``t``: element ``64t + j``
                                                   is non-zero (a tile is 64 elements)
``offsets``           ``int64[ngroups + 1]``       index of each group's first value (a group
                                                   is 32 tiles); the last entry is ``nnz``
``values``            ``elem[nnz]``                the non-zero elements in order, starting at
                                                   ``values_offset`` (64-aligned)
====================  ===========================  ============================================

"Zero" means all bits zero, so ``-0.0`` and NaNs are kept as values and decoding only moves
bytes: encode -> decode is bit-exact for float32, float16 and bfloat16. The per-group offsets
(0.4% of a bf16 tensor) let the CPU's threads and the GPU's warps start anywhere.

``decode`` uses the compiled kernel of the buffer's device (``csrc/bitmap_decode_cpu.cpp``, on
the CPU path ``kernels.cpu.selected()``: AVX-512, AVX2 or scalar; ``csrc/bitmap_decode.cu``)
and falls back to ``decode_reference`` (pure torch) when it cannot be
built. Every decode validates the bitmap against its offsets first: a corrupt one raises
``CorruptBitmap`` and nothing is read out of bounds.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from . import _build, cpu

TILE = 64
GROUP_TILES = 32
GROUP = TILE * GROUP_TILES
VALUES_ALIGN = 64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT = {2: torch.int16, 4: torch.int32}


class CorruptBitmap(ValueError):
    """The bitmap's set bits disagree with its value count or offsets."""


@dataclass(frozen=True)
class Layout:
    n: int
    ntiles: int
    ngroups: int
    values_offset: int


def layout(n: int) -> Layout:
    ntiles = -(-n // TILE)
    ngroups = -(-ntiles // GROUP_TILES)
    head = 8 * ntiles + 8 * (ngroups + 1)
    return Layout(n, ntiles, ngroups, -(-head // VALUES_ALIGN) * VALUES_ALIGN)


def encoded_nbytes(n: int, nnz: int, elem: int) -> int:
    return layout(n).values_offset + nnz * elem


def encode(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Encode ``t`` (float32/float16/bfloat16, any shape) as a uint8 CPU tensor; returns it
    and the number of non-zero values."""
    if t.dtype not in DTYPES:
        raise TypeError(f"bitmap encoding supports {DTYPES}, not {t.dtype}")
    elem = t.dtype.itemsize
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(_INT[elem])
    n = flat.numel()
    lay = layout(n)
    nz = torch.zeros(lay.ngroups * GROUP, dtype=torch.bool)
    nz[:n] = flat != 0
    values = flat[nz[:n]]
    nnz = values.numel()
    out = torch.zeros(encoded_nbytes(n, nnz, elem), dtype=torch.uint8)
    bits = np.packbits(nz[:lay.ntiles * TILE].numpy(), bitorder="little")
    out[:8 * lay.ntiles] = torch.from_numpy(bits)
    counts = nz.view(lay.ngroups, GROUP).sum(1)
    offsets = torch.zeros(lay.ngroups + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    out[8 * lay.ntiles:8 * lay.ntiles + offsets.numel() * 8] = offsets.view(torch.uint8)
    out[lay.values_offset:].copy_(values.view(torch.uint8))
    return out, nnz


def validate(enc: torch.Tensor, n: int, nnz: int) -> None:
    """Check the bitmap of ``enc`` (CPU uint8) against its offsets and ``nnz``.

    Raises:
        CorruptBitmap: with the counts that disagree.
    """
    lib = _build.cpu_library()
    if lib is not None:
        bad = lib.offload_bitmap_validate(_ptr(enc), ctypes.c_int64(n), ctypes.c_int64(nnz))
        if bad:
            raise _corrupt(enc, n, nnz)
        return
    _validate_reference(enc, n, nnz)


def decode(enc: torch.Tensor, out: torch.Tensor, n: int, nnz: int, elem: int, *,
           threads: int = 1, stream=None) -> None:
    """Decode ``enc`` (uint8) into ``out`` (uint8, ``n * elem`` bytes, same device).

    On the CPU the bitmap is validated first (``CorruptBitmap``). On a GPU the caller validates
    on the host before the copy (``validate``); the kernel itself never reads past ``nnz``
    values. ``stream``: the CUDA stream to launch on (default: the current one).
    """
    if enc.device.type == "cpu":
        lib = _build.cpu_library()
        if lib is None:
            return decode_reference(enc, out, n, nnz, elem)
        bad = lib.offload_bitmap_decode(_ptr(enc), _ptr(out), ctypes.c_int64(n),
                                        ctypes.c_int64(nnz), elem, threads, cpu.level())
        if bad:
            raise _corrupt(enc, n, nnz)
        return
    kernels = cuda_kernel(enc.device)
    if kernels is None:
        return decode_reference(enc, out, n, nnz, elem)
    stream = stream if stream is not None else torch.cuda.current_stream(enc.device)
    kernels.bitmap(enc, out, n, nnz, elem, layout(n), _error_flag(enc.device), stream)


def prepare(device: torch.device) -> None:
    """Build (or load) the decoder for ``device`` now: the runtime calls this before it
    allocates its budget, so a first build (a compiler process of ~100 MB) never runs inside a
    process already holding its whole budget. A bad ``$OFFLOAD_CPU_ISA`` is reported here."""
    _build.cpu_library()
    cpu.selected()
    if device.type == "cuda":
        cuda_kernel(device)


def cuda_kernel(device: torch.device):
    """The CUDA decoders for ``device`` (``kernels.cuda``: NVRTC through CuPy, else nvcc), or
    None."""
    from . import cuda

    return cuda.kernels(device)


def decode_cpu(enc: torch.Tensor, out: torch.Tensor, n: int, nnz: int, elem: int, *,
               threads: int = 1, isa: str | None = None) -> None:
    """The compiled CPU kernel alone, on the path ``isa`` (one of ``cpu.supported()``; default
    ``cpu.selected()``): tests and benches compare each path with the reference."""
    lib = _build.cpu_library()
    if lib is None:
        raise RuntimeError("the C++ bitmap kernel is not available here")
    if isa is not None and isa not in cpu.supported():
        raise ValueError(f"isa={isa!r}: this CPU runs {cpu.supported()}")
    bad = lib.offload_bitmap_decode(_ptr(enc), _ptr(out), ctypes.c_int64(n), ctypes.c_int64(nnz),
                                    elem, threads, cpu.level(isa))
    if bad:
        raise _corrupt(enc, n, nnz)


def decode_reference(enc: torch.Tensor, out: torch.Tensor, n: int, nnz: int, elem: int) -> None:
    """Pure torch, any device: scatter the values to the set bits, chunk by chunk."""
    _validate_reference(enc, n, nnz)
    lay = layout(n)
    masks = enc[:8 * lay.ntiles].view(torch.int64)
    values = enc[lay.values_offset:lay.values_offset + nnz * elem].view(_INT[elem])
    dense = out[:n * elem].view(_INT[elem])
    offsets = enc[8 * lay.ntiles:8 * (lay.ntiles + lay.ngroups + 1)].view(torch.int64).cpu()
    step = 512   # groups per chunk: 1M elements of temporaries at a time
    for g0 in range(0, lay.ngroups, step):
        g1 = min(lay.ngroups, g0 + step)
        bits = _bits(masks[g0 * GROUP_TILES:g1 * GROUP_TILES])
        e0, e1 = g0 * GROUP, min(n, g1 * GROUP)
        chunk = dense[e0:e1]
        chunk.zero_()
        chunk[bits[:e1 - e0]] = values[int(offsets[g0]):int(offsets[g1])]


def _validate_reference(enc: torch.Tensor, n: int, nnz: int) -> None:
    lay = layout(n)
    if enc.numel() < encoded_nbytes(n, 0, 1) + nnz:
        raise _corrupt(enc, n, nnz, "shorter than its layout")
    masks = enc[:8 * lay.ntiles].view(torch.int64)
    offsets = enc[8 * lay.ntiles:8 * (lay.ntiles + lay.ngroups + 1)].view(torch.int64)
    counts = torch.zeros(lay.ngroups * GROUP_TILES, dtype=torch.int64, device=enc.device)
    for t0 in range(0, lay.ntiles, 1 << 14):
        t1 = min(lay.ntiles, t0 + (1 << 14))
        counts[t0:t1] = _bits(masks[t0:t1]).view(-1, TILE).sum(1)
    expect = torch.zeros_like(offsets)
    torch.cumsum(counts.view(-1, GROUP_TILES).sum(1), 0, out=expect[1:])
    tail = n % TILE
    stray = bool(tail) and bool((masks[-1] >> tail) != 0)   # syncs: a validation answer
    if stray or int(expect[-1]) != nnz or not torch.equal(offsets, expect):
        raise _corrupt(enc, n, nnz)


def _bits(masks: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(TILE, device=masks.device)
    return ((masks.unsqueeze(1) >> shifts) & 1).bool().reshape(-1)


def _corrupt(enc: torch.Tensor, n: int, nnz: int, why: str = "") -> CorruptBitmap:
    lay = layout(n)
    masks = enc[:8 * lay.ntiles].view(torch.int64).cpu()
    set_bits = int(_bits(masks).sum()) if lay.ntiles else 0
    detail = why or f"{set_bits} bits set for {nnz} values"
    return CorruptBitmap(f"corrupt bitmap ({detail}; {n} elements)")


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


_FLAGS: dict = {}


def _device_key(device: torch.device) -> torch.device:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device(device.type, index)


def _error_flag(device: torch.device) -> torch.Tensor:
    device = _device_key(device)
    flag = _FLAGS.get(device)
    if flag is None:
        flag = _FLAGS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return flag


def device_errors(device: torch.device) -> int:
    """How many decodes on ``device`` met a group that disagreed with its offsets (syncs)."""
    flag = _FLAGS.get(_device_key(device))
    return 0 if flag is None else int(flag.item())
