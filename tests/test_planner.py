"""The planner: deterministic, under budget, explains itself."""
from __future__ import annotations

import pytest

from offload.errors import BudgetError
from offload.planner.placement import make_plan
from offload.planner.profile import HardwareProfile
from offload.units import Unit

PROFILE = HardwareProfile("cpu", disk_read_bps=1.4e9, h2d_bps=0.0, compute_bps=10e9,
                          dtype="bfloat16")


def units(n_layers=10, layer=88 << 20, head_chunks=2, chunk=64 << 20):
    out = [Unit(f"embed.{i}", "static", "embed", i, 0, chunk, 0, ()) for i in range(head_chunks)]
    out += [Unit(f"layer.{i}", "layer", "layer", i, 0, layer, 0, ()) for i in range(n_layers)]
    out.append(Unit("norm", "static", "norm", 0, 0, 8192, 0, ()))
    out += [Unit(f"head.{i}", "static", "head", i, 0, chunk, 0, ()) for i in range(head_chunks)]
    return out


def order(us):
    return [u.key for u in us if u.group != "embed"]


def test_same_inputs_same_plan():
    us = units()
    a = make_plan(us, order(us), 500 << 20, 8 << 20, 256, PROFILE)
    b = make_plan(list(us), order(us), 500 << 20, 8 << 20, 256, PROFILE)
    assert a == b


@pytest.mark.parametrize("budget_mb", [200, 350, 500, 900, 1200])
def test_plan_fits_and_streams_the_rest(budget_mb):
    us = units()
    p = make_plan(us, order(us), budget_mb << 20, 8 << 20, 256, PROFILE)
    assert p.total_bytes <= p.budget_bytes
    home = p.home
    assert home["norm"] == "device"                       # tiny: always resident
    assert set(p.stream) == {k for k in order(us) if home[k] == "disk"}
    assert p.streamed_bytes == sum(u.nbytes for u in us if u.key in p.stream)
    assert p.slots >= 2 or not p.stream                  # overlap whenever something streams
    assert p.bottleneck in p.table() and "predicted per decode step" in p.table()


def test_more_budget_never_streams_more():
    us = units()
    streamed = [make_plan(us, order(us), mb << 20, 8 << 20, 256, PROFILE).streamed_bytes
                for mb in (200, 300, 400, 600, 800, 1000, 1200)]
    assert streamed == sorted(streamed, reverse=True)
    assert streamed[-1] == 0


def test_explicit_prefetch_is_honoured():
    us = units()
    p = make_plan(us, order(us), 600 << 20, 8 << 20, 256, PROFILE, prefetch=3)
    assert p.slots == 4


def test_small_units_are_fetched_further_ahead():
    """The default window: three Units ahead for large ones, ``AHEAD_BYTES`` (6 MiB) ahead for
    small ones, at most eleven: 512 KiB Units get 12 slots, 1 MiB ones 7, 64 KiB ones 11
    ahead; 2 MiB and 23 MiB Units stay 3 ahead, and 88 MiB ones (64 MiB in flight) 1."""
    kb = 1 << 10
    for each, slots in ((512 * kb, 12), (1024 * kb, 7)):
        us = [Unit(f"layer.{i}", "layer", "layer", i, 0, each, 0, ()) for i in range(60)]
        p = make_plan(us, [u.key for u in us], 40 * each, 0, 16, PROFILE)
        assert p.stream and p.slots == slots, (each, p.slots)
    from offload.planner.placement import _auto_depth

    assert _auto_depth(2 << 20) == _auto_depth(23 << 20) == 3 and _auto_depth(88 << 20) == 1
    assert _auto_depth(64 * kb) == 11


