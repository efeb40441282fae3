"""The process's memory as the OS sees it: handing freed heap pages back, mapping large
allocations, measuring the resident peak of a run."""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A prefill's activations are freed when it ends, but glibc keeps the pages in its arenas:
    measured on a Mixtral-shaped model, 19 MiB of RSS the decode steps never use again, inside
    a memory cap that counts it."""
    lib = _libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)


def release_library_buffers() -> None:
    """Empty MKL's buffer pool (``mkl_serv_free_buffers``; a no-op for a torch without MKL).

    MKL keeps the buffers its GEMMs pack weights into in a pool of its own, which glibc's trim
    cannot reach: measured on an AMD EPYC (AVX2) machine, the planner's whole-head probe of
    SmolLM2 (49152 x 576) left 30 MB resident in it, counted against the run's budget (the run
    measured 105% of it). Called once a probe is done and before the run's own shapes warm the
    pool up again (``api.run_prepared``): what they leave is the workspace the run reuses."""
    free = _mkl_free_buffers()
    if free is not None:
        free()


@functools.lru_cache(maxsize=1)
def _mkl_free_buffers():
    """MKL's ``mkl_serv_free_buffers`` in torch's own library, or None."""
    import ctypes
    import os

    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return ctypes.CDLL(path).mkl_serv_free_buffers
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter
MMAP_THRESHOLD = 128 << 10   # map_large_allocations says why this size


@functools.lru_cache(maxsize=1)
def map_large_allocations() -> bool:
    """Serve every allocation of ``MMAP_THRESHOLD`` or more from its own mapping, returned to
    the OS when freed (glibc ``mallopt``; False elsewhere). glibc's default raises that threshold
    as large blocks are freed, so a DynamicCache growing by ``torch.cat`` leaves each layer's
    old keys and values as heap holes the larger new ones cannot reuse: measured, a chunked
    prefill of 800 positions held 2-3 MB (about the whole KV cache) over the budget's
    accounting until the heap was trimmed. And a large request is served from the heap
    wherever a free (trimmed, not resident) stretch of it fits, paging it back in: where
    loading and the planner's probes had grown the heap first, a prefill's activations landed
    in such holes and stayed resident once freed: a Q4_0 TinyLlama-shaped store at batch 8
    measured 94.6-103.9% of its budget over identical runs, depending on the heap's layout.
    So ``offload``'s import calls this, before any of that; 95.0-96.2% since. At 256 KiB,
    SmolLM2 under ``compute="fast"`` at 20% (84 positions, a decode step per forward) grew
    about 0.2 MB a step in 4 of 13 runs, to 109-113 MB of its 107.6 MB budget (the others:
    99-102 MB), on 390dc56 and after: some allocation a step between 128 and 256 KiB (the
    logits row is 196 KB) was left in the heap; at 128 KiB, 10 runs of 10 measured 99.5-100.3 MB.
    Once per process, process-wide."""
    lib = _libc()
    if lib is None:
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


KERNEL_CACHE_CAPACITY = 32
KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
_DEFAULT_CAPACITY = 1024   # both caches' own default


def cap_kernel_caches() -> None:
    """Hold torch's CPU kernel caches to ``KERNEL_CACHE_CAPACITY`` entries each, where the
    process has not set them (``offload`` does this on import). Process-wide.

    A half-precision matmul on a CPU with native bf16/fp16 (AVX512-BF16, AMX) runs a oneDNN
    kernel JIT-compiled for its shape, a new row count being a new shape, and keeps it in two
    LRU caches (oneDNN's primitive cache and ideep's, 1024 entries each by default): measured
    on an AVX512-BF16 EPYC, 0.6 MiB per shape, 140 MiB over 236 row counts, and an MoE run's
    experts see every row count from 1 to the batch (and many more in a prefill): a budget of
    322 MB measured 355 MB. Each cache reads its capacity when torch builds its first oneDNN
    kernel, so this must run before that (``offload``'s import does); at 32 entries the same
    sweep holds 26-33 MiB, which the plan reserves (``hardware.measure_kernel_cache``), and a
    decode step's shapes (about 20 for an MoE at batch 8) stay cached."""
    for var in KERNEL_CACHE_VARS:
        os.environ.setdefault(var, str(KERNEL_CACHE_CAPACITY))


def kernel_cache_capacity() -> int:
    """Entries torch's CPU kernel caches keep in this process (the larger of the two)."""
    def entries(var: str) -> int:
        try:
            return int(os.environ.get(var, _DEFAULT_CAPACITY))
        except ValueError:
            return _DEFAULT_CAPACITY
    return max(entries(v) for v in KERNEL_CACHE_VARS)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def zero_page_tensor(shape: tuple[int, ...], dtype) -> torch.Tensor:
    """A tensor of ``shape`` on untouched private anonymous pages: reads map the kernel's zero
    page (no RSS) until a page is written. Huge pages are refused: one would be allocated,
    not shared."""
    import math
    import mmap

    import torch

    numel = math.prod(shape)
    buf = mmap.mmap(-1, max(numel * dtype.itemsize, 1),
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(*shape)


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in bytes; ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """VmHWM := VmRSS for this process (``/proc/self/clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_bytes() -> int | None:
    """The process's resident memory now."""
    return _status_bytes("VmRSS")


class PeakMeter:
    """The process's measured memory high-water mark over a run, above its baseline.

    On the CPU: resident memory (``VmHWM``), reset when the meter starts (``clear_refs``), the
    RSS at that moment (the interpreter, its libraries, the model's skeleton) subtracted. On a
    GPU: the CUDA allocator's peak since the start (``torch.cuda.max_memory_allocated``,
    reset when the meter starts), above what it held then. Resetting is process-wide: the
    last meter started wins. Where the kernel refuses the reset, the high-water mark stays the
    process's whole-life one, which can only read larger, never smaller.
    """

    def __init__(self, device):
        self.device = device
        self.baseline = 0
        self.workspace_bytes = 0   # the kernels' workspaces the caller allocated before start
        self.resettable = False
        self._before = 0           # the peak of the phase before ``rebase``, above ``start``'s

    def start(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.resettable = True
            return
        import gc

        gc.collect()
        release_free_heap()   # freed pages a run would reuse unseen: back to the OS first
        self.resettable = _reset_high_water_mark()
        self.baseline = rss_bytes() or 0
        self._before = 0

    def restart(self) -> None:
        """End a phase that prepares the run, such as a hardware profile measured in this
        process: its peak stays the first phase's (``peak`` is the larger), and what it left
        resident (the heap's fragments, the code pages its probes touched: 1-3 MiB measured)
        joins the baseline, as a pack's leftovers do, instead of counting against the run's
        budget. The high-water mark restarts here."""
        if self.device.type == "cuda":
            return
        before = max(self._before, self.peak() or 0)
        self.start()   # the collector and the heap's free pages first, as at the start
        self._before = before

    def rebase(self) -> None:
        """Start a second phase: what ran since ``start`` (a run's probes and builds, before
        it takes its budget) keeps its own peak above the first baseline; the high-water mark
        restarts here, above the resident memory now if that is less (memory the process
        freed after ``start``, a collector's late frees or another runtime's buffers, would
        otherwise be reused by the run unseen, and the peak read low). ``peak`` is the larger
        of the two phases'. Called just before a run takes its budget."""
        if self.device.type == "cuda":
            return
        rss = rss_bytes()
        if rss is None:
            return
        self._before = max(self._before, self.peak() or 0)
        self.baseline = min(self.baseline, rss)
        if self.resettable:
            _reset_high_water_mark()

    def peak(self) -> int | None:
        """Bytes above the baseline at the high-water mark (``None``: not measurable here)."""
        if self.device.type == "cuda":
            import torch

            return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
        hwm = _status_bytes("VmHWM")
        return None if hwm is None else max(self._before, hwm - self.baseline)
