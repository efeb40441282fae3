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
        layer_s: per model family (``llama``, ``qwen2_moe`` ...), the seconds a decode step
            spends beyond moving its weight bytes through compute: ``(per decoder layer, per
            step)``, measured on a miniature of the family whose weights are too small to
            matter (the framework's work per module: launches, norms, rotary, attention over
            a short cache); a family missing here is not charged.
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
    layer_s: dict[str, tuple[float, float]] = field(default_factory=dict)
    contended: bool = False
    source: str = ""

    def step_overhead(self, family: str | None, layers: int) -> float:
        """Seconds a decode step of ``layers`` layers of ``family`` spends beyond its weight
        bytes (0 where the family was not measured)."""
        per_layer, per_step = self.layer_s.get(family or "", (0.0, 0.0))
        return layers * per_layer + per_step

    def decode_seconds(self, unit) -> float:
        """Seconds one decode of ``unit``'s encoded tensors takes (0 for a dense Unit, or an
        encoding not measured)."""
        return sum(t.nbytes / self.decode_bps[t.encoding] for t in unit.tensors
                   if t.encoding in self.decode_bps)
