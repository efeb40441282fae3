"""The Plan: pure, printable, serialisable data saying where every Unit lives and why."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..sizes import format_bytes

DEVICE, HOST, DISK = "device", "host", "disk"


@dataclass(frozen=True)
class Plan:
    """A placement and a schedule.

    Attributes:
        budget_bytes: the compute tier's budget.
        device: the compute device.
        homes: ``(unit key, tier, nbytes)`` in store order; tier is device, host or disk.
        order: unit keys in the order a forward pass consumes them.
        stream: the non-resident keys of ``order``: what the pipeline fetches each pass.
        slots: staging slots in the ring (the prefetch depth is ``slots - 1``).
        slot_bytes: bytes of one slot (the largest streamed Unit, 4096-aligned).
        landing_bytes: bytes of each slot's landing buffer for encoded Units' stored bytes
            (the largest streamed encoded Unit as stored; 0 without encoded Units).
        stored_bytes: the store's Units as stored (``weight_bytes`` when none is encoded).
        resident_bytes: bytes of Units kept on the compute device.
        reserve_bytes: KV cache and activations reserved for ``max_tokens`` cached tokens.
        max_tokens: batch x context the reserve is sized for.
        weight_bytes: all weights.
        streamed_bytes: bytes fetched per forward pass (as stored).
        minimum_bytes: the smallest budget any placement of this model fits.
        compute_s / io_s / link_s: predicted seconds per decode step for each resource.
        predicted_s: predicted seconds per decode step.
        bottleneck: the resource that sets ``predicted_s``.
        experts: how MoE experts move: ``cache`` (expert Units fetched as the router picks
            them, into a device expert cache), ``stream`` (every expert of every layer streamed
            each pass, as part of its layer), or ``""`` for a dense model.
        expert_slots / expert_slot_bytes: the expert cache's slots and their size.
        expert_protected: cache slots whose experts are protected from the other layers'
            traffic, spread evenly over the MoE layers (each keeps its most recently or, with
            ``lfu``, most used experts there); the other slots are shared.
        expert_policy: ``lru`` or ``lfu``.
        predict_depth / predict_width: predictive loading: layers ahead whose router is applied
            to the current hidden state, and experts per token prefetched for each (0: off).
        expert_bytes_per_step: expert bytes a decode step is predicted to read (batch 1).
        encoded_units: ``(key, dense bytes, stored bytes)`` of each encoded Unit.
        kv: ``dynamic`` (the KV cache in the reserve) or ``paged`` (``kv_device_bytes`` of it
            in the reserve: the newest ``kv_device_blocks`` blocks of ``kv_block_tokens`` per
            layer and two gather buffers; the whole ``kv_disk_bytes`` at ``max_context`` x
            ``kv_batch`` can spill to disk). ``prefill_chunk``: the prompt positions per
            forward the reserve's activations are sized for.
        head_inexact_rows: input row counts (batch x positions) at which the streamed LM
            head's chunks give other bits than the whole matrix on this machine (empty when
            the head is resident, or its chunks are exact here).
    """

    budget_bytes: int
    device: str
    homes: tuple[tuple[str, str, int], ...]
    order: tuple[str, ...]
    stream: tuple[str, ...]
    slots: int
    slot_bytes: int
    landing_bytes: int
    stored_bytes: int
    resident_bytes: int
    reserve_bytes: int
    max_tokens: int
    weight_bytes: int
    streamed_bytes: int
    minimum_bytes: int
    compute_s: float
    io_s: float
    link_s: float
    predicted_s: float
    bottleneck: str
    experts: str = ""
    expert_slots: int = 0
    expert_slot_bytes: int = 0
    expert_protected: int = 0
    expert_policy: str = "lru"
    predict_depth: int = 0
    predict_width: int = 0
    expert_bytes_per_step: int = 0
    encoded_units: tuple[tuple[str, int, int], ...] = ()
    kv: str = "dynamic"
    max_context: int = 0
    kv_batch: int = 0
    kv_block_tokens: int = 0
    kv_device_blocks: int = 0
    kv_device_bytes: int = 0
    kv_disk_bytes: int = 0
    prefill_chunk: int = 0
    head_inexact_rows: tuple[int, ...] = ()

    @property
    def home(self) -> dict[str, str]:
        return {k: t for k, t, _ in self.homes}

    @property
    def total_bytes(self) -> int:
        """What the compute tier holds at most: resident + slots + expert cache + reserve."""
        return (self.resident_bytes + self.slots * (self.slot_bytes + self.landing_bytes)
                + self.expert_slots * self.expert_slot_bytes + self.reserve_bytes)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The placement table and the prediction, for people."""
        rows = [("tier", "units", "bytes")]
        for tier in (DEVICE, HOST, DISK):
            keys = [k for k, t, _ in self.homes if t == tier]
            if keys:
                nbytes = sum(n for _, t, n in self.homes if t == tier)
                rows.append((tier, _span(keys), format_bytes(nbytes)))
        rows.append(("staging", f"{self.slots} slots", format_bytes(self.slots * self.slot_bytes)))
        if self.landing_bytes:
            rows.append(("landing", f"{self.slots} buffers (encoded Units as stored)",
                         format_bytes(self.slots * self.landing_bytes)))
        if self.expert_slots:
            rows.append(("expert cache", f"{self.expert_slots} slots ({self.expert_protected} "
                         f"kept by their layer, {self.expert_policy})",
                         format_bytes(self.expert_slots * self.expert_slot_bytes)))
        if self.kv == "paged":
            rows.append(("KV+activations", f"paged: {self.kv_batch} x {self.max_context} "
                         f"positions, prefill chunks of {self.prefill_chunk}",
                         format_bytes(self.reserve_bytes)))
            rows.append(("KV spill file", f"at most (the whole KV at {self.kv_batch} x "
                         f"{self.max_context} positions)", format_bytes(self.kv_disk_bytes)))
        else:
            rows.append(("KV+activations", f"{self.max_tokens} tokens",
                         format_bytes(self.reserve_bytes)))
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in width))
        lines += [
            "",
            f"compute tier: {format_bytes(self.total_bytes)} of {format_bytes(self.budget_bytes)}"
            f" budget (minimum {format_bytes(self.minimum_bytes)}); device {self.device}",
            f"streamed per forward: {format_bytes(self.streamed_bytes)} of "
            f"{format_bytes(self.weight_bytes)} weights; prefetch depth {max(self.slots - 1, 0)}",
            *([f"encoded store: {format_bytes(self.stored_bytes)} stored for "
               f"{format_bytes(self.weight_bytes)} of weights "
               f"({self.stored_bytes / max(self.weight_bytes, 1):.2f}x)"]
              if self.stored_bytes != self.weight_bytes else []),
            f"predicted per decode step: {self.predicted_s * 1000:.1f} ms "
            f"({1 / max(self.predicted_s, 1e-9):.2f} tok/s at batch 1) — bottleneck: "
            f"{self.bottleneck} (compute {self.compute_s * 1000:.1f} ms, disk "
            f"{self.io_s * 1000:.1f} ms, host link {self.link_s * 1000:.1f} ms)",
        ]
        if self.encoded_units:
            lines += ["", "encoded Units (bytes in memory -> bytes moved):"]
            groups: dict[str, list] = {}
            for key, dense, stored in self.encoded_units:
                label = ".".join("*" if p.isdigit() else p for p in key.split("."))
                groups.setdefault(label, []).append((dense, stored))
            for label, sizes in groups.items():
                dense, stored = sum(d for d, _ in sizes), sum(s for _, s in sizes)
                lines.append(f"  {label} x{len(sizes)}: {format_bytes(dense // len(sizes))} -> "
                             f"{format_bytes(stored // len(sizes))} each ({stored / dense:.2f}x)")
        if self.head_inexact_rows:
            lines.append("LM head: streamed in chunks, which this machine's matmul rounds "
                         "otherwise than the whole matrix at "
                         f"{', '.join(map(str, self.head_inexact_rows))} rows (logits not bitwise "
                         "there; a budget that keeps the head resident is)")
        if self.experts == "cache":
            lines.append(
                f"experts: fetched as routed, ~{format_bytes(self.expert_bytes_per_step)} per "
                "decode step; prediction " + (f"depth {self.predict_depth}, width "
                                              f"{self.predict_width}" if self.predict_depth
                                              else "off"))
        elif self.experts == "stream":
            lines.append("experts: streamed with their layer (every expert, every pass)")
        return "\n".join(lines)


def _span(keys: list[str]) -> str:
    """``layer.0.attn, layer.1.attn, norm`` -> ``layer.*.attn 0-1 (2), norm``."""
    groups: dict[str, list[int]] = {}
    for k in keys:
        parts = k.split(".")
        nums = [p for p in parts if p.isdigit()]
        label = ".".join("*" if p.isdigit() else p for p in parts)
        groups.setdefault(label, []).append(int(nums[0]) if nums else -1)
    out = []
    for label, idx in groups.items():
        idx = sorted(i for i in idx if i >= 0)
        if not idx:
            out.append(label)
        elif len(idx) == 1:
            out.append(label.replace("*", str(idx[0])))
        elif idx == list(range(idx[0], idx[-1] + 1)):
            out.append(f"{label} {idx[0]}-{idx[-1]} ({len(idx)})")
        else:
            out.append(f"{label} x{len(idx)}")
    return ", ".join(out)
