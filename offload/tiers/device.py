"""The Device tier: memory of the compute device, counted against the budget.

On a GPU this is HBM; on a CPU-only machine it is RAM inside the budget. Every allocation the
runtime makes for weights goes through ``alloc`` so that ``allocated_bytes`` is the truth the
Plan is checked against.
"""
from __future__ import annotations

import mmap

import numpy as np
import torch

BLOCK = 4096


class DeviceTier:
    def __init__(self, device: torch.device):
        self.device = device
        self.allocated_bytes = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` whose first byte is 4096-aligned (O_DIRECT-able on CPU)."""
        self.allocated_bytes += nbytes
        if self.device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return aligned_host(nbytes)


HUGE = 2 << 20   # x86-64 transparent huge page


def aligned_host(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A 4096-aligned uint8 CPU tensor, physically backed before it is returned.

    Pinned buffers come from torch (cudaHostAlloc). Others are an anonymous mapping aligned to
    2 MiB, advised as huge pages and touched once now. Why: O_DIRECT reads are split into one
    block-layer segment per physically contiguous run of the buffer. Pages first touched by the
    read itself under memory pressure (a memory cgroup at its limit) come back scattered, and
    an 8 MiB read then goes out as ~0.5 MiB requests (measured: 1.7 -> 1.2 GB/s). Huge pages,
    faulted in at start-up, keep each read in a few large requests.
    """
    if pin:
        raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8, pin_memory=True)
        shift = (-raw.data_ptr()) % BLOCK
        return raw[shift:shift + nbytes]
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    length = nbytes + HUGE
    mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mm, dtype=np.uint8)          # holds mm alive
    shift = (-arr.ctypes.data) % HUGE
    # Huge pages for the whole 2 MiB pages of the buffer only: a partly used one at the tail
    # would hold up to 2 MiB that no budget counts (THP "always" would make it one too).
    whole = nbytes // HUGE * HUGE
    try:
        if hasattr(mmap, "MADV_HUGEPAGE") and whole:
            mm.madvise(mmap.MADV_HUGEPAGE, shift, whole)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            mm.madvise(mmap.MADV_NOHUGEPAGE, shift + whole, length - shift - whole)
    except OSError:   # THP disabled: 4 KiB pages, still pre-faulted below
        pass
    view = arr[shift:shift + nbytes]
    view[::4096] = 0                                   # fault every page in now
    return torch.from_numpy(view)                      # holds arr (and so mm) alive
