"""The dynamic KV cache written in place (``adapters/kvbuffer.py``): the positions transformers'
``DynamicLayer`` holds, in buffers allocated once; and a fast plan's runtime handing it to
``generate()`` and to direct forwards, with the tokens and logits of transformers' cache."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import offload
from gguf_files import write_llama_gguf
from offload import api
from offload.kernels import layer
from offload.adapters.kvbuffer import BufferLayer, buffered_cache, capacity


def _kv(batch: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, positions, 8, generator=g),
            torch.randn(batch, 2, positions, 8, generator=g))


def test_buffer_layer_holds_what_a_dynamic_layer_holds():
    """Updates of a prefill, single positions and a chunk, within the capacity and past it;
    a crop and a beam reordering between them: every update returns the keys and values a
    DynamicLayer returns, and within the capacity the buffers are not reallocated."""
    ours, ref = BufferLayer(capacity=12), DynamicLayer()
    seed = 0
    for step in (5, 1, 1, 3, 2, 1, 4, 1):   # 5 .. 12 within the capacity, then 17, 18
        seed += 1
        k, v = _kv(3, step, seed)
        got, want = ours.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == ref.get_seq_length()
        if step == 5:
            first = ours._k.data_ptr()
        elif ours.get_seq_length() <= 12:
            assert ours._k.data_ptr() == first   # written in place
    assert ours._k.shape[-2] == 18   # past the capacity: exactly the positions needed
    ours.crop(-4), ref.crop(-4)
    order = torch.tensor([2, 0, 0])
    for layer in (ours, ref):   # what a beam search's reorder_cache does
        layer.keys, layer.values = layer.keys[order], layer.values[order]
    k, v = _kv(3, 2, 99)
    got, want = ours.update(k, v), ref.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == 16 and ours._k.shape[-2] == 16


def test_buffered_cache_replaces_full_attention_layers_only():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    cache = buffered_cache(config, 40)
    assert len(cache.layers) == 3 and all(type(x) is BufferLayer for x in cache.layers)
    assert capacity(cache) == 40 and capacity(DynamicCache(config=config)) is None
    assert capacity(None) is None
    for i in range(3):   # one allocation for every layer's keys and values
        k, v = _kv(2, 6, i)
        cache.update(k, v, i)
    slab = cache.layers[0]._slab.data
    assert slab.shape == (3, 2, 2, 2, 40, 8)
    assert all(x._k.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
               for x in cache.layers)
    k, v = _kv(2, 35, 7)   # past the capacity: that layer leaves the slab, the cache says so
    cache.update(k, v, 1)
    assert capacity(cache) is None and cache.layers[1]._k.shape[-2] == 41


def _near(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Logits a few float32 roundings apart: the two attentions' sums in other orders move a
    value by 1e-7 of the activations' scale, a wrong position or head by 1e-2 of the logits'."""
    return bool((a - b).abs().max() < 1e-4 * b.std())


@pytest.mark.parametrize("batch", [1, 2])
def test_fast_runtime_writes_its_cache_in_place(batch, tmp_path, monkeypatch):
    """A fast plan's runtime gives generate() and direct forwards a buffered cache: the same
    tokens as transformers' cache passed by the caller, the prefill's logits bitwise (the
    model's attention reads the buffers' strided views as it reads contiguous ones), each
    decode step's within float32 rounding (the layer kernel's attention over the buffers,
    torch's over transformers' cache). (That the smaller reserve this allows holds:
    test_memory's measured peaks, case "fast".)"""
    path = write_llama_gguf(tmp_path / "q8.gguf", hidden=128, layers=3, intermediate=256,
                            heads=4, kv_heads=2, vocab=512, qtype="Q8_0")
    model = offload.run(str(path), budget="100%", compute="fast", offload_dir=tmp_path / "o",
                        max_tokens=64, progress=False)
    plan = api.runtime_of(model).plan
    exact = offload.plan(str(path), "100%", offload_dir=tmp_path / "o", max_tokens=64)
    assert plan.kv.buffered and not exact.kv.buffered
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, 512, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :2], mask[1, :2] = 0, 0   # left padding
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    name = api.runtime_of(model).cache_argument   # "cache" (transformers 5.x) or its old name
    lib = layer._library()
    steps, step, run = [0], layer.DecoderKernels.step, lib.offload_llama_layers_step

    def counted(*a):   # a layer's step (one layer)
        steps[-1] += 1
        return step(*a)

    def counted_run(*a):   # the model road's step (a[1] layers)
        steps[-1] += a[1]
        return run(*a)

    monkeypatch.setattr(layer.DecoderKernels, "step", counted)
    monkeypatch.setattr(lib, "offload_llama_layers_step", counted_run)
    with torch.no_grad():
        ours = model.generate(ids, **kw)
        steps.append(0)
        theirs = model.generate(ids, **{name: DynamicCache(config=model.config)}, **kw)
        assert all(type(x) is BufferLayer for x in ours[name].layers)
        assert all(type(x) is DynamicLayer for x in theirs[name].layers)
        assert torch.equal(ours.sequences, theirs.sequences)
        assert torch.equal(ours.logits[0], theirs.logits[0])
        assert all(_near(a, b) for a, b in zip(ours.logits[1:], theirs.logits[1:]))
        assert steps == [4 * 3, 0]   # ours took the kernel's step: 4 decode steps, 3 layers
        # direct forwards, as a hand-written decode loop calls them
        out = model(ids, attention_mask=mask)
        ref = model(ids, attention_mask=mask, **{name: DynamicCache(config=model.config)})
        assert capacity(out[name]) == 64 // batch
        nxt = out.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        step = model(nxt, attention_mask=mask2, **{name: out[name]})
        step_ref = model(nxt, attention_mask=mask2, **{name: ref[name]})
        assert torch.equal(out.logits, ref.logits) and _near(step.logits, step_ref.logits)
    offload.close(model)
