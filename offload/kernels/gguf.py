"""GGUF block encodings: quantized tensors moved as stored, dequantized on the compute device.

A tensor of ``rows x cols`` in one of ``TYPES`` is ``rows`` rows of ``cols / block`` blocks,
each ``bytes`` long, exactly as the GGUF file holds it (ggml's block layouts), so a whole row
is a contiguous run of bytes and permuting rows (the Llama q/k permutation) moves whole rows of
blocks. Decoding gives float32, bitwise what the ``gguf`` package's ``dequantize`` gives (what
transformers loads a GGUF with): the reference here is that function itself.

======  ======  =====  ==========================================================
type    block   bytes  layout (little-endian)
======  ======  =====  ==========================================================
Q4_0    32      18     d f16, 16 bytes of 4-bit q (low nibbles first): d * (q - 8)
Q4_1    32      20     d, m f16, 16 bytes of 4-bit q: d * q + m
Q5_0    32      22     d, 32 high bits, 16 bytes of low nibbles: d * (q - 16)
Q5_1    32      24     d, m, 32 high bits, 16 bytes: d * q + m
Q8_0    32      34     d, 32 int8: q * d
Q2_K    256     84     16 scale bytes (4-bit scale, 4-bit min), 64 bytes of 2-bit q, d, dmin
Q3_K    256     110    32 bytes high-bit mask, 64 bytes 2-bit q, 12 bytes 6-bit scales, d
Q4_K    256     144    d, dmin, 12 bytes 6-bit scales/mins, 128 bytes 4-bit q
Q5_K    256     176    d, dmin, 12 bytes scales/mins, 32 bytes high bits, 128 bytes 4-bit q
Q6_K    256     210    128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, d
======  ======  =====  ==========================================================

The compiled decoder is ``csrc/gguf_dequant_cpu.cpp`` (the CPU path ``kernels.cpu.selected()``);
without a compiler the numpy reference runs after one warning (same bits, slower).
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from ..errors import HardwareError
from . import _build, cpu

# name -> (ggml type id, elements per block, bytes per block)
TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
}
# Byte offsets of each type's fp16 scales inside a block (d, and dmin where it has one).
SCALE_OFFSETS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
# GGUF float types stored as float32 (widened exactly at pack time).
FLOAT_TYPES = ("F32", "F16", "BF16")
PREFIX = "gguf."   # a TensorSpec's encoding: "gguf.Q4_K"


def encoding(name: str) -> str:
    return PREFIX + name


def type_of(encoding_name: str) -> str | None:
    """``"gguf.Q4_K"`` -> ``"Q4_K"``; None for another encoding."""
    return encoding_name[len(PREFIX):] if encoding_name.startswith(PREFIX) else None


def stored_bytes(name: str, numel: int) -> int:
    """Bytes of ``numel`` elements in blocks of ``name``."""
    _, block, nbytes = TYPES[name]
    if numel % block:
        raise ValueError(f"{numel} elements are not whole {name} blocks of {block}")
    return numel // block * nbytes


def reference(raw: np.ndarray, name: str) -> np.ndarray:
    """The ``gguf`` package's dequantization of ``raw`` (uint8 blocks): float32, flat."""
    from gguf import GGMLQuantizationType, dequantize

    return dequantize(np.ascontiguousarray(raw).reshape(-1), GGMLQuantizationType[name])


@functools.lru_cache(maxsize=None)
def _library():
    return _build.cpu_library("gguf_dequant_cpu")


def dequantize(src: torch.Tensor, out: torch.Tensor, name: str, numel: int, *,
               threads: int = 1, isa: str | None = None, stream=None) -> None:
    """Decode ``numel`` elements of type ``name`` from ``src`` (uint8) into ``out``
    (``numel * 4`` bytes, same device). On the CPU: the C++ kernel on path ``isa`` (default:
    the selected one), or the reference where it cannot be built. On a GPU: the CUDA kernel
    on ``stream`` (default: the current one; ``HardwareError`` where it cannot be built)."""
    type_id, block, _ = TYPES[name]
    n = stored_bytes(name, numel)
    if src.numel() < n or out.numel() < numel * 4:
        raise ValueError(f"{name}: {numel} elements need {n} stored and {numel * 4} output "
                         f"bytes, got {src.numel()} and {out.numel()}")
    if src.device.type == "cuda":
        stream = stream if stream is not None else torch.cuda.current_stream(src.device)
        _cuda_kernels(src.device).gguf(name, type_id, src, out, numel // block, stream)
        return
    lib = _library()
    if lib is None:
        dense = reference(src[:n].numpy(), name)
        out[:numel * 4].copy_(torch.from_numpy(dense).view(torch.uint8))
        return
    if isa is not None and isa not in cpu.supported():
        raise ValueError(f"isa={isa!r}: this CPU runs {cpu.supported()}")
    rc = lib.offload_gguf_dequant(type_id, ctypes.c_void_p(src.data_ptr()),
                                  ctypes.c_void_p(out.data_ptr()),
                                  ctypes.c_int64(numel // block), threads, cpu.level(isa))
    if rc:
        raise RuntimeError(f"the GGUF kernel does not know {name} (type {type_id})")


def sample_blocks(name: str, numel: int, seed: int = 0) -> torch.Tensor:
    """``numel`` elements of ``name`` blocks to time a decoder on: random quants, finite fp16
    scales of a trained model's size (NaN and subnormal scales decode slower)."""
    _, block, nbytes = TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(numel // block, nbytes), dtype=np.uint8)
    for at in SCALE_OFFSETS[name]:
        halves = (0x2000 + rng.integers(0, 0xBFF, size=numel // block)).astype(np.uint16)
        raw[:, at:at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(-1))


def time_decode(src: torch.Tensor, out: torch.Tensor, name: str, numel: int, *, reps: int,
                isa: str | None = None) -> float:
    """Median seconds of ``reps`` one-thread decodes (a GPU: kernels, synchronized), after one
    untimed."""
    from .timing import median_seconds

    return median_seconds(lambda: dequantize(src, out, name, numel, isa=isa), src.device, reps)


def prepare(device: torch.device = torch.device("cpu")) -> None:
    """Build (or load) the decoder for ``device`` now, before a budget is taken.

    Raises:
        HardwareError: a GPU for which neither CuPy (NVRTC) nor nvcc builds the decoders.
    """
    _library()
    cpu.selected()
    if device.type == "cuda":
        _cuda_kernels(device)


def _cuda_kernels(device: torch.device):
    from . import cuda

    kernels = cuda.kernels(device)
    if kernels is None:
        raise HardwareError("this store keeps GGUF-quantized tensors, decoded on the GPU by "
                            f"kernels built at run time, and none could be built here: "
                            f"{cuda.missing_hint()}; or pass device='cpu'")
    return kernels
