"""Fused GGUF matmul (``compute="fast"``): a linear layer multiplied straight from its blocks.

``matmul(x, blocks, qtype, out)`` computes ``x @ W.T`` where ``W`` is ``blocks`` (uint8,
``[rows, row_bytes]``: whole rows of GGUF blocks, as the store keeps them) without ever
expanding ``W`` to float32. The CPU kernel (``csrc/gguf_matmul_cpu.cpp``) quantizes each row of
``x`` to 8 bits per block, as llama.cpp's CPU path does, and multiplies with integer dot
products; it is lossy by that rounding only, and ``error_bound`` states how much. Rows of
``x`` beyond ``INT_ROWS`` (a prefill) take another road: the weight is dequantized in chunks
of rows into a bounded scratch and multiplied by torch (the float32 product, as ``exact``).

``reference`` is the float64 product of the ``gguf`` package's dequantization: what the
kernel is checked against, per output, within ``error_bound``.

Threads: a ``Pool`` (one per Runtime) of persistent threads splits the rows of ``W``; its size
is every core (``threads_for``).
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import torch

from . import _build, cpu, gguf

# Types the fused kernel multiplies; other GGUF types stay dequantized into their slot.
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# Rows of activations above which a product goes through dequantized chunks of W and torch's
# matmul: the integer kernel unpacks each weight block once per row of x, so a prefill of
# hundreds of rows is faster through BLAS.
INT_ROWS = 16
# Float32 bytes of W one chunk of the prefill road dequantizes at a time.
CHUNK_BYTES = 4 << 20
ENCODING = "fused."   # a TensorSpec kept in blocks for the kernel: "fused.Q4_K"
# Microseconds a pool thread spins for the next job before it sleeps: a decode step calls the
# kernel every ~50-100 us (the framework's work between linear layers), and waking a sleeping
# thread costs about as much on this class of VM.
SPIN_US = int(os.environ.get("OFFLOAD_SPIN_US", 2000))


def encoding(qtype: str) -> str:
    return ENCODING + qtype


def type_of(encoding_name: str) -> str | None:
    """``"fused.Q4_K"`` -> ``"Q4_K"``; None for another encoding."""
    return encoding_name[len(ENCODING):] if encoding_name.startswith(ENCODING) else None


def cols_of(qtype: str, row_bytes: int) -> int:
    """Elements in a row of ``row_bytes`` bytes of ``qtype`` blocks."""
    _, block, nbytes = gguf.TYPES[qtype]
    return row_bytes // nbytes * block


@functools.lru_cache(maxsize=None)
def _library():
    lib = _build.cpu_library("gguf_matmul_cpu")
    if lib is not None:
        lib.offload_pool_new.restype = ctypes.c_void_p
        lib.offload_pool_new.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.offload_pool_free.argtypes = [ctypes.c_void_p]
        lib.offload_gguf_matmul.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int]
        lib.offload_gguf_matmul_group.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_int]
        lib.offload_gguf_quantize_row.restype = ctypes.c_int64
        lib.offload_gguf_quantize_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_void_p, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the fused kernel could be built here (else ``compute="fast"`` is refused)."""
    return _library() is not None


def threads_for() -> int:
    """Threads for the kernel: every core. The runtime's I/O threads sleep in their reads (an
    O_DIRECT read is the disk's work), so leaving them a core costs compute: SmolLM2 fast at
    20% (every other ``down`` streamed, 4 reads in flight) took 17.8 ms a step on 2 threads and
    21.0 ms on 1 (2-core EPYC VM, medians of 8 alternated runs); the disk-bound TinyLlama-shaped
    Q4_0 at 248 MB the same on both (279 / 278 ms)."""
    return max(1, os.cpu_count() or 1)


class Pool:
    """Persistent kernel threads (``csrc/thread_pool.h``); ``close()`` joins them."""

    def __init__(self, threads: int, spin_us: int = SPIN_US):
        lib = _library()
        self.threads = max(1, threads)
        self._handle = lib.offload_pool_new(self.threads, spin_us) if lib is not None else None

    @property
    def handle(self):
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            _library().offload_pool_free(self._handle)
            self._handle = None

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Scratch:
    """The prefill road's room for dequantized chunks of W (``nbytes``), shared by a
    runtime's ``Fused`` kernels and held only between ``hold`` and ``release`` (a runtime
    holds it through a forward of more than ``INT_ROWS`` rows): a run whose forwards stay at
    or below that never maps it. Released, a kernel that still goes the prefill road makes
    its own per call."""

    def __init__(self, nbytes: int):
        self.nbytes, self.buffer = int(nbytes), None

    def hold(self) -> None:
        if self.buffer is None and self.nbytes:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8)

    def release(self) -> None:
        self.buffer = None