def test_streamed_units_pay_their_reads_cpu_and_the_disk_rate_of_their_size():
    """``stream_reads`` measured at 512 KiB (1 GB/s, 100 us of CPU a Unit) and 16 MiB (2 GB/s,
    400 us): a Unit size's disk rate is ``disk_read_bps`` times its rate against the largest
    (log-size between the two, the nearer outside, never above 1x), its CPU seconds linear
    in its size between them, beyond the largest at the largest's cost per byte; a CPU plan
    adds its reads' CPU to compute (hand arithmetic), a GPU plan does not (the host's threads
    are not its compute); without the figures, neither."""
    kb, mb = 1 << 10, 1 << 20
    sr = {str(512 * kb): (1e9, 100e-6), str(16 * mb): (2e9, 400e-6)}
    prof = HardwareProfile("cpu", 1.5e9, 0.0, 10e9, "float32", stream_reads=sr)
    assert prof.disk_seconds(mb, 512 * kb) == pytest.approx(mb / 0.75e9)
    assert prof.disk_seconds(mb, 128 * kb) == pytest.approx(mb / 0.75e9)
    assert prof.disk_seconds(mb, 16 * mb) == pytest.approx(mb / 1.5e9)
    assert prof.disk_seconds(mb, 64 * mb) == pytest.approx(mb / 1.5e9)
    assert prof.disk_seconds(mb) == pytest.approx(mb / 1.5e9)
    # 2 MiB: 2 of the 5 doublings from 512 KiB to 16 MiB: 1.4 GB/s, 0.7 of the largest's rate
    assert prof.disk_seconds(mb, 2 * mb) == pytest.approx(mb / (1.5e9 * 0.7))
    slope = 300e-6 / (16 * mb - 512 * kb)
    assert prof.read_cpu_seconds(10, 512 * kb) == pytest.approx(1e-3)
    assert prof.read_cpu_seconds(10, 4 * mb) == pytest.approx(
        10 * (100e-6 + slope * (4 * mb - 512 * kb)))
    assert prof.read_cpu_seconds(2, 16 * mb) == pytest.approx(2 * 400e-6)
    assert prof.read_cpu_seconds(2, 64 * mb) == pytest.approx(2 * 4 * 400e-6)   # beyond: per byte
    assert prof.read_cpu_seconds(0, mb) == 0
    faster_small = HardwareProfile("cpu", 1.5e9, 0.0, 10e9, "float32", stream_reads={
        str(512 * kb): (3e9, 1e-4), str(16 * mb): (2e9, 4e-4)})
    assert faster_small.disk_seconds(mb, 512 * kb) == pytest.approx(mb / 1.5e9)
    plain = HardwareProfile("cpu", 1.5e9, 0.0, 10e9, "float32")
    assert plain.disk_seconds(mb, 512 * kb) == pytest.approx(mb / 1.5e9)
    assert plain.read_cpu_seconds(10, mb) == 0

    us = [Unit(f"layer.{i}", "layer", "layer", i, 0, 512 * kb, 0, ()) for i in range(60)]
    keys = [u.key for u in us]
    p = make_plan(us, keys, 40 * 512 * kb, 0, 16, prof)
    base = make_plan(us, keys, 40 * 512 * kb, 0, 16, plain)
    assert p.stream == base.stream and len(p.stream) > 0
    assert p.compute_s == pytest.approx(base.compute_s + len(p.stream) * 100e-6)
    assert p.io_s == pytest.approx(p.streamed_bytes / 0.75e9)
    assert base.io_s == pytest.approx(p.streamed_bytes / 1.5e9)
    gpu = [HardwareProfile("cuda", 1.5e9, 25e9, 100e9, "float16", stream_reads=s)
           for s in (sr, {})]
    q, gpu_base = (make_plan(us, keys, 40 * 512 * kb, 0, 16, g) for g in gpu)
    assert q.compute_s == pytest.approx(gpu_base.compute_s)
    assert q.io_s == pytest.approx(q.streamed_bytes / 0.75e9)


def test_minimum_is_exact():
    us = units()
    with pytest.raises(BudgetError) as e:
        make_plan(us, order(us), 10 << 20, 8 << 20, 256, PROFILE)
    minimum = e.value.minimum_bytes
    make_plan(us, order(us), minimum, 8 << 20, 256, PROFILE)
    with pytest.raises(BudgetError):
        make_plan(us, order(us), minimum - 1, 8 << 20, 256, PROFILE)


def test_host_budget_homes_streamed_units_in_pinned_ram():
    gpu = HardwareProfile("cuda:0", disk_read_bps=3e9, h2d_bps=25e9, compute_bps=1e12,
                          dtype="bfloat16")
    us = units()
    plain = make_plan(us, order(us), 400 << 20, 8 << 20, 256, gpu)
    hosted = make_plan(us, order(us), 400 << 20, 8 << 20, 256, gpu, host_budget_bytes=300 << 20)
    host_keys = [k for k, t, _ in hosted.homes if t == "host"]
    assert host_keys and sum(n for _, t, n in hosted.homes if t == "host") <= 300 << 20
    assert set(host_keys) <= set(hosted.stream)           # still streamed, over the host link
    assert hosted.io_s < plain.io_s and hosted.link_s == plain.link_s
    assert "host" in hosted.table()


def test_host_budget_on_cpu_is_refused(checkpoint, offload_dir):
    import offload

    path, _ = checkpoint
    with pytest.raises(BudgetError, match="host_budget applies when the compute device is a GPU"):
        offload.run(path, budget="50%", offload_dir=offload_dir, host_budget="1GB", device="cpu")


def moe_units(n_layers=4, experts=8, expert=16 << 20, attn=4 << 20):
    out = [Unit(f"embed.{i}", "static", "embed", i, 0, 8 << 20, 0, ()) for i in range(2)]
    for i in range(n_layers):
        out.append(Unit(f"layer.{i}.attn", "layer", "layer", i, 0, attn, 0, ()))
        out.append(Unit(f"layer.{i}.router", "layer", "layer", i, 0, 16384, 0, ()))
        out += [Unit(f"expert.{i}.{e}", "expert", "expert", i, 0, expert, 0, (), expert=e)
                for e in range(experts)]
    out.append(Unit("norm", "static", "norm", 0, 0, 8192, 0, ()))
    out += [Unit(f"head.{i}", "static", "head", i, 0, 8 << 20, 0, ()) for i in range(2)]
    return out


def moe_plan(us, budget_mb, heat=None, batch=1):
    from offload.planner.experts import make_moe_plan

    order = [u.key for u in us if u.group in ("layer", "norm", "head")]
    return make_moe_plan(us, order, budget_mb << 20, 8 << 20, 64, PROFILE, top_k=2,
                         moe_layers=4, experts_per_layer=8,
                         pinned=frozenset(k for k in order if k.endswith(".router")), heat=heat,
                         batch=batch)


