"""The fused GGUF matmul on a CUDA GPU (``csrc/gguf_matmul.cu``) and its CPU emulation.

``matmul(x, blocks, qtype)`` computes ``x @ W.T`` on the GPU with ``W`` given as its GGUF
blocks (uint8 ``[rows, row_bytes]``, as the store keeps them) and never expanded in memory:
one warp per output row decodes the weights in registers (bitwise the ``gguf`` package's
dequantization) and multiplies them with float32 activations, adding in float32. Unlike the
CPU kernel (``qmatmul``), the activations are not rounded to 8 bits: a GPU has the float
throughput, and the error is float32 accumulation's alone (``error_bound``). Up to ``MAX_N``
rows of ``x`` (a decode batch) take the kernel; more (a prefill) take ``W`` dequantized in
chunks by the CUDA decoder into a scratch and torch's matmul.

``emulated(x, blocks, qtype)`` runs the kernel's lanes and butterfly on the CPU in the same
order (``csrc/gguf_matmul_warp_cpu.cpp``): bitwise what the GPU computes, given both builds
keep multiply-adds unfused. It checks the kernels' arithmetic on any machine and is the
reference a GPU run is compared with bit for bit (``tests/test_qmatmul_cuda.py``,
``benches/gpu_qmatmul.py``).

Not yet wired into ``offload.run(compute="fast", device="cuda")``, which still refuses: the
kernels have not run on a GPU (no GPU machine was lent to the session that wrote them).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import _build, gguf, qmatmul

TYPES = qmatmul.TYPES   # the types both the CPU and the CUDA kernels multiply
MAX_N = 8               # rows of activations a kernel call multiplies (csrc: MAX_N)
LANES = 32
CHUNK_BYTES = 64 << 20  # float32 bytes of W the prefill road dequantizes at a time


def matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: str, out: torch.Tensor | None = None,
           *, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """``x @ W.T`` on the GPU for ``W`` given as ``blocks`` (uint8 CUDA ``[rows, row_bytes]``
    of ``qtype``); ``x``: float32 ``[..., cols]`` on the same GPU; ``out``: float32
    ``[..., rows]`` (made if None). Runs on ``stream`` (default: the current one).

    Raises:
        ValueError: shapes, dtypes or devices that do not fit, a type the kernels lack.
        HardwareError: neither CuPy (NVRTC) nor nvcc can build the kernels here.
    """
    rows, cols = _check(x, blocks, qtype)
    if x.device.type != "cuda" or blocks.device != x.device:
        raise ValueError(f"the CUDA fused matmul needs x and the blocks on one GPU, got "
                         f"{x.device} and {blocks.device} (on the CPU: qmatmul.matmul)")
    stream = stream if stream is not None else torch.cuda.current_stream(x.device)
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32, device=x.device)
    y2 = out.view(-1, rows)
    if x2.shape[0] == 0:
        return out
    if x2.shape[0] > MAX_N:
        _by_chunks(x2, blocks, qtype, y2, stream)
        return out
    _, _, nbytes = gguf.TYPES[qtype]
    _kernels(x.device).qmatmul(qtype, gguf.TYPES[qtype][0], blocks, blocks.shape[1] // nbytes,
                               x2, y2, x2.shape[0], stream)
    return out


def emulated(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """What ``matmul`` computes on a GPU, computed on the CPU lane by lane (bitwise, up to
    ``MAX_N`` rows of ``x`` at a time: more are taken ``MAX_N`` at a time, as no GPU call
    does). Slow: a check, not a path."""
    rows, cols = _check(x, blocks, qtype)
    lib = _emulator()
    if lib is None:
        raise RuntimeError("the CUDA kernels' CPU emulation could not be built (see the "
                           "KernelBuildWarning)")
    x2 = x.detach().to("cpu", torch.float32).reshape(-1, cols).contiguous()
    w = blocks.detach().cpu().contiguous()
    y = torch.empty(x2.shape[0], rows, dtype=torch.float32)
    nblocks = blocks.shape[1] // gguf.TYPES[qtype][2]
    for r0 in range(0, x2.shape[0], MAX_N):
        n = min(MAX_N, x2.shape[0] - r0)
        rc = lib.offload_qmatmul_warp_emulated(
            gguf.TYPES[qtype][0], w.data_ptr(), rows, nblocks, x2[r0].data_ptr(), cols, n,
            y[r0].data_ptr(), rows)
        if rc:
            raise ValueError(f"the CUDA fused matmul does not multiply {qtype} (code {rc})")
    return y.reshape(*x.shape[:-1], rows)


def error_bound(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Per output, the most ``matmul`` (or ``emulated``) may differ from
    ``qmatmul.reference`` (the float64 product of the same dequantized weights): the weights
    are exact, each product rounds once and each sum once, along at most ``m`` roundings per
    output (a lane's elements, the butterfly's 5 steps, the product), so the error is within
    ``m * 2^-24`` of ``|x| @ |W|.T`` (the classic bound ``gamma_m``, with margin)."""
    rows, cols = _check(x, blocks, qtype)
    _, block, nbytes = gguf.TYPES[qtype]
    nblocks = blocks.shape[1] // nbytes
    per_lane = -(-nblocks // LANES) * block
    m = per_lane + 5 + 1
    w = torch.from_numpy(gguf.reference(blocks.cpu().numpy(), qtype).reshape(rows, cols))
    magnitude = x.detach().cpu().double().reshape(-1, cols).abs() @ w.double().abs().t()
    return (magnitude * (m * 2.0 ** -24 * 1.01)).reshape(*x.shape[:-1], rows)


def _check(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> tuple[int, int]:
    if qtype not in TYPES:
        raise ValueError(f"the fused matmul multiplies {', '.join(TYPES)}, not {qtype}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise ValueError(f"blocks must be uint8 [rows, row_bytes], got {blocks.dtype} "
                         f"{list(blocks.shape)}")
    rows, row_bytes = blocks.shape
    if row_bytes % gguf.TYPES[qtype][2]:
        raise ValueError(f"{qtype} rows are whole blocks of {gguf.TYPES[qtype][2]} bytes, "
                         f"got rows of {row_bytes}")
    cols = qmatmul.cols_of(qtype, row_bytes)
    if x.shape[-1] != cols or x.dtype != torch.float32:
        raise ValueError(f"{qtype} weight of {rows}x{cols}: x must be float32 [..., {cols}], "
                         f"got {x.dtype} {list(x.shape)}")
    if blocks.stride(-1) != 1 or blocks.stride(0) != row_bytes:
        raise ValueError("blocks must be contiguous rows")
    return rows, cols


def _by_chunks(x2, blocks, qtype, y2, stream) -> None:
    """The prefill road: ``qmatmul``'s (W dequantized a chunk at a time into a scratch, then
    torch's matmul), here with a scratch on the GPU and every launch on ``stream``."""
    per = max(1, min(blocks.shape[0], CHUNK_BYTES // (x2.shape[1] * 4)))   # rows of W a chunk
    scratch = torch.empty(per * x2.shape[1] * 4, dtype=torch.uint8, device=x2.device)
    with torch.cuda.stream(stream):
        qmatmul._by_chunks(x2, blocks, qtype, y2, scratch)


def _kernels(device: torch.device):
    from ..errors import HardwareError
    from . import cuda

    kernels = cuda.matmul_kernels(device)
    if kernels is None:
        raise HardwareError("the fused GGUF matmul's CUDA kernels could not be built here: "
                            f"{cuda.missing_hint()}; or use compute='exact'")
    return kernels


@functools.lru_cache(maxsize=None)
def _emulator():
    lib = _build.cpu_library("gguf_matmul_warp_cpu")
    if lib is not None:
        lib.offload_qmatmul_warp_emulated.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    return lib


def sample_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random ``[rows, row_bytes]`` blocks of ``qtype`` with a trained model's scales."""
    _, block, nbytes = gguf.TYPES[qtype]
    flat = gguf.sample_blocks(qtype, rows * cols, seed)
    return flat.view(rows, cols // block * nbytes)