class Fused:
    """``matmul`` for one type, pool and CPU path, resolved once: the per-call work of a
    decode step's linear layers (about 7 per decoder layer) is one ctypes call (``matmul``
    checks shapes and the path before it calls one). ``scratch``: a tensor, or a ``Scratch``
    whose buffer is used while held."""

    def __init__(self, qtype: str, pool: Pool | None = None,
                 scratch: torch.Tensor | Scratch | None = None, isa: str | None = None):
        self.qtype, self.scratch = qtype, scratch
        self._type = gguf.TYPES[qtype][0]
        self._pool = pool.handle if pool is not None else None
        self._level = cpu.level(isa)
        lib = _library()
        self._call = lib.offload_gguf_matmul if lib is not None else None

    def __call__(self, x: torch.Tensor, blocks: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = blocks.shape[0], x.shape[-1]
        if x.dtype != torch.float32:
            raise ValueError(f"the fused kernel multiplies float32 activations, got {x.dtype}")
        x2 = x.reshape(-1, cols)
        if out is None:
            out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
        y2 = out.view(-1, rows)
        if x2.shape[0] > INT_ROWS:
            scratch = self.scratch
            _by_chunks(x2, blocks, self.qtype, y2,
                       scratch.buffer if isinstance(scratch, Scratch) else scratch)
            return out
        x2 = self._kernel_rows(x2)
        self._check(self._call(self._type, blocks.data_ptr(), rows, cols, x2.data_ptr(),
                               x2.stride(0), x2.shape[0], y2.data_ptr(), y2.stride(0),
                               self._pool, self._level), cols)
        return out

    def _kernel_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2`` (at most ``INT_ROWS`` rows) as the kernel reads it: each row contiguous.
        Raises where the kernel could not be built."""
        if self._call is None:
            raise RuntimeError("the fused GGUF kernel could not be built (see the "
                               "KernelBuildWarning); use compute='exact'")
        return x2 if x2.stride(-1) == 1 else x2.contiguous()

    def _check(self, code: int, cols: int) -> None:
        """Raise for the kernel's refusal (``code`` non-zero): a type or width it lacks."""
        if code:
            raise ValueError(f"the fused kernel does not multiply {self.qtype} weights of "
                             f"{cols} columns")


class FusedGroup:
    """Weights of one type that share their input (an attention's q, k and v; an MLP's gate
    and up) multiplied in one kernel call: ``x`` quantized once, the rows of all of them split
    over the pool together, one dispatch instead of one per weight (measured: SmolLM2's q, k
    and v, 23 us where three calls took 41). Each output is bitwise what ``Fused`` gives for
    its weight alone."""

    def __init__(self, fused: Fused, rows: list[int], cols: int):
        self.fused, self.rows, self.cols = fused, list(rows), cols
        count = len(self.rows)
        self._ns = (ctypes.c_int64 * count)(*self.rows)
        self._ws = (ctypes.c_void_p * count)()
        self._ys = (ctypes.c_void_p * count)()
        lib = _library()
        self._call = lib.offload_gguf_matmul_group if lib is not None else None

    def __call__(self, x: torch.Tensor, blocks: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """``x @ W.T`` for each ``W`` of ``blocks`` (``[rows[i], row_bytes]`` uint8 each);
        None for more than ``INT_ROWS`` rows of ``x`` (a prefill: multiply each with
        ``Fused``, whose road for it is another)."""
        f, cols = self.fused, self.cols
        if x.shape[-1] != cols or x.dtype != torch.float32:
            raise ValueError(f"{f.qtype} weights of {cols} columns: x must be float32 "
                             f"[..., {cols}], got {x.dtype} {list(x.shape)}")
        x2 = x.reshape(-1, cols)
        if x2.shape[0] > INT_ROWS:
            return None
        x2 = f._kernel_rows(x2)
        outs = []
        for i, (b, n) in enumerate(zip(blocks, self.rows)):
            if b.shape[0] != n:
                raise ValueError(f"weight {i} of the group has {b.shape[0]} rows, not {n}")
            y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
            self._ws[i], self._ys[i] = b.data_ptr(), y.data_ptr()
            outs.append(y)
        f._check(self._call(f._type, len(outs), self._ws, self._ns, cols, x2.data_ptr(),
                            x2.stride(0), x2.shape[0], self._ys, self._ns, f._pool, f._level),
                 cols)
        return outs


def matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: str, out: torch.Tensor | None = None,
           *, pool: Pool | None = None, isa: str | None = None,
           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``W`` given as ``blocks`` (uint8 ``[rows, row_bytes]`` of ``qtype``).

    ``x``: float32 ``[..., cols]``; ``out``: float32 ``[..., rows]`` (made if None). Up to
    ``INT_ROWS`` rows of ``x``: the fused integer kernel on path ``isa`` (default: the selected
    one). More: ``W`` dequantized ``CHUNK_BYTES`` at a time into ``scratch`` (made if None)
    and multiplied by torch.
    """
    rows, row_bytes = blocks.shape
    cols = cols_of(qtype, row_bytes)
    if x.shape[-1] != cols or x.dtype != torch.float32:
        raise ValueError(f"{qtype} weight of {rows}x{cols}: x must be float32 [..., {cols}], "
                         f"got {x.dtype} {list(x.shape)}")
    if isa is not None and isa not in cpu.supported():
        raise ValueError(f"isa={isa!r}: this CPU runs {cpu.supported()}")
    return Fused(qtype, pool, scratch, isa)(x, blocks, out)


def quantize_row(x: torch.Tensor, qtype: str, isa: str | None = None) -> torch.Tensor:
    """The activation blocks the integer kernel multiplies a ``qtype`` weight with, for one
    float32 row ``x``, as path ``isa`` rounds them (uint8: each block's scale, its sum term or
    the sums of each 16, its int8 values): every path rounds to the same bytes."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the fused GGUF kernel could not be built (see the "
                           "KernelBuildWarning)")
    x = x.to(torch.float32).contiguous().view(-1)
    code, block, _ = gguf.TYPES[qtype]
    per = 4 + 2 * 16 + 256 if block == 256 else 4 + 4 + 32   # the C structs Q8K and Q8
    out = torch.empty(x.numel() // block * per, dtype=torch.uint8)
    n = lib.offload_gguf_quantize_row(code, x.data_ptr(), x.numel(), out.data_ptr(),
                                      cpu.level(isa))
    if n < 0:
        raise ValueError(f"the fused kernel does not multiply {qtype} weights of {x.numel()} "
                         "columns")
    return out[:n]


def _by_chunks(x2, blocks, qtype, y2, scratch) -> None:
    rows, row_bytes = blocks.shape
    cols = x2.shape[1]
    room = CHUNK_BYTES if scratch is None or scratch.numel() < cols * 4 else scratch.numel()
    per = max(1, min(rows, room // (cols * 4)))   # rows of W dequantized at a time
    if scratch is None or scratch.numel() < per * cols * 4:
        scratch = torch.empty(per * cols * 4, dtype=torch.uint8)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        dense = scratch[:(r1 - r0) * cols * 4]
        gguf.dequantize(blocks[r0:r1].reshape(-1), dense, qtype, (r1 - r0) * cols)
        y2[:, r0:r1] = x2 @ dense.view(torch.float32).view(r1 - r0, cols).t()


def reference(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """``x @ W.T`` in float64 with ``W`` the ``gguf`` package's dequantization of ``blocks``."""
    rows, row_bytes = blocks.shape
    w = gguf.reference(blocks.numpy(), qtype).reshape(rows, cols_of(qtype, row_bytes))
    return x.double() @ torch.from_numpy(w.astype(np.float64)).t()


def error_bound(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Per output, the most the fused kernel may differ from ``reference``: each activation
    is rounded to a step of ``amax / 127`` of its block (an error of at most half a step),
    times the weights it meets, plus float32 accumulation (``2^-20`` of ``|x| @ |W|.T``)."""
    rows, row_bytes = blocks.shape
    cols = cols_of(qtype, row_bytes)
    block = 256 if qtype.endswith("_K") else 32
    w = torch.from_numpy(gguf.reference(blocks.numpy(), qtype).reshape(rows, cols)).double()
    xb = x.double().reshape(-1, cols // block, block)
    step = xb.abs().amax(-1, keepdim=True) / 127 / 2
    half_steps = step.expand_as(xb).reshape(-1, cols)
    magnitude = x.double().reshape(-1, cols).abs() @ w.abs().t()
    bound = half_steps @ w.abs().t() * 1.0001 + magnitude * 2.0 ** -20
    return bound.reshape(*x.shape[:-1], rows)
