"""A hardware profile, as the planner reads it: disk read bandwidth, host-to-device bandwidth,
compute speed. ``offload/hardware.py`` measures and caches it (it times the tiers, so it sits
above them); the planner only reads the numbers, so plans are deterministic for the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareProfile:
    """Bandwidths in bytes per second.

    Attributes:
        device: the compute device (``cpu``, ``cuda:0``).
        disk_read_bps: O_DIRECT sequential read bandwidth of the offload dir's filesystem.
        h2d_bps: pinned host-to-device copy bandwidth (0 on CPU: no link to cross).
        compute_bps: weight bytes per second one decode step (batch 1) consumes in compute.
        dtype: the dtype compute was measured in.
    """

    device: str
    disk_read_bps: float
    h2d_bps: float
    compute_bps: float
    dtype: str
