"""Placement for Mixture-of-Experts models: the layer Units as for a dense model, plus a device
expert cache sized from what the budget leaves, and the hottest experts resident.

Value per byte decides the order. A byte of a non-expert Unit (attention, norms, head) is read
every pass, so keeping it resident saves a byte per token; an expert is needed by a token with
probability about top_k / experts, so a cached or resident expert byte saves a fraction of
that. Hence: first the cache's working slots (the top_k experts the running layer needs),
then the non-expert Units as the dense planner places them, then
further expert slots. Of those, experts known to be hot (measured routing frequency above the
uniform top_k / experts) become resident, hottest first, as far as that makes a step read less
than leaving their room to the cache, by at least ``RESIDENT_GAIN`` (a cache already keeps an
expert every token uses, and hits reuse the prediction may not see; on the Mixtral bench
model's heat, every hot expert resident left the cache 2 slots of 11 and decoded 8.2 tok/s where
the cache alone made 12.0); the rest enlarge the cache, split evenly into a protected share per
MoE layer (its recently used experts survive the other layers' traffic).

The reads a decode step is predicted to make: each MoE layer's protected share of the cache
over its experts not resident, least recently used out. Where an earlier run at the plan's
batch kept the experts each of its decode steps used (``store.heat``'s trace), the share is
replayed over them (``trace_misses``: reuse between steps included; on the Mixtral-shaped
bench model at batch 1, 138 MB a step predicted and read). Otherwise each expert is used in a
step with its own chance (``lru_misses``, Che's approximation): the share of tokens an earlier
run measured routing to it (measured at a batch at least the plan's) where there is one, else
top_k / experts. An even router gives the cache's share of the experts as its hit rate; a
skewed one hits more with the same slots; a router that reuses the last tokens' experts hits
more still, which only a trace shows (a cold run of the bench model read 160 MB a step where
an even router would read 242 MB).

Experts stored encoded (a GGUF's blocks) are cached as stored, each slot the stored size, and
decoded at each use into one dense scratch expert (charged to compute at the measured decode
speed). A resident decoded expert would take the room of several cached ones, so they become
resident only when every expert fits decoded.
"""
from __future__ import annotations

import dataclasses

from ..errors import BudgetError
from ..sizes import format_bytes
from ..units import Unit, align
from .placement import BLOCK, HeadCheck, make_plan, overlap
from .plan import DEVICE, DISK, ExpertPlan, KVPlan, Plan
from .profile import HardwareProfile


RESIDENT_GAIN = 0.1   # the share of a step's reads resident hot experts must save