def test_moe_plan_spends_the_budget_on_layers_first_then_the_expert_cache():
    us = moe_units()
    plans = [moe_plan(us, mb) for mb in (80, 120, 200, 400, 700)]
    slots = [p.experts.slots for p in plans[:-1]]
    assert slots[0] == 2 and slots == sorted(slots)             # top-k, then more with budget
    assert all(p.total_bytes <= p.budget_bytes for p in plans)
    assert plans[2].streamed_bytes == 0                          # non-expert Units resident first
    assert all(p.home[f"layer.{i}.router"] == "device" for p in plans for i in range(4))
    assert plans[-1].experts.slots == 0 and plans[-1].home["expert.3.7"] == "device"   # all fit
    with pytest.raises(BudgetError) as e:
        moe_plan(us, 20)
    assert "top-k" in str(e.value)
    minimum = e.value.minimum_bytes
    from offload.planner.experts import make_moe_plan   # the stated minimum is enough
    order = [u.key for u in us if u.group in ("layer", "norm", "head")]
    routers = frozenset(k for k in order if k.endswith(".router"))
    ok = make_moe_plan(us, order, minimum, 8 << 20, 64, PROFILE, top_k=2, moe_layers=4,
                       experts_per_layer=8, pinned=routers)
    assert ok.experts.slots == 2 and ok.minimum_bytes == minimum
    with pytest.raises(BudgetError):
        make_moe_plan(us, order, minimum - 1, 8 << 20, 64, PROFILE, top_k=2, moe_layers=4,
                      experts_per_layer=8, pinned=routers)


def test_moe_plan_keeps_hot_experts_resident_where_that_reads_clearly_less():
    """Hot experts (a measured share above top_k / experts) become resident, hottest first,
    as far as that makes a decode step read least, the reads predicted as for the plan
    (``lru_misses``), and only where that saves at least ``RESIDENT_GAIN`` of the reads with
    none resident (the cache also hits what that model cannot see): where the cache keeps
    them anyway (one expert a layer used by every token), the room stays
    cache; where every layer has one expert used by most tokens and the cache's share per
    layer cannot keep it, they go resident, each taking a slot."""
    from offload.planner.experts import RESIDENT_GAIN, _step_reads, step_rates

    us = moe_units()
    experts = [u for u in us if u.kind == "expert"]

    def resident(p):
        return {k for k, t, _ in p.homes if k.startswith("expert.") and t == "device"}

    sparse = {"expert.0.3": 0.9, "expert.2.5": 0.6, "expert.1.1": 0.1}   # uniform is 2/8
    p = moe_plan(us, 200, sparse)
    assert resident(p) == set() and p.experts.slots == moe_plan(us, 200).experts.slots
    # per token: expert 0 of each layer 5/6 of the time, the 7 others 1/6 each (2 a token)
    skew = {f"expert.{i}.{e}": 5 / 6 if e == 0 else 1 / 6 for i in range(4) for e in range(8)}
    p = moe_plan(us, 130, skew)
    assert resident(p) == {"expert.0.0", "expert.1.0", "expert.2.0"}
    room = moe_plan(us, 130).experts.slots   # the cache's slots with no expert resident
    assert p.experts.slots == room - 3
    rates = step_rates(experts, skew, 2 / 8, 1)
    chosen = _step_reads(experts, resident(p), p.experts.slots, rates, 2, 4)
    assert chosen < (1 - RESIDENT_GAIN) * _step_reads(experts, set(), room, rates, 2, 4)
    fewer = {"expert.0.0", "expert.1.0"}   # room for 3 beside the top_k working slots
    assert chosen <= _step_reads(experts, fewer, room - 2, rates, 2, 4)


def test_an_moe_plans_expert_misses_pay_their_reads_cpu_on_a_cpu():
    """The expert cache's misses are streamed Units too: with ``stream_reads`` measured, a CPU
    plan's compute and its step grow by the misses' reads' CPU (16 MiB experts: 400 us each,
    hand arithmetic), the disk's share unchanged (16 MiB reads at the large rate)."""
    from dataclasses import replace

    from offload.planner.experts import make_moe_plan

    us = moe_units()
    order = [u.key for u in us if u.group in ("layer", "norm", "head")]
    mb = 1 << 20
    measured = replace(PROFILE, stream_reads={str(512 << 10): (1e9, 100e-6),
                                              str(16 * mb): (2e9, 400e-6)})
    for budget in (80, 200):
        plain, p = (make_moe_plan(us, order, budget << 20, 8 << 20, 64, prof, top_k=2,
                                  moe_layers=4, experts_per_layer=8,
                                  pinned=frozenset(k for k in order if k.endswith(".router")))
                    for prof in (PROFILE, measured))
        misses = p.experts.bytes_per_step / (16 * mb)
        assert misses > 0 and p.experts == plain.experts and not p.stream
        assert p.compute_s == pytest.approx(plain.compute_s + misses * 400e-6)
        assert p.io_s == pytest.approx(plain.io_s)
        assert p.predicted_s == pytest.approx(plain.predicted_s + misses * 400e-6)


