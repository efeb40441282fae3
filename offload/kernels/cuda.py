"""The CUDA decoders (``csrc/gguf_dequant.cu``, ``csrc/bitmap_decode.cu``), built once per GPU
architecture: at run time by NVRTC through CuPy (the ``cuda`` extra; no CUDA toolkit needed),
else by ``nvcc`` into a library loaded with ``ctypes`` (``_build.cuda_library``). Both builds
keep multiply-adds unfused (``--fmad=false``): the GGUF decoders are bitwise the ``gguf``
package's numpy dequantization, as on the CPU. Without either, the caller says what to install.

Launches go on the caller's CUDA stream (torch's current one by default) and read and write
device memory by raw pointer, so torch's allocator owns every buffer.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import torch

from . import _build

log = logging.getLogger(__name__)

# Each source and the C-named kernels NVRTC builds of it.
SOURCES = {"gguf_dequant": tuple(f"offload_gguf_{t}" for t in (
               "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")),
           "bitmap_decode": ("offload_bitmap_decode_u16", "offload_bitmap_decode_u32")}
# The fused GGUF matmul (``compute="fast"`` on a GPU; ``qmatmul_cuda``), built apart from the
# decoders: a GPU whose NVRTC refused it still decodes with them.
MATMUL = {"gguf_matmul": tuple(f"offload_qmatmul_{t}" for t in (
              "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"))}
OPTIONS = ("--std=c++17", "--fmad=false")
THREADS = 256
MAX_GRID = 65535


class Kernels:
    """One device's decoders: ``gguf(...)`` and ``bitmap(...)`` launch on a stream."""

    def __init__(self, how: str, modules: dict):
        self.how = how   # "nvrtc" or "nvcc"
        self._modules = modules

    def gguf(self, type_name: str, type_id: int, src: torch.Tensor, dst: torch.Tensor,
             nblocks: int, stream: torch.cuda.Stream) -> None:
        if nblocks <= 0:
            return
        if self.how == "nvrtc":
            grid = min(MAX_GRID, -(-nblocks // THREADS))
            self._launch("gguf_dequant", f"offload_gguf_{type_name.lower()}", grid, stream,
                         _ptr(src), _ptr(dst), _i64(nblocks))
            return
        err = self._modules["gguf_dequant"].offload_gguf_dequant_cuda(
            type_id, ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(dst.data_ptr()),
            ctypes.c_int64(nblocks), ctypes.c_void_p(stream.cuda_stream))
        if err:
            raise RuntimeError(f"GGUF {type_name} decode kernel launch failed (cudaError {err})")

    def bitmap(self, enc: torch.Tensor, out: torch.Tensor, n: int, nnz: int, elem: int,
               layout, error: torch.Tensor, stream: torch.cuda.Stream) -> None:
        if n == 0:
            return
        if elem not in (2, 4):
            raise ValueError(f"bitmap elements of {elem} bytes: the CUDA decoder moves 2 or 4")
        if self.how == "nvrtc":
            grid = min(MAX_GRID, -(-layout.ngroups // 8))   # 8 warps a block, a group each
            self._launch("bitmap_decode", f"offload_bitmap_decode_u{8 * elem}", grid, stream,
                         _ptr(enc), _ptr(out), _i64(n), _i64(nnz), _i64(layout.ntiles),
                         _i64(layout.ngroups), _i64(layout.values_off), _ptr(error))
            return
        err = self._modules["bitmap_decode"].offload_bitmap_decode_cuda(
            ctypes.c_void_p(enc.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(n),
            ctypes.c_int64(nnz), elem, ctypes.c_void_p(stream.cuda_stream),
            ctypes.c_void_p(error.data_ptr()))
        if err:
            raise RuntimeError(f"bitmap decode kernel launch failed (cudaError {err})")

    def qmatmul(self, type_name: str, type_id: int, blocks: torch.Tensor, nblocks: int,
                x: torch.Tensor, y: torch.Tensor, n: int, stream: torch.cuda.Stream) -> None:
        """``y[:n] = x[:n] @ W.T`` for ``W`` given as ``blocks`` (uint8 ``[rows, row_bytes]``:
        ``nblocks`` blocks of ``type_name`` a row), ``x`` and ``y`` float32 with unit column
        stride."""
        rows = blocks.shape[0]
        if rows == 0:
            return
        if self.how == "nvrtc":
            grid = min(MAX_GRID, -(-rows // (THREADS // 32)))   # a warp a row
            self._launch("gguf_matmul", f"offload_qmatmul_{type_name.lower()}", grid, stream,
                         _ptr(blocks), _i64(rows), _i64(nblocks), _ptr(x), _i64(x.stride(0)),
                         _i32(n), _ptr(y), _i64(y.stride(0)))
            return
        err = self._modules["gguf_matmul"].offload_qmatmul_cuda(
            type_id, ctypes.c_void_p(blocks.data_ptr()), ctypes.c_int64(rows),
            ctypes.c_int64(nblocks), ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(x.stride(0)),
            ctypes.c_int(n), ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(y.stride(0)),
            ctypes.c_void_p(stream.cuda_stream))
        if err:
            raise RuntimeError(f"fused {type_name} matmul kernel launch failed (code {err})")

    def _launch(self, module: str, name: str, grid: int, stream, *args) -> None:
        import cupy

        fn = self._modules[module].get_function(name)
        index = stream.device.index if stream.device.index is not None else 0
        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
            fn((grid,), (THREADS,), args)


def kernels(device: torch.device) -> Kernels | None:
    """The decoders for ``device`` (built on first use, then cached), or None where neither
    CuPy nor nvcc can build them (a warning says why)."""
    return _kernels(*_where(device), "decoders")


def matmul_kernels(device: torch.device) -> Kernels | None:
    """The fused GGUF matmul kernels for ``device`` (as ``kernels``)."""
    return _kernels(*_where(device), "matmul")


def _where(device: torch.device) -> tuple[int, str]:
    major, minor = torch.cuda.get_device_capability(device)
    return (device.index if device.index is not None else torch.cuda.current_device(),
            f"{major}{minor}")


def missing_hint() -> str:
    return ("install CuPy for this CUDA version (pip install 'offload[cuda]', which brings "
            "cupy-cuda12x: NVRTC compiles the decoders at run time) or a CUDA toolkit with nvcc")


@functools.lru_cache(maxsize=None)
def _kernels(index: int, arch: str, which: str) -> Kernels | None:
    sources = MATMUL if which == "matmul" else SOURCES
    nvrtc = _nvrtc_modules(index, arch, sources)
    if nvrtc is not None:
        return Kernels("nvrtc", nvrtc)
    libs = {name: _build.cuda_library(f"sm_{arch}", name) for name in sources}
    if all(lib is not None for lib in libs.values()):
        return Kernels("nvcc", libs)
    return None


def _nvrtc_modules(index: int, arch: str, sources: dict) -> dict | None:
    try:
        import cupy
    except ImportError:
        return None
    try:
        with cupy.cuda.Device(index):
            modules = {name: cupy.RawModule(code=(_build.CSRC / f"{name}.cu").read_text(),
                                            options=(*OPTIONS, f"-I{_build.CSRC}"),
                                            backend="nvrtc")
                       for name in sources}
            for name, module in modules.items():   # compiled now, before a budget is taken
                for kernel in sources[name]:
                    module.get_function(kernel)
        return modules
    except Exception as e:   # CuPy without NVRTC, an NVRTC error: nvcc may still build them
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("NVRTC could not compile %s for sm_%s (%s); trying nvcc",
                    ", ".join(sources), arch, why)
        return None


def _ptr(t: torch.Tensor):
    import numpy as np

    return np.uint64(t.data_ptr())


def _i64(v: int):
    import numpy as np

    return np.int64(v)


def _i32(v: int):
    import numpy as np

    return np.int32(v)
