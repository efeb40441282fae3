"""Placement: which Units stay on the compute device, how many staging slots, and the cost.

Every streamed byte is read once per forward pass, and reads overlap compute only when there
are at least two staging slots. Staging slots are sized to the largest streamed Unit; Units
larger than the chosen slot size must be resident. The search tries each distinct Unit size as
the slot size with the deepest prefetch that fits (by default enough to keep ~64 MB in flight),
fills the rest of the budget greedily with the Units that save the most bytes per pass (spread
evenly over the pass), and keeps the placement with the least predicted time per decode step
(ties: fewer bytes streamed, fewer slots), so the same inputs always give the same Plan.

Encoded Units (``bitmap`` or GGUF-block tensors) take their dense size in memory but move
their stored size: each slot then has a landing buffer for the stored bytes, and keeping such a
Unit resident decoded saves fewer bytes per pass per byte of budget than keeping a dense one.
On the CPU, an encoded Unit whose decode speed the profile measured may also be *held as
stored*: resident in its encoding (its stored bytes in memory), decoded into a staging slot at
each use. It saves the read but not the decode, for a fraction of the memory (a Q4 Unit holds
about 1/7 of its float32 size), so at the same budget several times more of a quantized model
stays in memory. The fill weighs the three forms of such a Unit as two steps, each by the
seconds per pass it saves per byte of budget: held as stored (its read), then decoded (its
decode, for the dense bytes beyond the stored ones).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..errors import BudgetError
from ..sizes import format_bytes
from ..units import Unit, align
from .plan import DEVICE, DISK, HOST, ExpertPlan, KVPlan, Plan
from .profile import HardwareProfile

BLOCK = 4096
IN_FLIGHT_BYTES = 64 << 20   # default prefetch keeps about this much in flight
MAX_AUTO_DEPTH = 3
MAX_AUTO_DEPTH_ENCODED = 5
# Small Units: at least AHEAD_BYTES ahead, up to MAX_AUTO_DEPTH_SMALL Units.
AHEAD_BYTES = 6 << 20
MAX_AUTO_DEPTH_SMALL = 11
SMALL_FRACTION = 100    # Units under 1% of the largest stay resident: a read each costs more


@dataclass(frozen=True)
class HeadCheck:
    """The LM head's Units, and the input row counts at which its chunks, multiplied one at a
    time, round otherwise than the whole matrix on this machine (``kernels.head``)."""

    keys: frozenset[str] = frozenset()
    inexact_rows: tuple[int, ...] = ()


def make_plan(units: list[Unit], order: list[str], budget_bytes: int, reserve_bytes: int,
              max_tokens: int, profile: HardwareProfile, *, prefetch: int | None = None,
              host_budget_bytes: int = 0, pinned: frozenset[str] = frozenset(),
              kv: KVPlan = KVPlan(), experts: ExpertPlan | None = None,
              head: HeadCheck = HeadCheck(), overhead_s: float = 0.0,
              batch: int = 1) -> Plan:
    """Place ``units`` under ``budget_bytes``, minimising the predicted time per decode step.

    Args:
        units: every Unit of the store.
        order: unit keys in the order one forward pass consumes them (repeats allowed).
        budget_bytes: the compute tier's budget.
        reserve_bytes: KV cache and activations to keep free for ``max_tokens``.
        profile: measured bandwidths for the cost model.
        prefetch: Units fetched ahead of the one computing (slots = prefetch + 1), honoured
            when it fits (fewer slots only when the budget cannot hold that many). ``None``:
            enough to keep about ``IN_FLIGHT_BYTES`` in flight, 1 to ``MAX_AUTO_DEPTH`` ahead.
        host_budget_bytes: pinned host RAM (GPU machines) for streamed Units: those are read
            from disk once at start-up and cross only the host link per pass.
        pinned: keys that must be resident whatever they cost (an MoE router, read ahead of
            its layer to predict the experts).
        kv / experts: the KV and expert parts the Plan carries (the reserve holds the KV).
        head: the head's Units; the Plan records ``head.inexact_rows`` if any of them streams.
        overhead_s: compute seconds per decode step beyond the weight bytes
            (``HardwareProfile.step_overhead``: the framework's work per layer).
        batch: sequences per decode step the prediction is for (compute grows with it; the
            bytes read do not).

    Raises:
        BudgetError: no placement fits; the message states the minimum budget.
    """
    size = {u.key: align(u.nbytes, BLOCK) for u in units}
    reads = Counter(order)
    best, minimum = _search(units, reads, budget_bytes, reserve_bytes, profile, prefetch, pinned,
                            overhead_s, batch)
    if best is None:
        raise BudgetError(
            f"budget {format_bytes(budget_bytes)} is below the minimum working set of this model "
            f"({format_bytes(minimum)}: the largest streamed Unit, the always-resident Units and "
            f"{format_bytes(reserve_bytes)} of KV cache and activations for {max_tokens} tokens"
            f"{kv.kernel_words()}); "
            f"raise the budget to at least {format_bytes(minimum)} or lower max_tokens",
            budget_bytes=budget_bytes, minimum_bytes=minimum)
    _, _, n_slots, _, _, resident, held = best
    resident = set(resident)
    slot_bytes = max((size[k] for k in reads if k not in resident), default=0)
    return _plan(units, order, resident, n_slots if slot_bytes else 0, slot_bytes, budget_bytes,
                 reserve_bytes, max_tokens, minimum, profile, host_budget_bytes,
                 kv=kv, experts=experts, head=head, held=set(held), overhead_s=overhead_s,
                 batch=batch)


def held_candidates(units, profile: HardwareProfile) -> frozenset[str]:
    """Encoded Units that may be held as stored: on the CPU (decoded by the decode thread from
    memory), every encoded tensor of a GGUF type whose decode speed the profile measured (a
    decode it cannot price would look free; bitmaps, priced by density, are not held)."""
    if not profile.device.startswith("cpu"):
        return frozenset()
    return frozenset(u.key for u in units if u.encoded and all(
        t.encoding == "dense" or t.encoding != "bitmap"
        and profile.decode_bps.get(t.encoding, 0) > 0 for t in u.tensors))


@dataclass(frozen=True)
class _Hold:
    """What the fill needs to weigh holding Units as stored."""

    keys: frozenset[str]
    decode: dict
    disk_bps: float


def _search(units, reads: Counter, budget_bytes: int, reserve_bytes: int,
            profile: HardwareProfile, prefetch: int | None, pinned: frozenset[str],
            overhead_s: float = 0.0, batch: int = 1):
    """Each distinct Unit size as the slot size, with the deepest prefetch that fits: the best
    placement found (a key ``(predicted s, streamed, slots, resident bytes, slot bytes,
    resident keys, held keys)``, or None) and the smallest budget any placement needs."""
    size = {u.key: align(u.nbytes, BLOCK) for u in units}
    stored = {u.key: align(u.stored_bytes, BLOCK) for u in units}
    encoded = {u.key for u in units if u.encoded}
    decode = {u.key: profile.decode_seconds(u) for u in units}
    holdable = held_candidates(units, profile)
    compute_s = profile.units_compute_seconds(units, batch)
    small = max(size.values()) // SMALL_FRACTION   # independent of the budget: so is the minimum
    best, minimum = None, None
    for slot_bytes in sorted({size[k] for k in reads} | {0}):
        forced = {k for k in reads if size[k] > slot_bytes or size[k] <= small or k in pinned}
        streamable = [k for k in reads if k not in forced]
        landing = max((stored[k] for k in streamable if k in encoded), default=0)
        floor = sum(size[k] for k in forced) + reserve_bytes + (
            slot_bytes + landing if streamable else 0)
        minimum = floor if minimum is None else min(minimum, floor)
        ahead = int(prefetch) if prefetch is not None else _auto_depth(slot_bytes, landing)
        deepest = max(0, min(ahead + 1, len(streamable)))
        for slots in range(deepest, 0 if streamable else -1, -1):
            option = _fill(forced, streamable, size, stored, reads, slots,
                           slot_bytes + landing, budget_bytes - reserve_bytes,
                           saved=_seconds_saved(stored, decode, profile),
                           hold=_Hold(holdable, decode, profile.disk_read_bps))
            if option is None:
                continue
            n_read = sum(reads[k] for k in reads if k not in option[4] and k not in option[5])
            cost = _cost(compute_s, option[0], option[1], profile,
                         decode_s=sum(reads[k] * decode[k] for k in reads
                                      if k not in option[4]), overhead_s=overhead_s,
                         units_read=n_read)
            key = (cost["predicted"], *option)
            if best is None or key < best:
                best = key
            break   # the deepest that fits: shallower only when the budget forces it
    return best, minimum


def _auto_depth(slot_bytes: int, landing_bytes: int = 0) -> int:
    """Units to fetch ahead by default. Measured on this project's CPU machine (TinyLlama, 23 MB
    Units): 1 ahead read 1.83 GB/s, 3-4 ahead 2.1 GB/s, 6 ahead 1.5 GB/s (too many concurrent
    reads). Large Units keep the disk busy with one read ahead.

    Small Units go deeper, to ``AHEAD_BYTES`` ahead (at most ``MAX_AUTO_DEPTH_SMALL``; the
    reads in flight stay at most the transport's four): a small Unit computes in well under a
    millisecond, and three ahead left a read too little time to land. SmolLM2 fast at 20% and
    batch 8 (46 linears of 0.55 MB streamed a step, 2 cores): 3 ahead 31.1-33.2 ms a step,
    the consumer waiting 3.4-6.7 ms of it; 11 ahead 28.2-30.5 ms, waiting about 1 ms.

    Encoded Units keep the same bytes in flight as stored, and a decode after each read holds
    its slot longer: up to ``MAX_AUTO_DEPTH_ENCODED`` ahead (measured, TinyLlama pruned to 50%,
    13 MB stored per Unit: 3 ahead 1.89 tok/s, 4 1.92, 5 2.16, 7 2.06)."""
    if slot_bytes <= 0:
        return 1
    if landing_bytes:
        return max(1, min(MAX_AUTO_DEPTH_ENCODED, -(-IN_FLIGHT_BYTES // landing_bytes)))
    small = min(MAX_AUTO_DEPTH_SMALL, -(-AHEAD_BYTES // slot_bytes))
    return max(1, min(MAX_AUTO_DEPTH, -(-IN_FLIGHT_BYTES // slot_bytes)), small)


def _cost(compute_s: float, streamed: int, slots: int, profile: HardwareProfile,
          from_disk: int | None = None, decode_s: float = 0.0, overhead_s: float = 0.0,
          units_read: int = 0) -> dict:
    """Seconds per decode step: compute (``compute_s`` multiplying the weights:
    ``HardwareProfile.units_compute_seconds``; the framework's work per layer; on a CPU the
    CPU seconds of the ``units_read`` Units read from disk a step, ``read_cpu_seconds``),
    disk (at the rate of reads of their mean size, ``disk_seconds``), host link and the
    decode thread (decoding the streamed and held encoded Units)
    overlap only with 2+ slots. On a CPU the decode thread runs on the cores compute uses
    (torch's threads take them all): their seconds add, and the reads overlap them only in
    part (``overlap``; measured on SmolLM2 at 20%, 2 cores: the decode thread ran at half its
    speed alone while the model computed)."""
    disk_s, reads_cpu = profile.stream_seconds(streamed if from_disk is None else from_disk,
                                               units_read)
    c = {"compute": compute_s + overhead_s + reads_cpu,
         "disk": disk_s,
         "host link": streamed / profile.h2d_bps if profile.h2d_bps else 0.0,
         "decode": decode_s}
    if slots <= 1:
        c["predicted"] = sum(c.values())
    elif _decode_shares_cores(profile):
        c["predicted"] = overlap(c["compute"] + c["decode"], c["disk"])
    else:
        c["predicted"] = max(c.values())
    return c


OVERLAP_NORM = 4


def overlap(cpu_s: float, disk_s: float) -> float:
    """Seconds a CPU step takes whose compute (and decode) overlaps its reads: more than the
    larger of them, as the two share the cores (a read's system time, the page pinning of an
    O_DIRECT read) and the memory bus. Modelled as their 4-norm: equal halves take 1.19x
    either. Fitted on ``benches/bench_plan.py`` (2-core AMD EPYC VM, 12-06): a Llama-3-70B
    slice at batch 8 (compute = disk = 2.9 s) took 4.0 s where max() said 2.9, the TinyLlama
    rows 0.87-0.88 s where it said 0.82; batch-1 rows where one side dominates are unchanged."""
    return (cpu_s ** OVERLAP_NORM + disk_s ** OVERLAP_NORM) ** (1 / OVERLAP_NORM)


def _decode_shares_cores(profile: HardwareProfile) -> bool:
    return profile.device.startswith("cpu")


def _bottleneck(cost: dict, profile: HardwareProfile) -> str:
    """The resource that sets the prediction: on a CPU, compute and decode together (the larger
    of the two named) against the disk."""
    if _decode_shares_cores(profile) and cost["compute"] + cost["decode"] >= max(
            cost["disk"], cost["host link"]):
        return "compute" if cost["compute"] >= cost["decode"] else "decode"
    return max(cost, key=cost.get)


def _seconds_saved(stored: dict, decode: dict, profile: HardwareProfile):
    """Seconds a pass saves by keeping Unit ``k`` resident: its read (on a CPU with the
    read's CPU seconds), and its decode (a resident encoded Unit is held decoded); computed
    once for every Unit, as the search asks for each at every slot size and depth."""
    saved = {k: sum(profile.stream_seconds(n, 1)) + decode[k] for k, n in stored.items()}
    return saved.__getitem__


def _fill(forced, streamable, size, stored, reads, slots, slot_bytes, room, saved=None,
          hold: _Hold | None = None):
    """Greedy: after forced Units and slots (each ``slot_bytes`` with its landing buffer),
    keep the Units that save the most time per pass per byte of budget (``saved(k)``: seconds
    per read; default the bytes read). A Unit in ``hold.keys`` is weighed in two steps: held
    as stored (saves its read, costs its stored bytes), then decoded (saves its decode, costs
    the rest of its dense bytes), unless decoding saves more per byte than the read (then it
    is one step, as a Unit that cannot be held)."""
    saved = saved or stored.__getitem__
    used = sum(size[k] for k in forced) + slots * slot_bytes
    if used > room:
        return None
    resident, held = set(forced), set()
    # Among Units that save as much, spread the resident ones evenly over the pass (bit-reversed
    # positions: 0, n/2, n/4, 3n/4, ...): a long run of resident compute would leave the disk
    # idle once the slots are full, while scattered ones let each wait overlap a fetch.
    spread = _bit_reversed_ranks(len(streamable))
    steps = []   # (rank key, key, form, bytes): form "dense", "held" or "decoded" (held -> dense)
    for i, k in enumerate(streamable):
        tie = (-reads[k] * size[k], spread[i])
        if hold is not None and k in hold.keys and stored[k] < size[k]:
            read_s = reads[k] * stored[k] / max(hold.disk_bps, 1.0)
            decode_s = reads[k] * hold.decode[k]
            if decode_s / (size[k] - stored[k]) < read_s / stored[k]:
                steps.append(((-read_s / stored[k], *tie), k, "held", stored[k]))
                steps.append(((-decode_s / (size[k] - stored[k]), *tie), k, "decoded",
                              size[k] - stored[k]))
                continue
        steps.append(((-reads[k] * saved(k) / size[k], *tie), k, "dense", size[k]))
    for _, k, form, nbytes in sorted(steps, key=lambda s: s[0]):
        if used + nbytes > room or (form == "decoded" and k not in held):
            continue
        used += nbytes
        if form == "held":
            held.add(k)
        else:
            held.discard(k)
            resident.add(k)
    if slots == 0 and any(k not in resident for k in reads):
        return None
    streamed = sum(reads[k] * stored[k] for k in reads if k not in resident and k not in held)
    resident_bytes = sum(size[k] for k in resident) + sum(stored[k] for k in held)
    return (streamed, slots if streamed or held else 0, resident_bytes, slot_bytes,
            tuple(sorted(resident)), tuple(sorted(held)))


def _bit_reversed_ranks(n: int) -> list[int]:
    """Rank of each position 0..n-1 in bit-reversed order (a low-discrepancy sequence)."""
    bits = max(1, (n - 1).bit_length())
    keys = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]
    order = sorted(range(n), key=keys.__getitem__)
    ranks = [0] * n
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def _plan(units, order, resident, slots, slot_bytes, budget, reserve, max_tokens, minimum,
          profile: HardwareProfile, host_budget: int = 0, *, kv: KVPlan, experts, head,
          held: set[str] = frozenset(), overhead_s: float = 0.0, batch: int = 1) -> Plan:
    size = {u.key: align(u.nbytes, BLOCK) for u in units}
    stored = {u.key: align(u.stored_bytes, BLOCK) for u in units}
    encoded = {u.key for u in units if u.encoded}
    stream = tuple(k for k in order if k not in resident)   # held Units too: decoded into slots
    slots = min(slots, len(stream))
    streamed = sum(stored[k] for k in stream if k not in held)
    weight_bytes = sum(u.nbytes for u in units)
    reads = Counter(k for k in stream if k not in held)
    host, used = set(), 0
    for k in sorted(reads, key=lambda k: (-reads[k] * stored[k], stream.index(k))):
        if used + stored[k] <= host_budget:   # the host tier keeps Units as stored
            host.add(k)
            used += stored[k]
    from_disk = sum(stored[k] for k in stream if k not in host and k not in held)
    landing = max((stored[k] for k in stream if k in encoded and k not in held),
                  default=0) if slots else 0
    decode = {u.key: profile.decode_seconds(u) for u in units}
    cost = _cost(profile.units_compute_seconds(units, batch), streamed, slots, profile,
                 from_disk, decode_s=sum(decode[k] for k in stream), overhead_s=overhead_s,
                 units_read=sum(1 for k in stream if k not in host and k not in held))
    predicted = cost.pop("predicted")
    bottleneck = _bottleneck(cost, profile)
    compute_s, io_s, link_s = cost["compute"], cost["disk"], cost["host link"]
    return Plan(
        budget_bytes=budget, device=profile.device,
        homes=tuple((u.key, DEVICE if u.key in resident or u.key in held else
                     HOST if u.key in host else DISK,
                     stored[u.key] if u.key in held else size[u.key]) for u in units),
        order=tuple(order), stream=stream, slots=slots, slot_bytes=slot_bytes,
        landing_bytes=landing, stored_bytes=sum(u.stored_bytes for u in units),
        encoded_units=tuple((u.key, u.nbytes, u.stored_bytes, decode[u.key])
                            for u in units if u.encoded),
        resident_bytes=sum(size[k] for k in resident) + sum(stored[k] for k in held),
        held=tuple(sorted(held)),
        reserve_bytes=reserve,
        max_tokens=max_tokens, weight_bytes=weight_bytes, streamed_bytes=streamed,
        minimum_bytes=minimum, compute_s=compute_s, io_s=io_s, link_s=link_s,
        decode_s=cost["decode"], overhead_s=overhead_s, batch=batch,
        predicted_s=predicted, bottleneck=bottleneck, experts=experts, kv=kv,
        head_inexact_rows=head.inexact_rows if any(k in stream for k in head.keys) else ())
