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


def _ring_pipeline(keys: list[str], slots: int):
    """A Pipeline over ``keys`` (one float32 value each) whose fetches write the key's number
    into its slot at once; returns it and the list of keys fetched."""
    from concurrent.futures import Future

    from offload.prefetch.pipeline import Pipeline
    from offload.tiers.base import Ticket
    from offload.tiers.slots import SlotRing
    from offload.units import TensorSpec, Unit

    units = {k: Unit(k, "layer", "layer", i, 0, 4, 0, (TensorSpec("w", "float32", (1,), 0, 4),))
             for i, k in enumerate(keys)}
    fetched = []

    def submit(unit, slot):
        fetched.append(unit.key)
        slot.buffer.view(torch.float32)[0] = unit.index
        done = Future()
        done.set_result(0.0)
        return Ticket(unit.key, 4, done)

    ring = SlotRing(slots, 4, lambda n: torch.zeros(n, dtype=torch.uint8))
    return Pipeline(tuple(keys), units, ring, submit), fetched


def test_a_consumer_holds_several_units_and_releases_them_in_any_order():
    """A layer run as one kernel road acquires its streamed parts in stream order and holds
    them together: each holds its own bytes, releasing any of them refills that slot, and the
    next pass starts in step."""
    keys = [f"u{i}" for i in range(5)]
    pipe, fetched = _ring_pipeline(keys, slots=3)
    pipe.begin_pass()
    assert fetched == keys[:3]
    held = {k: pipe.acquire(k) for k in keys[:3]}   # all the slots held at once
    assert [float(v["w"]) for v in held.values()] == [0, 1, 2]
    pipe.release("u1")                              # out of order: its slot fetches u4
    assert fetched[-1] == "u4"
    pipe.release("u0")
    pipe.release("u2")
    for k in keys[3:]:
        assert float(pipe.acquire(k)["w"]) == keys.index(k)
        pipe.release(k)
    pipe.begin_pass()                               # the cycle continues without a resync
    assert float(pipe.acquire("u0")["w"]) == 0
    pipe.release("u0")
    assert pipe.stats.resyncs == 0


def test_holding_more_units_than_slots_is_refused_by_name():
    """More Units held than slots, or one out of stream order while some are held, is refused
    by name (a resync then would refill slots whose tensors are in use); the next pass
    resyncs and runs."""
    pipe, _ = _ring_pipeline([f"u{i}" for i in range(4)], slots=2)
    pipe.begin_pass()
    pipe.acquire("u0")
    pipe.acquire("u1")
    with pytest.raises(RuntimeError, match=r"u2 cannot be acquired.*at most 2"):
        pipe.acquire("u2")
    with pytest.raises(RuntimeError, match=r"u3 is not next in the stream while 2 units"):
        pipe.acquire("u3")                          # no resync under held tensors
    assert pipe.stats.resyncs == 0
    pipe.begin_pass()                               # the next pass resyncs and runs
    assert pipe.stats.resyncs == 1
    pipe.acquire("u0")
    pipe.release("u0")


def test_a_decode_steps_ids_take_the_rows_the_masked_road_gives(monkeypatch):
    """``embedding_forward``'s row-by-row road for a decode step's few ids gives the rows of
    its masked road bitwise: from a resident float chunk, from a resident chunk of blocks
    (decoded a row at a time or together), and it leaves ids of a chunk on disk, or past the
    vocabulary, to the masked road (which gathers the former from disk)."""
    from offload import hooks

    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 8, generator=g)
    chunks = [("a", (0, 10)), ("b", (10, 20)), ("c", (20, 30))]
    resident = {"a": {"weight": table[:10]},
                "b": {"weight": (table[10:20] * 16).to(torch.uint8)}}   # "blocks"
    gathered = []

    def gather(key, rows):
        gathered.append((key, rows.tolist()))
        return table[20:30][rows]

    def decode_rows(blocks):   # a row-wise decode, as GGUF rows are
        return blocks.float() / 16 + 0.5

    forward = hooks.embedding_forward(chunks, 8, torch.float32, torch.device("cpu"), resident,
                                      gather, decode_rows=decode_rows)
    cases = [torch.tensor([[3], [15]]), torch.tensor([[19, 0, 9, 10]]),
             torch.tensor([[4], [25]]), torch.tensor([[2, 31]])]
    for ids in cases:
        gathered.clear()
        few = forward(ids)
        few_gathers = list(gathered)
        monkeypatch.setattr(hooks, "FEW_IDS", 0)   # every call down the masked road
        gathered.clear()
        masked = forward(ids)
        monkeypatch.setattr(hooks, "FEW_IDS", 16)
        known = ids < 30   # past the vocabulary: rows left unwritten on either road
        assert torch.equal(few[known], masked[known])
        assert few_gathers == gathered   # disk rows only where a chunk is not resident
    assert torch.equal(forward(cases[0])[1, 0], decode_rows(resident["b"]["weight"][5]))
