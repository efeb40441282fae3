"""The prefetch pipeline: order, slot states, recovery after a failed forward."""
from __future__ import annotations

import pytest
import torch

import offload
from conftest import tiny_model, weight_bytes
from offload.tiers.slots import FILLING, FREE, IN_USE, READY, Slot, SlotStateError


def test_slot_transitions_are_checked():
    s = Slot(0, torch.empty(16, dtype=torch.uint8))
    s.move(FREE, FILLING)
    with pytest.raises(SlotStateError):
        s.move(FREE, FILLING)
    s.move(FILLING, READY)
    s.move(READY, IN_USE)
    with pytest.raises(SlotStateError):
        s.move(READY, IN_USE)


def test_fetch_order_is_the_stream_cycled(offload_dir):
    model = tiny_model("llama")
    off = offload.run(model, budget=int(weight_bytes(model) * 0.25), offload_dir=offload_dir,
                      max_tokens=16, prefetch=2)
    rt = off._offload_runtime
    seen = []
    real = rt._submit
    rt.pipeline._submit = lambda unit, slot: (seen.append(unit.key), real(unit, slot))[1]
    with torch.no_grad():
        off(torch.randint(3, 3000, (1, 5)))
        off(torch.randint(3, 3000, (1, 5)))
    stream = list(rt.plan.stream)
    n = len(seen)
    assert rt.plan.slots == 3
    assert n == 2 * len(stream) + len(rt.slots)   # two passes, and the window runs ahead
    assert seen == (stream * 3)[:n]
    assert rt.pipeline.stats.resyncs == 0
    offload.close(off)


def test_a_failed_forward_leaves_the_pipeline_usable(offload_dir):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 3000, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    off = offload.run(model, budget=int(weight_bytes(model) * 0.2), offload_dir=offload_dir,
                      max_tokens=16)
    layer = off.model.layers[3]

    def boom(module, args):
        raise RuntimeError("simulated failure inside layer 3")

    h = layer.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated"):
        with torch.no_grad():
            off(ids)
    h.remove()
    with torch.no_grad():
        assert torch.equal(off(ids).logits, ref)
    assert offload.stats(off)["resyncs"] == 1
    offload.close(off)


def test_close_restores_the_model(offload_dir):
    model = tiny_model("llama")
    params_before = {n: (p.shape, p.dtype) for n, p in model.named_parameters()}
    forwards_before = {n for n, m in model.named_modules() if "forward" in m.__dict__}
    off = offload.run(model, budget=int(weight_bytes(model) * 0.2), offload_dir=offload_dir,
                      max_tokens=16)
    rt = off._offload_runtime
    offload.close(off)
    assert {n for n, m in off.named_modules() if "forward" in m.__dict__} == forwards_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in off.modules())
    # the structure is the user's again; the weights were released to the store (meta)
    assert {n: (p.shape, p.dtype) for n, p in off.named_parameters()} == params_before
    assert all(p.is_meta for p in off.model.layers.parameters())
    assert offload.stats(off)["forwards"] == 0   # the final figures stay readable
    with pytest.raises(RuntimeError, match="closed; run offload.run"):
        rt._begin(off, (), {})


def test_embedding_rows_are_gathered_not_streamed(offload_dir):
    """A decode step reads a few KB of embedding rows, never the whole embedding."""
    model = tiny_model("llama")
    off = offload.run(model, budget=int(weight_bytes(model) * 0.2), offload_dir=offload_dir,
                      max_tokens=16)
    rt = off._offload_runtime
    assert not any(k.startswith("embed.") for k in rt.plan.stream)
    ids = torch.tensor([[5, 1500, 2999, 5]])
    with torch.no_grad():
        off(ids)                       # first pass: start-up and checksum reads
        rt.pipeline.drain()            # the window runs ahead: count only completed reads
        before = rt.disk.bytes_read
        off(ids)
        rt.pipeline.drain()
    gathered = rt.disk.bytes_read - before - rt.plan.streamed_bytes
    assert 0 < gathered <= 3 * 2 * 4096   # three distinct ids, at most two blocks each
    offload.close(off)
