"""The Device tier: memory of the compute device, counted against the budget.

On a GPU this is HBM; on a CPU-only machine it is RAM inside the budget. Every allocation the
runtime makes for weights goes through ``alloc`` so that ``allocated_bytes`` is the truth the
Plan is checked against.
"""
from __future__ import annotations

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


def aligned_host(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A 4096-aligned uint8 CPU tensor (over-allocates one block and slices)."""
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % BLOCK
    return raw[shift:shift + nbytes]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU uint8 tensor: the buffer the disk tier reads into."""
    return t.numpy()
