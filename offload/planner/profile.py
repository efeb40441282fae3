"""A hardware profile, as the planner reads it: disk read bandwidth, host-to-device bandwidth,
compute speed. ``offload/hardware.py`` measures and caches it (it times the tiers, so it sits
above them); the planner only reads the numbers, so plans are deterministic for the same inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kernels import gguf, qmatmul
from ..memory import kernel_cache_capacity


@dataclass(frozen=True)
class HardwareProfile:
    """Bandwidths in bytes per second.

    Attributes:
        device: the compute device (``cpu``, ``cuda:0``).
        disk_read_bps: O_DIRECT sequential read bandwidth of the offload dir's filesystem.
        h2d_bps: pinned host-to-device copy bandwidth (0 on CPU: no link to cross).
        compute_bps: weight bytes per second one decode step (batch 1) consumes in compute.
        batch_compute_bps: the same at a larger batch (``{"8": ...}``): on a CPU a batch of 8
            can take 4-8x the time of one sequence (bf16 without native support: 8x, measured
            here); missing, a batch is charged as one sequence.
        dtype: the dtype compute was measured in.
        decode_bps: dense (decoded) bytes per second one thread decodes, per encoding
            measured (``gguf.Q4_K`` ..., ``bitmap.2@50``: see ``decode_key``); an encoding
            missing here is not charged.
        layer_s: per model family (``llama``, ``qwen2_moe`` ...), the seconds a decode step
            spends beyond moving its weight bytes through compute: ``(per decoder layer, per
            step)``, measured on a miniature of the family whose weights are too small to
            matter (the framework's work per module: launches, norms, rotary, attention over
            a short cache); a family missing here is not charged. ``<family>@8``: the same at
            batch 8.
        fused_bps: the fused GGUF matmul (``compute="fast"``): stored bytes per second it
            multiplies at batch 1, per type (``Q4_K``), and at batch 8 (``Q4_K@8``), with the
            kernel's thread pool, for weights of ``FUSED_LARGE`` bytes read from RAM, and for
            weights of ``FUSED_SMALL`` (``Q4_K/small``, ``Q4_K@8/small``): a weight between
            is charged between the two (per byte, by the log of its size), a weight outside at
            the nearer; a type missing here is charged as dense bytes. ``Q4_K/narrow``
            (``Q4_K@8/narrow``): the same bytes as the large weights in rows of
            ``FUSED_NARROW_COLS`` columns where those have ``FUSED_COLS``: each row costs a
            start (its sums reduced and stored, a tile's accumulators set up), which a model
            of narrow rows pays more often per byte (SmolLM2's 576-column layers and its
            49152-row head; here Q4_1 at batch 1 measured 27-35 GB/s in wide rows, 22-29 in
            narrow ones); from the two, a weight's per-byte cost is corrected for its own row
            width (``_row_seconds``).
        stream_reads: per Unit size streamed (``"524288"``: stored bytes), the runtime's own
            streaming of such Units measured with nothing to compute
            (``hardware.measure_stream_reads``): ``(bytes per second, CPU seconds per Unit)``.
            The rate against the largest size's scales ``disk_read_bps`` for Units that size
            (small reads move fewer bytes a second; at most 1x); the CPU seconds are each
            Unit's trip through the pipeline, the I/O thread and the read's system time,
            which a CPU run pays out of its compute (``read_cpu_seconds``). Missing (a
            described machine): neither charged.
        read_alone_bps: a large Unit read with nothing else in flight (the probe above with one
            slot), as an MoE layer's one missed expert is read while the layer waits: one
            17 MB Unit here 1.8-2.1 GB/s where two at once read at 2.8 (``miss_seconds``); 0:
            not measured (misses at ``disk_read_bps``).
        kernel_cache_bytes: per capacity (``"32"``: ``memory.kernel_cache_capacity``), the
            resident bytes torch's CPU matmul kernel caches reach in ``dtype`` on this machine
            when full (oneDNN's per-shape kernels for half precision on CPUs with native
            bf16/fp16; about 0 elsewhere): a CPU plan reserves it.
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
    batch_compute_bps: dict[str, float] = field(default_factory=dict)
    fused_bps: dict[str, float] = field(default_factory=dict)
    kernel_cache_bytes: dict[str, int] = field(default_factory=dict)
    stream_reads: dict[str, tuple[float, float]] = field(default_factory=dict)
    read_alone_bps: float = 0.0
    contended: bool = False
    source: str = ""

    def kernel_cache(self) -> int:
        """What torch's CPU kernel caches hold when full at this process's capacity (0 where
        not measured: a GPU, a described machine)."""
        return int(self.kernel_cache_bytes.get(str(kernel_cache_capacity()), 0))

    def disk_seconds(self, nbytes: float, unit_bytes: float = 0.0) -> float:
        """Seconds the disk takes for ``nbytes`` read as Units of ``unit_bytes`` each (0: as
        large reads): ``disk_read_bps`` scaled by the streaming rate measured at that Unit
        size against the largest size measured (by the log of the size between two measured
        sizes; at most 1)."""
        ratio = 1.0
        points = self._stream_points()
        if unit_bytes > 0 and len(points) >= 2:
            rate = _log_between([(n, bps) for n, bps, _ in points], unit_bytes)
            ratio = min(1.0, rate / max(points[-1][1], 1.0))
        return nbytes / max(self.disk_read_bps * ratio, 1.0)

    def miss_seconds(self, nbytes: float, unit_bytes: float, per_layer: float) -> float:
        """Seconds the disk takes for ``nbytes`` of missed experts of ``unit_bytes`` each, a
        layer missing ``per_layer`` of them a step on average, read together when it waits:
        one alone at ``read_alone_bps`` (at most the streaming rate), two or more at once at
        the streaming rate (``disk_seconds``), linear between one and two."""
        together = self.disk_seconds(nbytes, unit_bytes)
        if self.read_alone_bps <= 0 or nbytes <= 0:
            return together
        share = min(1.0, max(0.0, per_layer - 1.0))   # of the way from one a layer to two
        rate = nbytes / together
        alone = min(self.read_alone_bps, rate)
        return nbytes / (alone + share * (rate - alone))

    def stream_seconds(self, nbytes: float, units: float) -> tuple[float, float]:
        """``(disk seconds, CPU seconds)`` of ``nbytes`` read as ``units`` Units of their mean
        size (``disk_seconds``, ``read_cpu_seconds``); the CPU seconds are 0 off a CPU device,
        whose host threads are not its compute."""
        each = nbytes / units if units else 0.0
        cpu = self.read_cpu_seconds(units, each) if self.device.startswith("cpu") else 0.0
        return self.disk_seconds(nbytes, each), cpu

    def read_cpu_seconds(self, units: float, unit_bytes: float) -> float:
        """CPU seconds ``units`` streamed Units of ``unit_bytes`` each cost the cores: linear in
        the size through the two nearest measured sizes (at least 0), and beyond the largest
        in proportion to the size at its cost per byte (a larger Unit is more reads of that
        kind, where the slope between two small sizes would extrapolate their noise); 0 where
        not measured."""
        points = self._stream_points()
        if units <= 0 or not points:
            return 0.0
        if len(points) == 1 or unit_bytes >= points[-1][0]:
            n, _, cpu = points[-1]
            return units * cpu * (max(unit_bytes, n) / n if len(points) > 1 else 1.0)
        lo, hi = points[0], points[-1]
        for a, b in zip(points, points[1:]):
            lo, hi = a, b
            if unit_bytes <= b[0]:
                break
        slope = (hi[2] - lo[2]) / max(hi[0] - lo[0], 1)
        return units * max(0.0, lo[2] + slope * (unit_bytes - lo[0]))

    def _stream_points(self) -> list[tuple[int, float, float]]:
        return sorted((int(k), float(v[0]), float(v[1])) for k, v in self.stream_reads.items()
                      if v[0] > 0)

    def step_overhead(self, family: str | None, layers: int, batch: int = 1) -> float:
        """Seconds a decode step of ``batch`` sequences through ``layers`` layers of ``family``
        spends beyond its weight bytes (0 where the family was not measured)."""
        def at(key: str) -> float | None:
            per = self.layer_s.get(key)
            return None if per is None else layers * per[0] + per[1]

        return _between(at(family or ""), at(f"{family}@{BATCH}"), batch) or 0.0

    def compute_seconds(self, nbytes: float, batch: int = 1) -> float:
        """Seconds a decode step of ``batch`` sequences spends multiplying ``nbytes`` of
        weights: measured at batch 1 and ``BATCH``, linear in the batch between and beyond."""
        one = nbytes / max(self.compute_bps, 1.0)
        at = self.batch_compute_bps.get(str(BATCH))
        return _between(one, nbytes / at if at else None, batch)

    def units_compute_seconds(self, units, batch: int = 1) -> float:
        """Seconds a decode step of ``batch`` sequences spends multiplying ``units``' weights:
        dense bytes at ``compute_seconds``, tensors kept for the fused kernel at its measured
        speed for their type and size (``fused_bps``)."""
        dense, fused = 0, []
        for u in units:
            dense += u.nbytes
            for t in u.tensors:
                qtype = qmatmul.type_of(t.encoding)
                if qtype is not None:   # stored as uint8 [rows, row bytes]
                    fused.append((qtype, t.nbytes, t.shape[-1]))
                    dense -= t.nbytes
        return self.compute_seconds(dense, batch) + self.fused_seconds(fused, batch)

    def fused_seconds(self, weights, batch: int = 1) -> float:
        """Seconds the fused kernel takes for ``weights`` (``(type, stored bytes)`` or
        ``(type, stored bytes, bytes a row)`` per weight) at ``batch`` (a type not measured:
        as dense bytes of that size)."""
        total = 0.0
        for qtype, n, *row in weights:
            one = self._fused_spb(qtype, 1, n)
            if one is None:
                total += self.compute_seconds(n, batch)
                continue
            big = self._fused_spb(qtype, BATCH, n)
            if row:
                one += self._row_seconds(qtype, 1, row[0])
                big = None if big is None else big + self._row_seconds(qtype, BATCH, row[0])
            total += _between(n * one, n * big if big else None, batch)
        return total

    def _row_seconds(self, qtype: str, batch: int, row_bytes: int) -> float:
        """Seconds per stored byte a weight of rows of ``row_bytes`` pays beyond the measured
        rate (rows of ``FUSED_COLS`` columns) at ``batch``: a per-row cost ``c`` fitted to the
        wide and narrow measurements of the same bytes (seconds per byte ``1/wide`` and
        ``1/narrow`` = ``a + c / row bytes`` at each width), charged ``c * (1/row_bytes -
        1/wide row bytes)``; 0 for rows as wide as the probe's or wider (not measured), or
        without a narrow figure."""
        wide = self.fused_bps.get(fused_key(qtype, batch))
        narrow = self.fused_bps.get(fused_key(qtype, batch, narrow=True))
        if not wide or not narrow or row_bytes <= 0:
            return 0.0
        wide_rb, narrow_rb = probe_row_bytes(qtype, FUSED_COLS), probe_row_bytes(qtype,
                                                                                 FUSED_NARROW_COLS)
        if row_bytes >= wide_rb or narrow_rb >= wide_rb:
            return 0.0
        per_row = max(0.0, (1 / narrow - 1 / wide) / (1 / narrow_rb - 1 / wide_rb))
        return per_row * (1 / row_bytes - 1 / wide_rb)

    def _fused_spb(self, qtype: str, batch: int, n: int) -> float | None:
        """Seconds per stored byte of a weight of ``n`` bytes at ``batch`` (None: not
        measured)."""
        large = self.fused_bps.get(fused_key(qtype, batch))
        if large is None:
            return None
        small = self.fused_bps.get(fused_key(qtype, batch, small=True))
        if small is None:
            return 1 / large
        at = (math.log2(max(n, 1)) - math.log2(FUSED_SMALL)) / math.log2(FUSED_LARGE / FUSED_SMALL)
        at = min(1.0, max(0.0, at))
        return (1 - at) / small + at / large

    def decode_seconds(self, unit) -> float:
        """Seconds one decode of ``unit``'s encoded tensors takes (0 for a dense Unit, or an
        encoding not measured)."""
        keys = [(t, decode_key(t)) for t in unit.tensors]
        return sum(t.nbytes / self.decode_bps[k] for t, k in keys if k in self.decode_bps)


BATCH = 8   # the larger batch a profile measures
# The weight sizes the fused kernel is measured at (stored bytes; ``fused_bps``), and the
# columns of their rows (the narrow figure: FUSED_LARGE bytes in rows of FUSED_NARROW_COLS).
FUSED_LARGE = 16 << 20
FUSED_SMALL = 1 << 20
FUSED_COLS = 4096
FUSED_NARROW_COLS = 512


def probe_row_bytes(qtype: str, cols: int) -> int:
    """Stored bytes of a row of ``cols`` columns of ``qtype`` as the probe makes it (whole
    blocks, at least one)."""
    _, block, nbytes = gguf.TYPES[qtype]
    return max(1, cols // block) * nbytes


def fused_key(qtype: str, batch: int = 1, small: bool = False, narrow: bool = False) -> str:
    """The ``fused_bps`` key of ``qtype`` at ``batch`` (``Q4_K``, ``Q4_K@8``) for weights of
    ``FUSED_LARGE`` bytes, or ``FUSED_SMALL`` ones (``Q4_K/small``), or ``FUSED_LARGE`` bytes
    in narrow rows (``Q4_K/narrow``)."""
    return (qtype + (f"@{batch}" if batch > 1 else "") + ("/small" if small else "")
            + ("/narrow" if narrow and not small else ""))


def parse_fused_key(key: str) -> tuple[str, int, bool, bool]:
    """``fused_key``'s arguments back from a key: (type, batch, small, narrow)."""
    key, _, size = key.partition("/")
    qtype, _, batch = key.partition("@")
    return qtype, int(batch or 1), size == "small", size == "narrow"


def decode_key(t) -> str:
    """The ``decode_bps`` key of a tensor's encoding: a GGUF type as named (its speed does not
    depend on the data), a bitmap by element size and density to the nearest 10%
    (``bitmap.2@50``: bf16 values, half of them non-zero; its speed depends on both)."""
    if t.encoding != "bitmap":
        return t.encoding
    density = (t.nnz or 0) / max(1, t.nbytes // max(1, _ITEMSIZE.get(t.dtype, 4)))
    return f"bitmap.{_ITEMSIZE.get(t.dtype, 4)}@{int(round(density * 10)) * 10}"


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _log_between(points: list[tuple[int, float]], at: float) -> float:
    """The value at ``at`` from ``(size, value)`` points sorted by size: linear in the log of
    the size between the two around it, the nearer end's outside."""
    if at <= points[0][0]:
        return points[0][1]
    for (a, va), (b, vb) in zip(points, points[1:]):
        if at <= b:
            t = (math.log2(at) - math.log2(a)) / max(math.log2(b) - math.log2(a), 1e-9)
            return va + t * (vb - va)
    return points[-1][1]


def _between(one: float | None, big: float | None, batch: int) -> float | None:
    """Seconds at ``batch`` from those at 1 and at ``BATCH`` (linear; one alone: unchanged)."""
    if one is None or big is None or batch == 1:
        return one
    return max(0.0, one + (big - one) * (batch - 1) / (BATCH - 1))