def make_moe_plan(units: list[Unit], order: list[str], budget_bytes: int, reserve_bytes: int,
                  max_tokens: int, profile: HardwareProfile, *, top_k: int, moe_layers: int,
                  experts_per_layer: int, pinned: frozenset[str] = frozenset(),
                  prefetch: int | None = None, host_budget_bytes: int = 0,
                  policy: str = "lru", predict_depth: int = 1, predict_width: int | None = None,
                  heat: dict[str, float] | None = None, kv: KVPlan = KVPlan(),
                  head: HeadCheck = HeadCheck(), overhead_s: float = 0.0,
                  batch: int = 1) -> Plan:
    """Place an MoE model whose experts are fetched as routed (``experts="cache"``).

    Args:
        units: every Unit of the store (experts have kind ``expert``).
        order: the non-expert Units in the order a pass consumes them.
        top_k: experts per token.
        moe_layers / experts_per_layer: the model's MoE layers and experts in each.
        predict_depth / predict_width: the predictor's reach (0 depth: off).
        heat: expert key -> measured share of tokens that used it (a previous run's).
        kv / head / overhead_s / batch: as for ``make_plan`` (a batch of B sequences routes
            to ``experts * (1 - (1 - top_k / experts) ** B)`` distinct experts per layer, if
            the router spreads them evenly).

    Raises:
        BudgetError: the budget cannot hold one layer's non-expert working set plus top_k
            experts; the message states the minimum.
    """
    experts = [u for u in units if u.kind == "expert"]
    others = [u for u in units if u.kind != "expert"]
    dense_bytes = max(align(u.nbytes, BLOCK) for u in experts)
    # A slot holds an expert as stored: GGUF experts stay in their block encoding in the
    # cache (a Q4 expert takes ~1/7 of its float32 bytes) and are decoded into one dense
    # scratch expert at each use.
    expert_bytes = max(align(u.stored_bytes, BLOCK) for u in experts)
    scratch = dense_bytes if any(u.encoded for u in experts) else 0
    # The running layer's top_k experts need slots of their own; guesses get no reserved
    # slots: they take unprotected room, or replace their own layer's least valuable expert.
    # (Measured on the Mixtral-shaped bench model: two slots set aside for guesses cost more
    # cache hits than the guesses won.)
    working = top_k * expert_bytes + scratch
    minimum = _minimum(others, order, reserve_bytes, max_tokens, profile, pinned) + working
    try:
        base = make_plan(others, order, budget_bytes - working, reserve_bytes, max_tokens,
                         profile, prefetch=prefetch, host_budget_bytes=host_budget_bytes,
                         pinned=pinned, kv=kv, head=head, overhead_s=overhead_s, batch=batch)
    except BudgetError as e:
        raise BudgetError(
            f"budget {format_bytes(budget_bytes)} is below the minimum working set of this MoE "
            f"model ({format_bytes(minimum)}: one layer's largest streamed Unit, the "
            f"always-resident Units, {top_k} experts of {format_bytes(expert_bytes)} (top-k)"
            f"{_scratch_words(scratch)} and "
            f"{format_bytes(reserve_bytes)} of KV cache and activations for {max_tokens} "
            f"tokens{kv.kernel_words()}); raise the budget to at least "
            f"{format_bytes(minimum)} or lower max_tokens",
            budget_bytes=budget_bytes, minimum_bytes=minimum) from e
    left = budget_bytes - working - base.total_bytes
    known, trace = _known(heat, batch), _trace(heat, batch)
    rates = step_rates(experts, known, top_k / experts_per_layer, batch)
    if left + working >= sum(align(u.nbytes, BLOCK) for u in experts):
        # every expert fits decoded: no cache, no decode
        resident, cached, scratch = [u.key for u in experts], 0, 0
    elif scratch:
        # Encoded experts: a resident decoded expert would take the room of several cached
        # as stored, so the whole room goes to the cache (the hottest stay in its protected
        # slots); at most every expert, each read once.
        resident = []
        cached = top_k + max(0, min(left // expert_bytes, len(experts) - top_k))
    else:
        extra = max(0, min(left // expert_bytes, len(experts) - top_k))
        hot = _hot_experts(experts, heat, extra, top_k / experts_per_layer)
        # as many of the hot ones resident as make a step read least (a resident expert is
        # never read again, but takes a slot from the cache that hits every expert), if that
        # is clearly less: the cache also hits what the model of its reads cannot see, a
        # router that reuses the last tokens' experts (on the Mixtral bench model's heat the
        # model put 8 resident and 2 slots 2% under 10 slots; 10 slots read 30% less)
        reads = {n: _step_reads(experts, set(hot[:n]), top_k + extra - n, rates, top_k,
                                moe_layers, trace)
                 for n in sorted({0, len(hot), *(len(hot) * i // 8 for i in range(1, 8))})}
        best = min(reads, key=lambda n: (reads[n], -n))
        resident = hot[:best] if reads[best] < (1 - RESIDENT_GAIN) * reads[0] else []
        cached = top_k + extra - len(resident)
    return _finish(base, budget_bytes, units, experts, set(resident), cached, expert_bytes,
                   scratch,
                   protected=max(0, cached - top_k), policy=policy, depth=predict_depth,
                   width=(predict_width or top_k) if predict_depth > 0 else 0, top_k=top_k,
                   moe_layers=moe_layers, minimum=minimum, profile=profile, batch=batch,
                   rates=rates, trace=trace, from_heat=bool(known))


def _scratch_words(scratch: int) -> str:
    return f", a {format_bytes(scratch)} expert to decode into" if scratch else ""


def _minimum(others, order, reserve, max_tokens, profile, pinned) -> int:
    try:
        make_plan(others, order, 0, reserve, max_tokens, profile, pinned=pinned)
    except BudgetError as e:
        return e.minimum_bytes
    return reserve


def _hot_experts(experts: list[Unit], heat: dict[str, float] | None, room: int,
                 uniform: float) -> list[str]:
    """Experts measured hotter than a uniform router would make them, hottest first."""
    if not heat or room <= 0:
        return []
    hot = sorted((u for u in experts if heat.get(u.key, 0.0) > uniform),
                 key=lambda u: (-heat[u.key], u.key))
    return [u.key for u in hot[:room]]


def step_rates(experts: list[Unit], heat: dict[str, float] | None, uniform: float,
               batch: int) -> dict[str, float]:
    """Each expert's chance of being used in a decode step of ``batch`` sequences: from its
    measured share of a token's routings where ``heat`` is (``store.heat``: per token; scaled
    so a layer's shares add up to top_k, as each token's routing does), else ``uniform``
    (top_k / experts, a router that spreads tokens evenly)."""
    token = {u.key: uniform for u in experts}
    if heat:
        layers: dict[int, list[Unit]] = {}
        for u in experts:
            layers.setdefault(u.index, []).append(u)
        for us in layers.values():
            total = sum(heat.get(u.key, 0.0) for u in us)
            if total > 0:   # a layer the heat saw: top_k = uniform x its experts
                for u in us:
                    token[u.key] = min(1.0, heat.get(u.key, 0.0) * uniform * len(us) / total)
    return {u.key: 1 - (1 - token[u.key]) ** batch for u in experts}


def lru_misses(rates: list[float], slots: float) -> float:
    """Expected reads per step of a cache of ``slots`` experts (least recently used out)
    over experts each used in a step with chance ``rates[i]``, independently: Che's
    approximation. An expert stays for a characteristic number of steps ``t`` after its last
    use, the one at which the experts expected in the cache fill it (``sum(1 - (1 - r)^t) =
    slots``), and is read again when a step uses it after ``t`` unused steps. For equal
    rates ``r`` over ``n`` experts this is ``r * (n - slots)``: the uniform hit rate slots / n."""
    live = [r for r in rates if r > 0]
    if slots >= len(live):
        return 0.0   # room for every expert used: each is read once, then stays
    if slots <= 0:
        return sum(live)
    if any(r >= 1 for r in live):   # used every step: never evicted, takes a slot for good
        always = sum(r >= 1 for r in live)
        return lru_misses([r for r in live if r < 1], slots - always) if slots > always \
            else sum(r for r in live if r < 1)

    def held(t: float) -> float:
        return sum(1 - (1 - r) ** t for r in live)

    lo, hi = 0.0, 1.0
    while held(hi) < slots:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if held(mid) < slots else (lo, mid)
    return sum(r * (1 - r) ** hi for r in live)


def _known(heat, batch: int):
    """The heat that predicts a plan for ``batch``: a batch's heat covers its sequences'
    spread of experts; one sequence's (or a few's) says little about more sequences than it
    measured (on the Mixtral bench model, one sequence's heat predicted a quarter of what a
    batch of 8 read): the hits of a plan for a larger batch than the heat's are predicted as
    for an even router."""
    return heat if heat and getattr(heat, "batch", 1.0) >= batch else None


def _trace(heat, batch: int) -> dict[int, list[list[int]]] | None:
    """The experts each layer's decode steps used in the run that measured ``heat``, where
    its steps were of ``batch`` sequences (a batch of 8 reuses experts otherwise than one)."""
    trace = getattr(heat, "trace", None) if heat else None
    return trace if trace and round(getattr(heat, "batch", 1.0)) == batch else None


def trace_misses(steps: list[list[int]], slots: float, resident: frozenset[int] = frozenset()
                 ) -> float:
    """Reads per step of an LRU share of ``slots`` experts over a layer's recorded decode
    steps (each the experts it used; ``resident`` ones never read): the trace replayed twice
    and the second pass counted (the first fills the cache, as a long run's early steps do);
    a fractional share between its two neighbours."""
    def replay(cap: int) -> float:
        cache: list[int] = []   # most recent last
        reads = 0
        for rnd in range(2):
            for step in steps:
                used = [e for e in step if e not in resident]
                if rnd:
                    reads += sum(e not in cache for e in used)
                cache = ([e for e in cache if e not in used] + used)[-cap:] if cap else []
        return reads / len(steps)

    low = int(slots)
    part = slots - low
    return replay(low) if not part else (1 - part) * replay(low) + part * replay(low + 1)


def _step_reads(experts: list[Unit], resident: set[str], cached: int, rates: dict[str, float],
                top_k: int, moe_layers: int,
                trace: dict[int, list[list[int]]] | None = None) -> float:
    """Experts a decode step reads: each MoE layer's protected share of the cache (``cached``
    less the slots the running layer takes: top_k, or the experts a layer uses in a step
    where a batch uses more) over its experts not resident, replayed over the layer's
    recorded steps where there is a ``trace`` (``trace_misses``: reuse included), else from
    each expert's chance of use (``lru_misses``), and the running layer's experts beyond the
    slots it holds."""
    layers: dict[int, list[float]] = {}
    kept: dict[int, set[int]] = {}
    for u in experts:
        layers.setdefault(u.index, []).append(0.0 if u.key in resident else rates[u.key])
        if u.key in resident:
            kept.setdefault(u.index, set()).add(u.expert)
    trace = {i: trace[i] for i in layers if trace and trace.get(i)}
    # distinct experts not resident a layer uses a step: as recorded, or from the chances
    per_layer = [sum(len([e for e in step if e not in kept.get(i, ())]) for step in trace[i])
                 / len(trace[i]) if i in trace else sum(r) for i, r in layers.items()]
    used = sum(per_layer) / max(len(layers), 1)
    # A running layer's misses evict other layers' protected experts once the shared slots
    # are taken (``prefetch.experts``): at batch 8 on the Mixtral bench model a layer used 7.2
    # of its 8 experts, and with 10 slots a step read every expert it used (982 MB) where
    # top_k working slots alone said 872 MB.
    share = max(0.0, cached - max(top_k, used)) / max(moe_layers, 1)
    if len(resident) + cached >= len(experts):
        misses = 0.0   # a slot for every expert: each is read once, then stays
    else:
        misses = sum(trace_misses(trace[i], share, frozenset(kept.get(i, ())))
                     if i in trace else lru_misses(r, share) for i, r in layers.items())
    # The running layer may take any slot (evicting other layers' protected experts); an
    # expert it uses beyond them all is evicted between its up and its down pass and read
    # again (at batch 8 on the Mixtral bench model with 2 slots: 7.2 experts a layer, 11
    # reads). Counting only its own protected share and the shared slots over-predicted a
    # batch of 8 with 10 slots by half (1.45 GB a step for 982 MB read).
    again = max(0.0, used - cached) if cached else 0.0
    return misses + moe_layers * again


def _finish(base: Plan, budget_bytes: int, units, experts, resident: set[str], cached: int,
            expert_bytes: int, scratch: int, *, protected: int, policy: str, depth: int,
            width: int, top_k: int, moe_layers: int, minimum: int, profile: HardwareProfile,
            batch: int = 1, rates: dict[str, float], trace: dict[int, list[list[int]]] | None,
            from_heat: bool) -> Plan:
    """The plan with ``resident`` experts and ``cached`` slots, its reads and times predicted
    from each expert's chance of use in a step (``rates``) or the ``trace`` (``_step_reads``)."""
    size = {u.key: align(u.nbytes, BLOCK) for u in units}
    home = {k: (t, n) for k, t, n in base.homes}   # a held Unit takes its stored bytes
    homes = tuple((u.key, *home.get(u.key, (DEVICE if u.key in resident else DISK,
                                            size[u.key]))) for u in units)
    # distinct experts a layer uses a step
    used = sum(rates.values()) / max(len({u.index for u in experts}), 1)
    misses = _step_reads(experts, resident, cached, rates, top_k, moe_layers, trace)
    per_step = int(misses * expert_bytes)
    weight_bytes = sum(u.nbytes for u in units)
    dense_expert = max(u.nbytes for u in experts)
    # Each routed expert that is not resident decoded is decoded at its use (on the compute
    # thread: it adds to compute).
    decode = (moe_layers * used * (1 - len(resident) / len(experts))
              * max(profile.decode_seconds(u) for u in experts)) if scratch else 0.0
    # Each used expert multiplies its share of the batch's tokens (top_k of them each).
    expert_keys = {u.key for u in experts}
    compute = (profile.units_compute_seconds([u for u in units if u.key not in expert_keys],
                                             batch)
               + profile.compute_seconds(moe_layers * used * dense_expert,
                                         max(1, round(batch * top_k / used)))
               + base.overhead_s + decode)
    # the layers' stream and the misses, each read at the rate of its Units' size; on a CPU
    # their reads' CPU seconds come out of compute
    held = set(base.held)
    stream_s, stream_cpu = profile.stream_seconds(
        base.streamed_bytes, sum(1 for k in base.stream if k not in held))
    compute += stream_cpu + profile.stream_seconds(misses * expert_bytes, misses)[1]
    miss_s = profile.miss_seconds(per_step, expert_bytes, misses / max(moe_layers, 1))
    disk = stream_s + miss_s
    link = (base.streamed_bytes + per_step) / profile.h2d_bps if profile.h2d_bps else 0.0
    # A layer waits for the experts it misses (guesses hide some of that, but cost reads of
    # their own: not counted on either side).
    predicted = (overlap(compute, stream_s) if profile.device.startswith("cpu") else
                 max(compute, stream_s)) + miss_s
    costs = {"compute": compute, "disk": disk, "host link": link}
    return dataclasses.replace(
        base, budget_bytes=budget_bytes, homes=homes, weight_bytes=weight_bytes,
        stored_bytes=sum(u.stored_bytes for u in units),
        encoded_units=base.encoded_units + tuple(
            (u.key, u.nbytes, u.stored_bytes, profile.decode_seconds(u))
            for u in experts if u.encoded),
        resident_bytes=base.resident_bytes + sum(size[k] for k in resident),
        minimum_bytes=minimum, compute_s=compute, io_s=disk, link_s=link,
        predicted_s=predicted, bottleneck=max(costs, key=costs.get),
        experts=ExpertPlan("cache", slots=cached, slot_bytes=expert_bytes if cached else 0,
                           protected=protected, policy=policy, predict_depth=depth,
                           predict_width=width, bytes_per_step=per_step,
                           from_heat=from_heat, from_trace=bool(trace),
                           scratch_bytes=scratch if cached else 0, decode_s=decode))
