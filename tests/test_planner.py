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
