"""Timing a kernel for the hardware profile and the benches."""
from __future__ import annotations

import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one untimed (on a GPU each
    synchronized: kernels, not launches)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()   # syncs: a measurement, off the hot path
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return max(sorted(times)[reps // 2], 1e-9)