def test_a_layers_lone_miss_is_read_at_the_rate_of_one_read_alone():
    """``read_alone_bps`` (a large Unit read with nothing else in flight): a layer missing one
    expert a step or fewer waits for it at that rate, two or more at once at the streaming
    rate, linear between (hand arithmetic); a figure above the streaming rate counts as it;
    an MoE plan's step at batch 1 grows by the slower misses."""
    from dataclasses import replace

    from offload.planner.experts import make_moe_plan

    mb = 1 << 20
    prof = HardwareProfile("cpu", 2e9, 0.0, 10e9, "float32", read_alone_bps=1e9)
    assert prof.miss_seconds(64 * mb, 16 * mb, 0.5) == pytest.approx(64 * mb / 1e9)
    assert prof.miss_seconds(64 * mb, 16 * mb, 1.0) == pytest.approx(64 * mb / 1e9)
    assert prof.miss_seconds(64 * mb, 16 * mb, 1.25) == pytest.approx(64 * mb / 1.25e9)
    assert prof.miss_seconds(64 * mb, 16 * mb, 3.0) == pytest.approx(64 * mb / 2e9)
    assert replace(prof, read_alone_bps=3e9).miss_seconds(64 * mb, 16 * mb, 0.5) == \
        pytest.approx(64 * mb / 2e9)
    assert replace(prof, read_alone_bps=0.0).miss_seconds(64 * mb, 16 * mb, 0.5) == \
        pytest.approx(64 * mb / 2e9)

    us = moe_units()
    order = [u.key for u in us if u.group in ("layer", "norm", "head")]
    together, alone = (make_moe_plan(us, order, 200 << 20, 8 << 20, 64, p, top_k=2,
                                     moe_layers=4, experts_per_layer=8,
                                     pinned=frozenset(k for k in order if k.endswith(".router")))
                       for p in (replace(PROFILE, read_alone_bps=0.0),
                                 replace(PROFILE, read_alone_bps=0.7e9)))
    per_step = alone.experts.bytes_per_step
    per_layer = per_step / (16 * mb) / 4
    assert alone.experts == together.experts and per_layer < 2
    share = max(0.0, per_layer - 1)
    assert alone.predicted_s - together.predicted_s == pytest.approx(
        per_step / (0.7e9 + share * (1.4e9 - 0.7e9)) - per_step / 1.4e9)


def _simulated_lru_misses(rates, slots, steps=40000, seed=0):
    """Reads per step of a layer's share of ``slots`` experts, least recently used out, each
    expert used in a step with its chance in ``rates``, independently: the plain simulation
    Che's approximation stands for. A step's experts are all held while it runs (the working
    slots), then kept as the most recent."""
    import random

    rng, cache, reads = random.Random(seed), [], 0
    for _ in range(steps):
        used = [i for i, r in enumerate(rates) if rng.random() < r]
        rng.shuffle(used)
        reads += sum(e not in cache for e in used)
        cache = ([e for e in cache if e not in used] + used)[-slots:]   # most recent last
    return reads / steps


def test_expert_cache_misses_are_predicted_from_how_often_each_expert_is_used():
    """The plan's expert reads per step: for an even router, the uniform miss rate
    (hand arithmetic: 8 experts used a quarter of the steps each, 2 slots: 0.25 x 6 reads); for
    skewed use (a previous run's heat), an LRU cache's reads as simulated, within 5%; the
    MoE plan predicts fewer bytes per step with skewed heat than without, the same slots; and
    heat measured at a smaller batch than the plan's is not used for its hits."""
    from offload.planner.experts import lru_misses, step_rates
    from offload.store.heat import Heat

    assert lru_misses([0.25] * 8, 2) == pytest.approx(1.5, rel=1e-6)
    assert lru_misses([0.25] * 8, 8) == 0.0 and lru_misses([0.25] * 8, 0) == 2.0
    for rates, slots in (([0.9, 0.6, 0.3, 0.2, 0.1, 0.1, 0.05, 0.05], 3),
                         ([0.5, 0.5, 0.4, 0.2, 0.2, 0.1, 0.05, 0.05], 2),
                         ([1.0, 0.7, 0.2, 0.1], 2)):
        assert lru_misses(rates, slots) == pytest.approx(_simulated_lru_misses(rates, slots),
                                                         rel=0.05), rates
    # per-token shares -> per-step chances at a batch: 1 - (1 - p) ** batch
    us = moe_units()
    experts = [u for u in us if u.kind == "expert"]
    r = step_rates(experts, None, 0.25, 8)
    assert r["expert.0.0"] == pytest.approx(1 - 0.75 ** 8)
    skew = {f"expert.{i}.{e}": (0.7, 0.6, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02)[e]
            for i in range(4) for e in range(8)}   # two per token, as top-2 routes
    heat = Heat({k: min(v, 0.25) for k, v in skew.items()})   # none hotter than uniform
    cold, warm = moe_plan(us, 150), moe_plan(us, 150, heat)
    assert cold.experts.slots == warm.experts.slots > 2
    assert warm.experts.bytes_per_step < cold.experts.bytes_per_step
    assert warm.experts.from_heat and not cold.experts.from_heat
    # one sequence's heat says nothing of a batch of 8's spread: an even router's hits there
    b8 = [moe_plan(us, 150, h, batch=8) for h in (None, heat)]
    assert b8[0].experts.bytes_per_step == b8[1].experts.bytes_per_step
    heat.batch = 8.0
    assert moe_plan(us, 150, heat, batch=8).experts.bytes_per_step < b8[0].experts.bytes_per_step

