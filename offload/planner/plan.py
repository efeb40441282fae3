"""The Plan: pure, printable, serialisable data saying where every Unit lives and why."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from ..kernels.qmatmul import INT_ROWS
from ..memory import kernel_cache_capacity
from ..sizes import format_bytes

DEVICE, HOST, DISK = "device", "host", "disk"


@dataclass(frozen=True)
class ExpertPlan:
    """How an MoE model's experts move.

    Attributes:
        mode: ``cache`` (expert Units fetched as the router picks them, into a device expert
            cache) or ``stream`` (every expert of every layer streamed each pass, as part of
            its layer).
        slots / slot_bytes: the expert cache's slots and their size.
        protected: cache slots whose experts are protected from the other layers' traffic,
            spread evenly over the MoE layers (each keeps its most recently or, with ``lfu``,
            most used experts there); the other slots are shared.
        policy: ``lru`` or ``lfu``.
        predict_depth / predict_width: predictive loading: layers ahead whose router is
            applied to the current hidden state, and experts per token prefetched for each
            (0: off).
        bytes_per_step: expert bytes a decode step is predicted to read (at the planned batch).
        from_heat: whether the cache's hits were predicted from an earlier run's measured
            expert heat (else from a router that spreads tokens evenly).
        from_trace: whether they were replayed over the experts that run's decode steps used,
            in order (a run at the plan's batch: reuse between steps included).
        scratch_bytes: the dense buffer an expert stored encoded (GGUF blocks) is decoded into
            at each use: the cache's slots hold experts as stored (0: experts are dense).
        decode_s: seconds a decode step is predicted to spend decoding cached experts.
    """

    mode: str = "cache"
    slots: int = 0
    slot_bytes: int = 0
    protected: int = 0
    policy: str = "lru"
    predict_depth: int = 0
    predict_width: int = 0
    bytes_per_step: int = 0
    from_heat: bool = False
    from_trace: bool = False
    scratch_bytes: int = 0
    decode_s: float = 0.0


@dataclass(frozen=True)
class KVPlan:
    """Where the KV cache lives.

    Attributes:
        mode: ``dynamic`` (transformers' cache, all of it in the reserve), ``paged``
            (``device_bytes`` of it in the reserve: the newest ``device_blocks`` blocks of
            ``block_tokens`` per layer and two gather buffers; the whole ``disk_bytes`` at
            ``max_context`` x ``batch`` can spill to disk) or ``batched`` (a
            continuous-batching manager's own paged cache, ``device_bytes`` for ``batch``
            sequences of ``max_context`` in pages of ``block_tokens``: ``offload serve``).
        prefill_chunk: the prompt positions per forward the reserve's activations are sized
            for (paged; batched: tokens per forward, all sequences together; dynamic: 0 for a
            one-shot prefill of every position the reserve holds).
        auto: ``kv="auto"``: ``generate()`` may move a dynamic plan's cache to a paged one
            (spilled to disk) when its context outgrows the reserve.
        buffered: a dynamic plan whose runtime hands forwards a cache written in place
            (``adapters/kvbuffer.py``: ``compute="fast"``).
        overhead_bytes: the runtime's own objects (``make.bookkeeping``), in the reserve
            beside every forward.
        kernel_bytes: of ``overhead_bytes``, what torch's CPU matmul kernel caches can grow
            by (``HardwareProfile.kernel_cache``: half precision on CPUs with native bf16).
        kernels_over_bytes: the same, where the budget could not hold it beside the smallest
            working set: not reserved, so the run may measure up to this much over the budget.
        fused_scratch_bytes: ``compute="fast"``: the fused kernel's prefill scratch (float32
            chunks of a weight), held by forwards of more than ``qmatmul.INT_ROWS`` rows
            only, and reserved where the plan's forwards reach that (``reserve.forward_bytes``).
    """

    mode: str = "dynamic"
    auto: bool = False
    buffered: bool = False
    overhead_bytes: int = 0
    kernel_bytes: int = 0
    kernels_over_bytes: int = 0
    max_context: int = 0
    batch: int = 0
    block_tokens: int = 0
    device_blocks: int = 0
    device_bytes: int = 0
    disk_bytes: int = 0
    prefill_chunk: int = 0
    fused_scratch_bytes: int = 0

    def kernel_words(self) -> str:
        """For a minimum budget's message: the reserve's share for torch's kernel caches."""
        if not self.kernel_bytes:
            return ""
        return (f" (of which {format_bytes(self.kernel_bytes)} for torch's matmul kernels on "
                "this CPU: ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY set lower "
                "before importing offload shrink it, at some speed)")

    @property
    def paged(self) -> bool:
        return self.mode == "paged"


@dataclass(frozen=True)
class Plan:
    """A placement and a schedule.

    Attributes:
        budget_bytes: the compute tier's budget.
        device: the compute device.
        homes: ``(unit key, tier, nbytes)`` in store order; tier is device, host or disk;
            nbytes what the Unit takes there (a held Unit's stored bytes).
        order: unit keys in the order a forward pass consumes them.
        stream: the keys of ``order`` not resident decoded: what the pipeline fetches each
            pass into its slots (read from disk or the host tier, or decoded from memory).
        held: resident Units held as stored (their encoding, on the compute device), decoded
            into a slot at each use: in ``stream``, not in ``streamed_bytes``.
        batch: the sequences per decode step the prediction is for.
        overhead_s: the part of ``compute_s`` beyond the weight bytes (the framework's work per
            layer, ``HardwareProfile.step_overhead``).
        head_probed: whether ``head_inexact_rows`` was probed (a plan from a config alone
            runs nothing: not probed).
        slots: staging slots in the ring (the prefetch depth is ``slots - 1``).
        slot_bytes: bytes of one slot (the largest streamed Unit, 4096-aligned).
        landing_bytes: bytes of each slot's landing buffer for encoded Units' stored bytes
            (the largest streamed encoded Unit as stored; 0 without encoded Units).
        stored_bytes: the store's Units as stored (``weight_bytes`` when none is encoded).
        resident_bytes: bytes of Units kept on the compute device (held ones as stored).
        reserve_bytes: KV cache and activations reserved for ``max_tokens`` cached tokens.
        max_tokens: batch x context the reserve is sized for.
        weight_bytes: all weights.
        streamed_bytes: bytes read per forward pass from disk or the host tier (as stored).
        minimum_bytes: the smallest budget any placement of this model fits.
        compute_s / io_s / link_s / decode_s: predicted seconds per decode step for each
            resource (decode: the decode thread, for streamed and held encoded Units).
        predicted_s: predicted seconds per decode step.
        bottleneck: the resource that sets ``predicted_s``.
        compute: ``exact`` or ``fast`` (``planner.compute``); ``fused_tensors``: how many
            weights the fused kernel multiplies from their blocks.
        encoded_units: ``(key, dense bytes, stored bytes, decode seconds)`` of each encoded
            Unit (decode: one decode at the measured speed, 0 where not measured).
        experts: the expert part of an MoE model's plan (``ExpertPlan``), ``None`` for a
            dense model.
        kv: where the KV cache lives (``KVPlan``).
        head_inexact_rows: input row counts (batch x positions) at which the streamed LM
            head's chunks give other bits than the whole matrix on this machine (empty when
            the head is resident, or its chunks are exact here).
        profile: where the hardware figures the prediction rests on come from.
        disk_bps / h2d_bps / compute_bps: those figures (bytes per second; 0: not given), and
            ``itemsize`` the bytes of a weight in memory: what ``advice`` estimates from.
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
    encoded_units: tuple[tuple[str, int, int, float], ...] = ()
    decode_s: float = 0.0
    experts: ExpertPlan | None = None
    kv: KVPlan = field(default_factory=KVPlan)
    head_inexact_rows: tuple[int, ...] = ()
    profile: str = ""
    disk_bps: float = 0.0
    h2d_bps: float = 0.0
    compute_bps: float = 0.0
    itemsize: int = 0
    held: tuple[str, ...] = ()
    overhead_s: float = 0.0
    batch: int = 1
    head_probed: bool = True
    compute: str = "exact"
    fused_tensors: int = 0

    @property
    def home(self) -> dict[str, str]:
        return {k: t for k, t, _ in self.homes}

    @property
    def total_bytes(self) -> int:
        """What the compute tier holds at most: resident + slots + expert cache + reserve."""
        cache = (self.experts.slots * self.experts.slot_bytes + self.experts.scratch_bytes
                 if self.experts else 0)
        return (self.resident_bytes + self.slots * (self.slot_bytes + self.landing_bytes)
                + cache + self.reserve_bytes)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The placement table and the prediction, for people."""
        rows = self._rows()
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in width))
        return "\n".join(lines + ["", *self._summary(), *self._notes(), *self.advice()])

    def advice(self) -> list[str]:
        """What would change the prediction, each an estimate from the same cost model: a
        budget that keeps every Unit resident; on a GPU without a host tier, one holding the
        streamed Units; a 4-bit store of a dense one (lossy). Empty without the figures."""
        if not self.compute_bps:
            return []
        if self.bottleneck == "compute":
            return ["", "what would change it: nothing the budget or the disk can do (compute-"
                        "bound); a batch of sequences shares each step's weights"]
        rate = lambda s: f"{1 / max(s, 1e-9):.2f} tok/s"   # noqa: E731
        compute = self.compute_s   # placement does not change it (but a MoE's decode)
        lines = ["", "what would change it (estimates, same cost model):",
                 f"  a budget of {format_bytes(self.weight_bytes + self.reserve_bytes)} keeps "
                 f"every Unit in memory: compute-bound, ~{rate(compute)}"]
        if self.h2d_bps and not any(t == HOST for _, t, _ in self.homes):
            link = self.streamed_bytes / self.h2d_bps
            lines.append(f"  a host tier of {format_bytes(self.streamed_bytes)} (--host-budget, "
                         "host_budget=) holds the streamed Units in pinned RAM, read once: "
                         f"{format_bytes(self.streamed_bytes)} over the host link a step, "
                         f"~{rate(max(compute, link))}")
        if self.stored_bytes == self.weight_bytes and self.itemsize and self.disk_bps \
                and not self.fused_tensors:   # fast: the weights already are blocks
            q4 = self.streamed_bytes * (144 / 256) / self.itemsize   # Q4_K: 144 B / 256
            lines.append(f"  a 4-bit store (Q4_K, LOSSY) reads ~{format_bytes(q4)} a step: "
                         f"~{rate(max(compute, q4 / self.disk_bps))}")
        return lines

    def _rows(self) -> list[tuple[str, str, str]]:
        """(tier, what, bytes) for each tier, the staging and the reserve."""
        rows = [("tier", "units", "bytes")]
        for tier in (DEVICE, HOST, DISK):
            keys = [k for k, t, _ in self.homes if t == tier]
            if keys:
                nbytes = sum(n for _, t, n in self.homes if t == tier)
                held = f"; {len(self.held)} of them as stored" if tier == DEVICE and \
                    self.held else ""
                rows.append((tier, _span(keys) + held, format_bytes(nbytes)))
        rows.append(("staging", f"{self.slots} slots", format_bytes(self.slots * self.slot_bytes)))
        if self.landing_bytes:
            rows.append(("landing", f"{self.slots} buffers (encoded Units as stored)",
                         format_bytes(self.slots * self.landing_bytes)))
        ex, kv = self.experts, self.kv
        if ex is not None and ex.slots:
            stored = ", experts as stored" if ex.scratch_bytes else ""
            rows.append(("expert cache", f"{ex.slots} slots ({ex.protected} kept by their "
                         f"layer, {ex.policy}{stored})", format_bytes(ex.slots * ex.slot_bytes)))
        if ex is not None and ex.scratch_bytes:
            rows.append(("expert decode", "1 expert, decoded at each use",
                         format_bytes(ex.scratch_bytes)))
        if kv.mode == "batched":
            rows.append(("KV+activations", f"batched: {kv.batch} sequences x "
                         f"{kv.max_context} positions in pages of {kv.block_tokens}, "
                         f"{kv.prefill_chunk} tokens per forward",
                         format_bytes(self.reserve_bytes)))
        elif kv.paged:
            rows.append(("KV+activations", f"paged: {kv.batch} x {kv.max_context} "
                         f"positions, prefill chunks of {kv.prefill_chunk}",
                         format_bytes(self.reserve_bytes)))
            rows.append(("KV spill file", f"at most (the whole KV at {kv.batch} x "
                         f"{kv.max_context} positions)", format_bytes(kv.disk_bytes)))
        else:
            rows.append(("KV+activations", f"{self.max_tokens} tokens, " + (
                f"prefill in chunks of {kv.prefill_chunk}" if kv.prefill_chunk else
                "one-shot prefill (longer prompts: in chunks)"), format_bytes(self.reserve_bytes)))
        if kv.overhead_bytes:
            rows.append(("  of which", "the runtime's own objects",
                         format_bytes(kv.overhead_bytes - kv.kernel_bytes)))
        if kv.fused_scratch_bytes:
            rows.append(("  and", "the fused kernel's prefill scratch (forwards of more than "
                         f"{INT_ROWS} rows)", format_bytes(kv.fused_scratch_bytes)))
        if kv.kernel_bytes:
            rows.append(("  and", f"torch's matmul kernels ({kernel_cache_capacity()} shapes "
                         "cached)", format_bytes(kv.kernel_bytes)))
        if kv.kernels_over_bytes:
            rows.append(("NOT reserved", "torch's matmul kernels: the budget cannot hold them, "
                         "the run may go over it by", format_bytes(kv.kernels_over_bytes)))
        return rows

    def _summary(self) -> list[str]:
        return [
            f"compute tier: {format_bytes(self.total_bytes)} of {format_bytes(self.budget_bytes)}"
            f" budget (minimum {format_bytes(self.minimum_bytes)}); device {self.device}",
            (f"budget = {self.budget_bytes / max(self.weight_bytes, 1):.1%} of the "
             f"{format_bytes(self.weight_bytes)} of weights as they sit in memory, decoded (what "
             "a percentage budget is a share of, whatever the store's encoding)"
             if not self.fused_tensors else
             f"budget = {self.budget_bytes / max(self.weight_bytes, 1):.1%} of the "
             f"{format_bytes(self.weight_bytes)} of weights as compute='fast' holds them (the "
             "quantized ones as GGUF blocks); a percentage budget is a share of the weights "
             "decoded, as in exact"),
            f"streamed per forward: {format_bytes(self.streamed_bytes)} of "
            f"{format_bytes(self.weight_bytes)} weights; prefetch depth {max(self.slots - 1, 0)}",
            *([f"encoded store: {format_bytes(self.stored_bytes)} stored for "
               f"{format_bytes(self.weight_bytes)} of weights "
               f"({self.stored_bytes / max(self.weight_bytes, 1):.2f}x)"]
              if self.stored_bytes != self.weight_bytes else []),
            f"predicted per decode step: {self.predicted_s * 1000:.1f} ms "
            f"({self.batch / max(self.predicted_s, 1e-9):.2f} tok/s at batch {self.batch}) — "
            "bottleneck: "
            f"{self.bottleneck} (compute {self.compute_s * 1000:.1f} ms"
            + (f" of which {self.overhead_s * 1000:.1f} ms per-layer work" if self.overhead_s
               else "") + ", disk "
            f"{self.io_s * 1000:.1f} ms, host link {self.link_s * 1000:.1f} ms"
            + (f", decode {self.decode_s * 1000:.1f} ms" if self.decode_s else "") + ")",
            *([f"hardware profile: {self.profile}"] if self.profile else []),
            "compute: " + ("fast: " + f"{self.fused_tensors} quantized weights multiplied "
                           "from their GGUF blocks by the fused kernel (activations rounded to "
                           "8 bits per block; not bitwise exact)" if self.compute == "fast" else
                           "exact: weights decoded to float, bitwise transformers' model"),
        ]

    def _notes(self) -> list[str]:
        lines = []
        if self.encoded_units:
            lines += ["", "encoded Units: dense size -> stored size (on disk, moved, and in memory "
                          "where held as stored), decode time per use; where each is:"]
            groups: dict[str, list] = {}
            home, held = self.home, set(self.held)
            for key, dense, stored, decode in self.encoded_units:
                label = ".".join("*" if p.isdigit() else p for p in key.split("."))
                form = "held" if key in held else "decoded" if home.get(key) == DEVICE else \
                    "cached" if key.startswith("expert.") and self.experts is not None \
                    and self.experts.slots else home.get(key, DISK)
                groups.setdefault(label, []).append((dense, stored, decode, form))
            for label, rows in groups.items():
                n = len(rows)
                dense, stored = sum(r[0] for r in rows), sum(r[1] for r in rows)
                decode = sum(r[2] for r in rows) / n
                forms = Counter(r[3] for r in rows)
                where = ", ".join(f"{forms[f]} {_FORMS[f]}" for f in _FORMS if forms[f])
                lines.append(f"  {label} x{n}: {format_bytes(dense // n)} -> "
                             f"{format_bytes(stored // n)} each ({stored / dense:.2f}x)"
                             + (f", decode {decode * 1000:.2g} ms" if decode else "")
                             + f"; {where}")
        if not self.head_probed and self.device.startswith("cpu") and any(
                k.startswith("head.") for k in self.stream):
            lines.append("LM head: streamed in chunks; whether this CPU's matmul rounds them as "
                         "the whole matrix is checked by the run (a plan from a config alone "
                         "runs nothing)")
        if self.head_inexact_rows:
            lines.append("LM head: streamed in chunks, which this machine's matmul rounds "
                         "otherwise than the whole matrix at "
                         f"{', '.join(map(str, self.head_inexact_rows))} rows (logits not bitwise "
                         "there; a budget that keeps the head resident is)")
        ex = self.experts
        if ex is not None and ex.mode == "cache":
            hits = ("replayed over the experts an earlier run's decode steps used"
                    if ex.from_trace else
                    "from the expert heat an earlier run measured" if ex.from_heat else
                    "as for a router that spreads tokens evenly: no heat measured yet")
            lines.append(
                f"experts: fetched as routed, ~{format_bytes(ex.bytes_per_step)} per decode "
                f"step (cache hits {hits}); prediction "
                + (f"depth {ex.predict_depth}, width {ex.predict_width}" if ex.predict_depth
                   else "off"))
        elif ex is not None:
            lines.append("experts: streamed with their layer (every expert, every pass)")
        return lines


_FORMS = {"decoded": "resident decoded", "held": "resident as stored (decoded at each use)",
          "cached": "fetched as routed into the expert cache, as stored (decoded at each use)",
          HOST: "in the host tier", DISK: "streamed from disk"}


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
