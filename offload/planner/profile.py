"""A hardware profile, as the planner reads it: disk read bandwidth, host-to-device bandwidth,
compute speed. ``offload/hardware.py`` measures and caches it (it times the tiers, so it sits
above them); the planner only reads the numbers, so plans are deterministic for the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HardwareProfile:
    """Bandwidths in bytes per second.

    Attributes:
        device: the compute device (``cpu``, ``cuda:0``).
        disk_read_bps: O_DIRECT sequential read bandwidth of the offload dir's filesystem.
        h2d_bps: pinned host-to-device copy bandwidth (0 on CPU: no link to cross).
        compute_bps: weight bytes per second one decode step (batch 1) consumes in compute.
        dtype: the dtype compute was measured in.
        decode_bps: dense (decoded) bytes per second one thread decodes, per encoding
            measured (``gguf.Q4_K`` ...); an encoding missing here is not charged.
        contended: measured while another offload process read the same offload dir: used
            by the run that measured it, never cached.
        source: where the figures come from (measured here, or the file describing a machine),
            for the plan to say; never cached.
    """

    device: str
    disk_read_bps: float
    h2d_bps: float
    compute_bps: float
    dtype: str
    decode_bps: dict[str, float] = field(default_factory=dict)
    contended: bool = False
    source: str = ""

    def decode_seconds(self, unit) -> float:
        """Seconds one decode of ``unit``'s encoded tensors takes (0 for a dense Unit, or an
        encoding not measured)."""
        return sum(t.nbytes / self.decode_bps[t.encoding] for t in unit.tensors
                   if t.encoding in self.decode_bps)