def _quantized(key: str, index: int, nbytes: int) -> Unit:
    """A layer Unit of one Q4_0 tensor: stored at 18 bytes per 32 float32 elements."""
    from offload.units import TensorSpec

    stored = nbytes // 128 * 18
    t = TensorSpec("weight", "float32", (nbytes // 4,), 0, nbytes, "gguf.Q4_0", 0, stored)
    return Unit(key, "layer", "layer", index, 0, nbytes, 0, (t,), stored_nbytes=stored)


def test_the_decode_thread_is_costed_and_picks_what_stays_resident():
    """A quantized Unit streamed costs its decode on the decode thread (the measured speed);
    with a slow decode, keeping quantized Units resident (held decoded) saves more time per
    budget byte than keeping dense ones of the same size, so the planner keeps those."""
    layer = 32 << 20
    us = [_quantized(f"layer.{i}.q", i, layer) for i in range(6)]
    us += [Unit(f"layer.{i}.d", "layer", "layer", i, 0, layer, 0, ()) for i in range(6)]
    keys = [u.key for u in us]
    slow = HardwareProfile("cpu", disk_read_bps=1.4e9, h2d_bps=0.0, compute_bps=10e9,
                           dtype="float32", decode_bps={"gguf.Q4_0": 0.5e9})
    budget = 8 * layer
    p = make_plan(us, keys, budget, 1 << 20, 64, slow)
    quantized = {u.key: u for u in us if u.encoded}
    streamed_q = [k for k in p.stream if k in quantized]
    assert p.decode_s == pytest.approx(len(streamed_q) * layer / 0.5e9)
    resident = {k for k, t in p.home.items() if t == "device"}
    assert resident and resident <= set(quantized), resident   # decode saved beats bytes saved
    assert "decode" in p.table() and p.bottleneck == "decode"
    # Without a measured decode speed the dense Units save the most bytes read.
    unmeasured = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32")
    q = make_plan(us, keys, budget, 1 << 20, 64, unmeasured)
    assert q.decode_s == 0
    assert {k for k, t in q.home.items() if t == "device"}.isdisjoint(quantized)


def test_quantized_units_are_held_as_stored_then_decoded_as_the_budget_grows():
    """On the CPU a quantized Unit can stay resident in its encoding (stored bytes in memory,
    decoded at each use): that saves its read for 1/7 of the memory. Checked against hand
    arithmetic: a budget of the slots and every Unit as stored holds them all so (nothing
    read); each further (dense - stored) bytes decodes one more (saving its decode); a budget
    of the dense model holds every Unit decoded."""
    from offload.planner.placement import BLOCK
    from offload.units import align

    layer, n = 32 << 20, 6
    us = [_quantized(f"layer.{i}.q", i, layer) for i in range(n)]
    keys = [u.key for u in us]
    fast = HardwareProfile("cpu", disk_read_bps=1.4e9, h2d_bps=0.0, compute_bps=10e9,
                           dtype="float32", decode_bps={"gguf.Q4_0": 10e9})
    stored = align(us[0].stored_bytes, BLOCK)
    slots = 2 * (layer + stored)   # prefetch 1: two slots with their landing buffers
    reserve = 1 << 20

    p = make_plan(us, keys, slots + n * stored + reserve, reserve, 64, fast, prefetch=1)
    assert set(p.held) == set(keys) and p.streamed_bytes == 0 and p.slots == 2
    assert all(t == "device" and b == stored for _, t, b in p.homes)
    assert p.resident_bytes == n * stored
    assert p.decode_s == pytest.approx(n * layer / 10e9) and p.io_s == 0
    # On a CPU the decode thread shares the cores with compute: their seconds add.
    assert p.predicted_s == pytest.approx(p.compute_s + p.decode_s)
    assert "as stored" in p.table()

    extra = 2 * (layer - stored) + (layer - stored) // 2   # room to decode two of them
    q = make_plan(us, keys, slots + n * stored + extra + reserve, reserve, 64, fast, prefetch=1)
    decoded = [k for k, t in q.home.items() if t == "device" and k not in q.held]
    assert len(q.held) == n - 2 and len(decoded) == 2
    assert q.decode_s == pytest.approx((n - 2) * layer / 10e9)

    r = make_plan(us, keys, n * layer + reserve, reserve, 64, fast)
    assert not r.held and not r.stream and r.resident_bytes == n * layer

    # Not held: a decode it cannot price (it would look free), or a GPU (decoded on the CPU).
    for profile in (HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32"),
                    HardwareProfile("cuda:0", 1.4e9, 25e9, 1e12, "float32",
                                    decode_bps={"gguf.Q4_0": 10e9})):
        s = make_plan(us, keys, slots + n * stored + reserve, reserve, 64, profile, prefetch=1)
        assert not s.held
    # A GPU decodes beside compute (its own stream): the largest of them, not their sum.
    assert s.predicted_s == pytest.approx(max(s.compute_s, s.decode_s, s.io_s, s.link_s))
    assert s.decode_s > s.compute_s


def _q4_expert(i: int, e: int, nbytes: int) -> Unit:
    """An expert Unit of one Q4_0 tensor (18 stored bytes per 32 float32 elements)."""
    from offload.units import TensorSpec

    stored = nbytes // 128 * 18
    t = TensorSpec("gate_up", "float32", (nbytes // 4,), 0, nbytes, "gguf.Q4_0", 0, stored)
    return Unit(f"expert.{i}.{e}", "expert", "expert", i, 0, nbytes, 0, (t,), expert=e,
                stored_nbytes=stored)


def test_moe_plan_caches_quantized_experts_as_stored():
    """GGUF experts: a cache slot holds an expert as stored (1/7 of its float32 bytes for
    Q4_0), plus one dense expert to decode into at each use; the budget's room buys that many
    more slots; the decode is charged to compute at the measured speed for every routed expert
    not resident; a budget holding every expert decoded needs no cache. Hand arithmetic."""
    from offload.planner.experts import make_moe_plan
    from offload.planner.placement import BLOCK
    from offload.units import align

    dense = 16 << 20
    us = [u for u in moe_units() if u.kind != "expert"]
    us += [_q4_expert(i, e, dense) for i in range(4) for e in range(8)]
    order = [u.key for u in us if u.group in ("layer", "norm", "head")]
    routers = frozenset(k for k in order if k.endswith(".router"))
    profile = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32",
                              decode_bps={"gguf.Q4_0": 2e9})
    stored = align(dense // 128 * 18, BLOCK)

    def plan(budget):
        return make_moe_plan(us, order, budget, 8 << 20, 64, profile, top_k=2, moe_layers=4,
                             experts_per_layer=8, pinned=routers)

    with pytest.raises(BudgetError) as e:
        plan(20 << 20)
    assert "expert to decode into" in str(e.value)
    minimum = e.value.minimum_bytes
    low = plan(minimum)
    assert low.experts.slots == 2 and low.experts.slot_bytes == stored
    assert low.experts.scratch_bytes == dense
    assert low.total_bytes <= minimum
    # once the other Units are resident, each further `stored` bytes is one more slot,
    # until all 32 are cached
    layers = minimum + sum(align(u.nbytes, BLOCK) for u in us if u.kind != "expert")
    base = plan(layers)
    assert base.streamed_bytes == 0
    more = plan(layers + 5 * stored)
    assert more.experts.slots == base.experts.slots + 5
    assert more.total_bytes <= more.budget_bytes
    assert more.experts.decode_s == pytest.approx(4 * 2 * dense / 2e9)   # nothing resident
    assert more.compute_s - more.experts.decode_s < low.compute_s   # streamed layers: fewer
    assert more.experts.bytes_per_step < base.experts.bytes_per_step   # more protected hits
    full = plan(layers + 40 * stored)
    assert full.experts.slots == 32 and full.experts.bytes_per_step == 0
    # every expert decoded fits: resident, no cache, no decode buffer
    roomy = plan(layers + 32 * dense)
    assert roomy.experts.slots == 0 and roomy.experts.scratch_bytes == 0
    assert roomy.experts.decode_s == 0 and roomy.home["expert.3.7"] == "device"


def test_the_prediction_is_for_the_planned_batch():
    """Compute time at batch B: measured at 1 and 8 (a CPU without native bf16 takes 8x at
    batch 8), linear between; the per-layer time likewise; the bytes read do not change. An
    MoE batch routes to E(1 - (1 - k/E)^B) distinct experts per layer, and those beyond the
    slots the running layer holds are read twice (up pass, down pass), and the other layers'
    protected experts it evicts are not hit. Hand arithmetic."""
    from offload.planner.experts import make_moe_plan

    profile = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "bfloat16",
                              layer_s={"llama": (1e-3, 2e-3), "llama@8": (2e-3, 4e-3)},
                              batch_compute_bps={"8": 2.5e9})
    us = units()
    weights = sum(u.nbytes for u in us)
    keys = order(us)
    for batch in (1, 4, 8):
        overhead = profile.step_overhead("llama", 10, batch)
        assert overhead == pytest.approx(10 * 1e-3 + 2e-3 + (batch - 1) / 7 * (
            10 * 2e-3 + 4e-3 - 10 * 1e-3 - 2e-3))
        p = make_plan(us, keys, 500 << 20, 8 << 20, 256, profile, overhead_s=overhead,
                      batch=batch)
        one, eight = weights / 10e9, weights / 2.5e9
        assert p.compute_s == pytest.approx(one + (eight - one) * (batch - 1) / 7 + overhead)
        assert p.batch == batch and f"at batch {batch}" in p.table()
        assert p.streamed_bytes == make_plan(us, keys, 500 << 20, 8 << 20, 256,
                                             profile).streamed_bytes
    # unmeasured batch figures: a batch costs what one sequence does
    flat = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "bfloat16")
    assert flat.compute_seconds(1e9, 8) == flat.compute_seconds(1e9, 1) == 0.1
    # MoE: 8 experts, top 2, batch 4 -> 8 (1 - (3/4)^4) = 5.47 experts a layer
    ms = moe_units()
    moe_order = [u.key for u in ms if u.group in ("layer", "norm", "head")]
    plans = {b: make_moe_plan(ms, moe_order, 120 << 20, 8 << 20, 64, profile, top_k=2,
                              moe_layers=4, experts_per_layer=8, batch=b,
                              pinned=frozenset(k for k in moe_order if k.endswith(".router")))
             for b in (1, 4)}
    for b, used in ((1, 2.0), (4, 8 * (1 - 0.75 ** 4))):
        ex = plans[b].experts
        # a protected share per layer, no expert resident: the slots the running layer does
        # not take (top_k, or more at a batch: at batch 4 every slot and more)
        hit = max(0.0, ex.slots - max(2, used)) / 4 / 8
        assert hit == (ex.protected / 32 if b == 1 else 0.0)
        # the running layer may take any slot: its experts beyond them all are read again
        reads = used * (1 - hit) + max(0.0, used - ex.slots)
        assert ex.bytes_per_step == int(4 * reads * ex.slot_bytes)
    assert plans[4].experts.slots < 5.47   # refetches


def test_a_bitmap_units_decode_is_charged_at_its_density():
    """A bitmap's decode speed depends on its element size and density: the profile keys it
    so (``bitmap.2@50``: bf16, half non-zero, to the nearest 10%) and the plan charges the
    decode thread at that speed; bitmap Units are never held as stored."""
    from offload.planner.placement import held_candidates
    from offload.planner.profile import decode_key
    from offload.units import TensorSpec

    n = 8 << 20   # bf16 values
    t = TensorSpec("weight", "bfloat16", (n,), 0, 2 * n, "bitmap", 0, n + n // 8, nnz=n // 2)
    u = Unit("layer.0", "layer", "layer", 0, 0, 2 * n, 0, (t,), stored_nbytes=n + n // 8)
    assert decode_key(t) == "bitmap.2@50"
    assert decode_key(TensorSpec("w", "float32", (10,), 0, 40, "bitmap", 0, 20, nnz=3)) == \
        "bitmap.4@30"
    profile = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "bfloat16",
                              decode_bps={"bitmap.2@50": 4e9, "bitmap.2@30": 1e9})
    assert profile.decode_seconds(u) == pytest.approx(2 * n / 4e9)
    assert not held_candidates([u], profile)
    us = [u] + [Unit(f"layer.{i}", "layer", "layer", i, 0, 2 * n, 0, ()) for i in (1, 2)]
    # room for one slot with its landing buffer and one resident Unit: a dense one saves
    # more per byte (16 MB read) than the bitmap (9 MB read and its decode)
    p = make_plan(us, [x.key for x in us], 2 * (2 * n) + (n + n // 8) + (2 << 20), 1 << 20,
                  16, profile, prefetch=0)
    assert "layer.0" in p.stream and p.decode_s == pytest.approx(2 * n / 4e9)


def test_a_fused_weight_is_priced_between_the_two_measured_sizes():
    """The fused kernel measured for large and small weights (``fused_bps``): a weight is
    charged per byte between the two by the log of its size, at the nearer one outside; with
    one size measured, every weight at it; at batch 8 the same between that batch's two."""
    from offload.planner.profile import FUSED_LARGE, FUSED_SMALL

    mb = 1 << 20
    assert (FUSED_SMALL, FUSED_LARGE) == (mb, 16 * mb)
    prof = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32", fused_bps={
        "Q4_0": 20e9, "Q4_0/small": 10e9, "Q4_0@8": 4e9, "Q4_0@8/small": 2e9})
    at = prof.fused_seconds
    assert at([("Q4_0", mb)]) == pytest.approx(mb / 10e9)
    assert at([("Q4_0", mb // 8)]) == pytest.approx(mb / 8 / 10e9)       # below: small's rate
    assert at([("Q4_0", 16 * mb)]) == pytest.approx(16 * mb / 20e9)
    assert at([("Q4_0", 64 * mb)]) == pytest.approx(64 * mb / 20e9)      # above: large's rate
    # 4 MB: half way in log2 (2 of 4 doublings): half the bytes at each rate
    assert at([("Q4_0", 4 * mb)]) == pytest.approx(2 * mb / 10e9 + 2 * mb / 20e9)
    # two weights add; batch 8 between that batch's figures, batch 4 linear between 1 and 8
    assert at([("Q4_0", mb), ("Q4_0", 16 * mb)]) == pytest.approx(mb / 10e9 + 16 * mb / 20e9)
    assert at([("Q4_0", mb)], batch=8) == pytest.approx(mb / 2e9)
    assert at([("Q4_0", mb)], batch=4) == pytest.approx(mb / 10e9 + (mb / 2e9 - mb / 10e9) * 3 / 7)
    one = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32", fused_bps={"Q4_0": 20e9})
    assert one.fused_seconds([("Q4_0", mb)]) == pytest.approx(mb / 20e9)
    assert one.fused_seconds([("Q8_0", mb)]) == pytest.approx(mb / 10e9)  # not measured: dense


def test_a_fused_weight_of_narrow_rows_pays_the_rows_measured_cost():
    """The fused kernel measured on the same bytes in rows of 4096 and of 512 columns: a
    weight's cost per byte is a + c / (its row's bytes), a and c fitted to the two (hand
    arithmetic below, Q4_0: 18 bytes a block of 32, so rows of 2304 and 288 bytes): rows of
    the narrow width cost the narrow rate, rows as wide as the probe's (or wider) the wide
    rate, and between, the fit; without a narrow figure, no correction."""
    from offload.planner.profile import FUSED_LARGE as big

    prof = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32", fused_bps={
        "Q4_0": 20e9, "Q4_0/narrow": 10e9, "Q4_0@8": 4e9, "Q4_0@8/narrow": 1e9})
    at = prof.fused_seconds
    assert at([("Q4_0", big, 288)]) == pytest.approx(big / 10e9)
    assert at([("Q4_0", big, 2304)]) == pytest.approx(big / 20e9)
    assert at([("Q4_0", big, 9216)]) == pytest.approx(big / 20e9)
    # 1/20e9 = a + c/2304 and 1/10e9 = a + c/288: c = 5e-11 / (1/288 - 1/2304), a = 1/20e9 - c/2304
    c = (1 / 10e9 - 1 / 20e9) / (1 / 288 - 1 / 2304)
    a = 1 / 20e9 - c / 2304
    assert at([("Q4_0", big, 324)]) == pytest.approx(big * (a + c / 324))   # 576 columns
    c8 = (1 / 1e9 - 1 / 4e9) / (1 / 288 - 1 / 2304)
    a8 = 1 / 4e9 - c8 / 2304
    assert at([("Q4_0", big, 324)], batch=8) == pytest.approx(big * (a8 + c8 / 324))
    plain = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32", fused_bps={"Q4_0": 20e9})
    assert plain.fused_seconds([("Q4_0", big, 324)]) == pytest.approx(big / 20e9)


def test_fused_units_are_read_as_stored_and_priced_by_the_fused_kernel():
    """compute='fast': a quantized linear weight becomes its stored blocks (uint8 rows: the
    Unit is no longer encoded, its memory is its stored bytes, read straight into a slot); a
    tensor the predicate refuses stays decoded. Its compute is charged at the fused kernel's
    measured speed for its type (missing: as dense bytes at compute_bps), batch-interpolated."""
    from offload.planner.compute import fused_count, fused_units
    from offload.units import TensorSpec

    layer = 32 << 20
    q = _quantized("layer.0.q", 0, layer)
    q = Unit(q.key, q.kind, q.group, q.index, q.offset, q.nbytes, q.checksum,
             (TensorSpec("weight", "float32", (4096, layer // 4 // 4096), 0, layer,
                         "gguf.Q4_0", 0, q.stored_bytes),), stored_nbytes=q.stored_bytes)
    (f,) = fused_units([q], lambda unit, t: True)
    assert fused_count([f]) == 1 and not f.encoded
    assert f.nbytes == q.stored_bytes and f.tensors[0].shape == (4096, q.stored_bytes // 4096)
    assert f.tensors[0].encoding == "fused.Q4_0" and f.tensors[0].dtype == "uint8"
    assert fused_units([q], lambda unit, t: False) == (q,)
    prof = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32",
                           fused_bps={"Q4_0": 5e9, "Q4_0@8": 2.5e9})
    assert prof.units_compute_seconds([f]) == pytest.approx(f.nbytes / 5e9)
    assert prof.units_compute_seconds([f], batch=8) == pytest.approx(f.nbytes / 2.5e9)
    assert prof.units_compute_seconds([q]) == pytest.approx(layer / 10e9)
    bare = HardwareProfile("cpu", 1.4e9, 0.0, 10e9, "float32")
    assert bare.units_compute_seconds([f]) == pytest.approx(f.nbytes / 10e9)
    p = make_plan([f], [f.key], 64 << 20, 1 << 20, 64, prof)
    assert p.compute_s == pytest.approx(f.nbytes / 5e9) and p.decode_s == 0


def _simulated_step_reads(rates_per_layer, slots, protected, steps=3000, seed=0):
    """Reads per step of the runtime's expert cache as a decode step walks the layers
    (``prefetch.experts``' policy): ``protected`` slots spread as a quota per layer (each
    layer's most recently used experts), the rest shared; a miss takes a free slot, else the
    least recently used expert that is not protected, else a protected one; never one the
    running layer uses. Each layer uses each of its experts with its chance, independently."""
    import random

    rng = random.Random(seed)
    layers = len(rates_per_layer)
    quota = {i: protected // layers + (1 if i < protected % layers else 0)
             for i in range(layers)}
    last: dict[tuple[int, int], int] = {}   # cached expert -> the tick of its last use
    tick = reads = 0
    for step in range(2 * steps):
        for i, rates in enumerate(rates_per_layer):
            used = [(i, e) for e, r in enumerate(rates) if rng.random() < r]
            for key in used:
                tick += 1
                if key not in last:
                    reads += step >= steps
                    if len(last) >= slots:
                        kept = set()
                        for j in range(layers):
                            mine = sorted((k for k in last if k[0] == j), key=last.get)
                            kept.update(mine[len(mine) - quota[j]:] if quota[j] else [])
                        free = [k for k in last if k not in used]
                        pool = [k for k in free if k not in kept] or free
                        del last[min(pool, key=last.get)]
                last[key] = tick
    return reads / steps


def test_a_batch_whose_layers_use_most_experts_leaves_the_cache_little_to_keep():
    """At batch 8 a layer of 8 experts, 2 a token, uses about 7.2 of them a step: running, it
    takes 7.2 of the cache's slots, evicting the other layers' protected experts beyond the
    shared ones, so with 10 slots over 8 layers almost nothing of a layer survives until its
    next step (the Mixtral bench model at batch 8 read every expert it used, 982 MB a step,
    where the plan, keeping only top_k slots for the running layer, said 872). The predicted
    reads stay within 10% of a simulation of the cache's policy at batch 8 and 1."""
    from offload.planner.experts import _step_reads, step_rates

    us = moe_units(n_layers=8)
    experts = [u for u in us if u.kind == "expert"]
    for batch, slots in ((8, 10), (8, 40), (1, 10), (1, 26)):
        rates = step_rates(experts, None, 2 / 8, batch)
        per_layer = [[rates[f"expert.{i}.{e}"] for e in range(8)] for i in range(8)]
        want = _simulated_step_reads(per_layer, slots, slots - 2)
        got = _step_reads(experts, set(), slots, rates, 2, 8)
        assert got == pytest.approx(want, rel=0.10), (batch, slots, got, want)


@pytest.mark.parametrize("batch,tokens,chunk", [(1, 256, 128), (1, 256, 64), (8, 216, 128),
                                                (8, 216, None), (1, 84, None), (3, 600, 64)])
def test_the_reserve_holds_every_decode_step_the_runtime_checks(batch, tokens, chunk):
    """A plan's dynamic reserve is at least what the runtime's budget check asks of each
    decode step up to ``tokens`` positions, not only of the prefill: a prefill in chunks
    holds less than a decode step where the layers' caches are still below the C heap's mmap
    threshold (every layer's old copy counted as heap). A fast plan chose chunks of 128 for
    SmolLM2 at batch 8 and its own runs were refused mid-prefill (23.0 MB needed, 22.8 MB
    reserved)."""
    from transformers import LlamaConfig

    from offload.adapters import adapter_for
    from offload.planner.reserve import dynamic_reserve, forward_bytes

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
    shape = adapter_for(config).shape(config)
    kv = shape.kv_bytes(tokens, 4)
    reserve = dynamic_reserve(shape, 4, tokens, logits_rows=batch, chunk=chunk, batch=batch)
    steps = [forward_bytes(shape, 4, batch=batch, new=1, total=t, logits_rows=batch,
                           kv_bytes=kv) for t in range(1, tokens // batch + 1)]
    assert reserve >= max(steps)
    prefill = forward_bytes(shape, 4, batch=1, new=chunk or tokens, total=tokens,
                            logits_rows=batch, kv_bytes=kv)
    assert reserve == max(prefill, max(steps))   # no more than the larger of the two
