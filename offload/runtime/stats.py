"""What a Runtime counts, and the report ``offload.stats`` returns."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..units import Unit


@dataclass
class Counters:
    forwards: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    forward_seconds: float = 0.0
    accounted_peak_bytes: int = 0   # buffers allocated + the forward's estimate (reserve)
    kv_bytes: int = 0
    prefill_chunk: int = 0   # prompt positions per forward in the last generate()
    checksummed: set = field(default_factory=set)


class SparseStats:
    """What decoding encoded Units cost and saved (4096-aligned reads, dense Unit bytes)."""

    def __init__(self):
        self.units = 0
        self.stored_bytes = 0
        self.dense_bytes = 0
        self.decode_seconds = 0.0
        self._lock = threading.Lock()   # GPU: the I/O threads add as they launch decodes

    def add(self, unit: Unit, seconds: float) -> None:
        with self._lock:
            self.units += 1
            self.stored_bytes += unit.stored_bytes
            self.dense_bytes += unit.nbytes
            self.decode_seconds += seconds

    def as_dict(self) -> dict:
        return {"units_decoded": self.units, "stored_bytes": self.stored_bytes,
                "dense_bytes": self.dense_bytes,
                "ratio": self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0,
                "decode_seconds": self.decode_seconds,
                "decode_gbps": (self.dense_bytes / self.decode_seconds / 1e9
                                if self.decode_seconds else 0.0)}


def report(rt) -> dict:
    """Where the bytes and the milliseconds of runtime ``rt`` went (``offload.stats``)."""
    c, p, t = rt.counters, rt.pipeline.stats, rt.transport
    ex = rt.experts.stats(c.decode_tokens) if rt.experts is not None else None
    stall = t.stall["layers"] + t.stall["experts"]
    io = rt.disk.wall_seconds + ((ex or {}).get("io_seconds") or 0.0)
    disk = rt.disk.bytes_read + ((ex or {}).get("disk_bytes") or 0)
    out = {
        "budget_bytes": rt.plan.budget_bytes,
        "compute": rt.plan.compute,
        "accounted_peak_bytes": c.accounted_peak_bytes,
        "measured_peak_bytes": rt.meter.peak(),
        "baseline_bytes": rt.meter.baseline,
        "workspace_bytes": rt.meter.workspace_bytes,
        "allocated_bytes": rt.device_tier.allocated_bytes,
        "resident_bytes": rt.plan.resident_bytes,
        "held_bytes": sum(t.numel() for t in rt.held.values()),
        "staging_bytes": rt.plan.slots * rt.plan.slot_bytes,
        "kv_bytes": c.kv_bytes,
        "host_bytes": rt.staging.host_bytes if rt.staging else 0,
        "bytes_read": {"disk": disk,
                       "host_to_device": rt.staging.h2d_bytes if rt.staging else 0},
        "direct_io": rt.disk.direct,
        "fetches": p.fetches,
        "io_seconds": io,
        "stall_seconds": stall,
        "stall_by_consumer": dict(t.stall),
        "overlap": (max(0.0, 1.0 - stall / io) if io > 0 else 1.0),
        "forwards": c.forwards,
        "forward_seconds": c.forward_seconds,
        "prefill_tokens": c.prefill_tokens,
        "decode_tokens": c.decode_tokens,
        "decode_seconds": c.decode_seconds,
        "tokens_per_s": c.decode_tokens / c.decode_seconds if c.decode_seconds else 0.0,
        "resyncs": p.resyncs,
        "prefill_chunk": c.prefill_chunk,
        # the plan's prediction per decode step beside what the decode steps measured
        "predicted": {"seconds_per_step": rt.plan.predicted_s,
                      "bytes_per_step": rt.plan.streamed_bytes,
                      "bottleneck": rt.plan.bottleneck, "profile": rt.plan.profile},
        "measured": {"seconds_per_step": (c.decode_seconds / c.decode_steps
                                          if c.decode_steps else None),
                     "bytes_per_forward": disk / c.forwards if c.forwards else None,
                     "stall_per_forward": stall / c.forwards if c.forwards else None},
    }
    if rt.plan.stored_bytes != rt.plan.weight_bytes:
        out["sparse"] = rt.sparse.as_dict()
    if rt._paged_kv is not None:
        out["kv"] = rt._paged_kv.report()
    if ex is not None:
        out["experts"] = ex
    return out


def cache_bytes(cache) -> int:
    """Bytes of KV a forward's cache holds (a paged cache: its device part)."""
    if getattr(cache, "device_bytes", None) is not None:   # a PagedKVCache
        return cache.device_bytes
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
