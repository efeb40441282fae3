"""The one Transport of a runtime: every consumer's reads are submitted to it and counted as
pending, so "is the disk idle?" has one honest answer; waits record stall per consumer."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import offload
from conftest import tiny_model, weight_bytes
from offload.prefetch.kv import PagedKVCache
from offload.tiers.disk import DiskTier
from offload.tiers.transport import Transport


def test_priorities_cancel_and_stall():
    """One thread: the most urgent queued job runs first; a cancelled guess never runs and
    stops counting at once; a wait's time is its consumer's stall."""
    t = Transport(1)
    gate, ran = threading.Event(), []

    def job(name):
        ran.append(name)
        return 0.0

    blocker = t.submit(gate.wait, key="b", nbytes=0, consumer="layers")
    ahead = t.submit(job, "ahead", key="a", nbytes=0, consumer="layers")
    guess = t.submit(job, "guess", key="g", nbytes=0, consumer="experts", priority="guess")
    now = t.submit(job, "now", key="n", nbytes=0, consumer="experts", priority="now")
    assert t.pending == 4 and not t.idle()
    assert guess.cancel() and t.pending == 3
    threading.Timer(0.05, gate.set).start()
    t.wait(blocker, "layers")
    t.wait(ahead, "layers")
    t.wait(now, "experts")
    assert ran == ["now", "ahead"]
    assert t.pending == 0 and t.idle()
    assert t.stall["layers"] >= 0.04 and t.waits["experts"] == 1
    t.close()


def test_a_decode_after_a_read_carries_its_error():
    t = Transport(1)
    read = t.submit(lambda: 0.5, key="u", nbytes=1, consumer="layers")
    assert t.wait(t.then(read, lambda: None), "layers") == 0.5
    failed = t.submit(lambda: 1 / 0, key="u", nbytes=1, consumer="layers")
    with pytest.raises(ZeroDivisionError):
        t.wait(t.then(failed, lambda: None), "layers")
    bad_decode = t.then(t.submit(lambda: 0.0, key="u", nbytes=1, consumer="layers"),
                        lambda: [][1])
    with pytest.raises(IndexError):
        t.wait(bad_decode, "layers")
    t.close()


class _Gate:
    """Holds every read of the store (and of the KV spill file) until opened."""

    def __init__(self, monkeypatch):
        self.open = threading.Event()
        real_read, real_blocks = DiskTier.read, PagedKVCache.read_blocks
        gate = self.open

        def read(disk, unit, dest, verify=True):
            gate.wait(30)
            return real_read(disk, unit, dest, verify)

        def read_blocks(cache, layer, parity):
            gate.wait(30)
            return real_blocks(cache, layer, parity)

        monkeypatch.setattr(DiskTier, "read", read)
        monkeypatch.setattr(PagedKVCache, "read_blocks", read_blocks)


def test_every_consumer_is_counted_by_the_one_transport(offload_dir, monkeypatch):
    """Layer pipeline, expert cache, paged KV spill reads and host staging (its submission
    path, with a stand-in mover on this CPU machine) all land in one pending count; with the
    layers' reads in flight the expert predictor's "disk idle" gate is closed."""
    model = tiny_model("mixtral", seed=3)
    off = offload.run(model, budget=int(weight_bytes(model) * 0.2), offload_dir=offload_dir,
                      max_tokens=64)
    rt = off._offload_runtime
    t = rt.transport
    assert rt.plan.stream and rt.experts.cache is not None
    kv = PagedKVCache(model.config, max_context=128, batch=1, block_tokens=32,
                      device_blocks=1, spill_dir=offload_dir, transport=t)
    k = torch.randn(1, model.config.num_key_value_heads, 100, 32)   # 3 full blocks: 2 spill
    for layer_cache in kv.layers[:2]:
        layer_cache.update(k, k)
    gate = _Gate(monkeypatch)
    try:
        rt.pipeline.begin_pass()                       # the layer window: one read per slot
        layers = t.pending
        assert layers == len(rt.slots) == t.submitted["layers"] > 0
        assert rt.experts.cache.idle() == (layers < t.io_threads)

        cache = rt.experts.cache
        layer = rt.experts.moe.layers[0]
        cache.begin(layer, [0, 1])                     # two routed experts: read at once
        assert t.pending == layers + 2 and t.submitted["experts"] == 2
        assert not cache.idle()                        # every thread has a read: no guess

        kv.prefetch(1, 1)                              # layer 1's spilled blocks: a KV read
        assert t.submitted["kv"] == 1 and t.pending == layers + 3

        class Staging:                                 # the GPU path's submission, on a CPU
            def move(self, unit, slot, verify):
                gate.open.wait(30)
                return 0.0

        rt.staging, unit = Staging(), rt.units[rt.plan.stream[0]]
        ticket = rt._submit(unit, rt.slots[0])
        assert t.pending == layers + 4 and t.submitted["layers"] == layers + 1
        assert not t.idle() and not cache.idle()
    finally:
        gate.open.set()
    t.wait(ticket, "layers")
    rt.staging = None
    for key in (0, 1):
        cache.get(key)
        cache.done(key)
    cache.end()
    kv.wait_all()
    kv.close()
    rt.pipeline.drain()
    deadline = time.time() + 10
    while t.pending and time.time() < deadline:
        time.sleep(0.01)
    assert t.pending == 0 and t.waits["experts"] == 2 and t.waits["kv"] == 1
    offload.close(off)
