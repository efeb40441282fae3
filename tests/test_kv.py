"""The paged KV cache (offload/prefetch/kv.py): DynamicCache's results, with old blocks on disk."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from offload.prefetch.kv import PagedKVCache


def _generate(model, ids, mask, cache=None, new=30):
    kw = {"cache": cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                              **kw)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("layers", [3, 4])   # odd and even: both prefetch orders
def test_paged_cache_is_bitwise_dynamic_cache(family, batch, layers, tmp_path):
    _paged_vs_dynamic(tiny_model(family, num_hidden_layers=layers), batch, layers, tmp_path)


def test_paged_cache_bf16_is_bitwise_dynamic_cache(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3, dtype=torch.bfloat16)
    _paged_vs_dynamic(model, 2, 3, tmp_path, block=64, new=100)


def _paged_vs_dynamic(model, batch, layers, tmp_path, block=32, new=30):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 3000, (batch, 40), generator=g)   # longer than one block
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :3], mask[1, :3] = 0, 0
    ref = _generate(model, ids, mask, new=new)
    cache = PagedKVCache(model.config, max_context=200, batch=batch, block_tokens=8,
                         device_blocks=1, spill_dir=tmp_path, dtype=model.dtype)
    out = _generate(model, ids, mask, cache, new=new)
    assert cache.block_tokens == block   # raised so a block row is 4096-byte aligned
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))   # across 2 boundaries
    assert cache.stats.spilled_blocks == layers and cache.stats.bytes_read > 0
    assert list(tmp_path.iterdir()) == [], "the scratch file is unlinked"
    cache.close()


def test_kv_far_larger_than_the_device_part_runs_in_bounded_memory(tmp_path):
    """8k positions x batch 4: the KV (403 MB) is ~4x what the cache holds in memory; a fresh
    process's peak RSS grows by the cache's device bytes and the attention's activations, not
    by the KV."""
    script = textwrap.dedent(f"""
        import json, resource, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_model
        from offload.prefetch.kv import PagedKVCache
        torch.set_num_threads(2)
        model = tiny_model("llama", num_key_value_heads=4)
        cfg, B, T = model.config, 4, 8192
        ids = torch.randint(3, 3000, (B, T + 1), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():   # warm-up: kernels and allocator, outside the measurement
            model(ids[:, :64], use_cache=False)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cache = PagedKVCache(cfg, max_context=T + 1, batch=B, block_tokens=256,
                             device_blocks=2, spill_dir={str(tmp_path)!r})
        with torch.no_grad():
            for s in range(0, T, 64):   # chunked prefill: activations stay small
                out = model(ids[:, s:s + 64], cache=cache, use_cache=True, logits_to_keep=1)
            last = model(ids[:, T:], cache=cache, use_cache=True).logits
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kv = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * (T + 1) * 32 * 4
        print(json.dumps(dict(kv=kv, device=cache.device_bytes, grew=peak - base,
                              spilled=cache.stats.spilled_blocks, length=cache.get_seq_length(),
                              finite=bool(torch.isfinite(last).all()))))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["length"] == 8193 and res["finite"] and res["spilled"] > 0
    assert res["kv"] > 3 * res["device"]
    # the cache's device part + activations (a 64-position chunk attending 8k positions:
    # scores, mask, softmax ~70 MB); about half the KV itself
    assert res["grew"] < res["device"] + 96 * 2**20 < 0.6 * res["kv"], res


def test_past_its_max_context_is_refused():
    model = tiny_model("llama", num_hidden_layers=2)
    cache = PagedKVCache(model.config, max_context=32, batch=1)
    with pytest.raises(ValueError, match="needs 40 positions but the PagedKVCache holds 32"):
        with torch.no_grad():
            model(torch.randint(3, 3000, (1, 40)), cache=cache, use_cache=True)
    cache.close()


def test_a_closed_cache_says_so():
    model = tiny_model("llama", num_hidden_layers=2)
    cache = PagedKVCache(model.config, max_context=64, batch=1)
    with torch.no_grad():
        model(torch.randint(3, 3000, (1, 5)), cache=cache, use_cache=True)
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        with torch.no_grad():
            model(torch.randint(3, 3000, (1, 1)), cache=cache, use_cache=True)


def test_offloaded_model_with_a_paged_cache_is_bitwise_and_counts_it(offload_dir, tmp_path):
    """Weights streamed by offload, KV paged to disk: the runtime's budget check counts the
    cache's device part (not the whole KV), and stats() reports the KV per tier."""
    import offload
    from conftest import weight_bytes

    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 3000, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ref = _generate(model, ids, mask, new=40)
    off = offload.run(tiny_model("llama", num_hidden_layers=4), offload_dir=offload_dir,
                      budget=int(weight_bytes(model) * 0.5), max_tokens=128)
    cache = PagedKVCache(model.config, max_context=80, batch=2, block_tokens=32,
                         device_blocks=1, spill_dir=tmp_path)
    out = _generate(off, ids, mask, cache, new=40)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    s = offload.stats(off)
    assert s["kv"]["positions"] == 79 and s["kv"]["disk_bytes"] > 0
    assert s["kv_bytes"] == cache.device_bytes   # what the reserve check counted
    assert s["accounted_peak_bytes"] <= s["budget_bytes"]
    offload.close(off)
    cache.close()


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("batch", [1, 4])
def test_run_with_paged_kv_hands_generate_a_paged_cache(family, batch, offload_dir):
    import offload

    model = tiny_model(family, num_hidden_layers=4)
    ids = torch.randint(3, 3000, (batch, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :3], mask[1, :3] = 0, 0
    ref = _generate(model, ids, mask, new=90)
    off = offload.run(tiny_model(family, num_hidden_layers=4), offload_dir=offload_dir,
                      budget="40MB", kv="paged", max_context=130, batch=batch, kv_block=32,
                      kv_device_blocks=1)
    plan = off._offload_runtime.plan
    assert plan.kv.mode == "paged" and "KV spill file" in plan.table()
    out = _generate(off, ids, mask, new=90)
    assert type(out.past_key_values) is PagedKVCache
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    kv = offload.stats(off)["kv"]
    assert kv["positions"] == 129 and kv["spilled_blocks"] > 0 and kv["disk_bytes"] > 0
    again = _generate(off, ids, mask, new=90)   # the cache is reset, not grown
    assert torch.equal(again.sequences, ref.sequences)
    cache = out.past_key_values
    offload.close(off)
    with pytest.raises(RuntimeError, match=r"closed \(its model was released\)"):
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)


def test_a_context_that_even_the_disk_cannot_hold_is_refused(offload_dir):
    import offload
    from offload.errors import HardwareError

    with pytest.raises(HardwareError, match=r"max_context=1000000000 at batch 4 needs .* of KV "
                                            r"cache, which cannot be served even from disk: .* "
                                            r"free"):
        offload.plan(tiny_model("llama"), "50%", offload_dir=offload_dir, kv="paged",
                     max_context=10**9, batch=4)


def test_kv_alone_over_the_budget_runs_under_it_measured(tmp_path):
    """8k positions x batch 4 through offload.run: the KV (403 MB) is 1.9x the budget (200 MiB);
    the run completes with offload's accounted peak under the budget, and the process's peak
    RSS (a fresh process, after a warm-up) grows by less than the budget."""
    script = textwrap.dedent(f"""
        import json, resource, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_model
        import offload
        torch.set_num_threads(2)
        B, T, budget = 4, 8192, 200 * 2**20
        ids = torch.randint(3, 3000, (B, T + 1), generator=torch.Generator().manual_seed(0))
        warm = tiny_model("llama", num_key_value_heads=4)
        with torch.no_grad():
            warm(ids[:, :64], use_cache=False)
        model = tiny_model("llama", num_key_value_heads=4)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        off = offload.run(model, budget=budget, offload_dir={str(tmp_path)!r}, kv="paged",
                          max_context=T + 1, batch=B, prefill_chunk=64, progress=False)
        with torch.no_grad():
            for s in range(0, T, 64):
                off(ids[:, s:s + 64], use_cache=True, logits_to_keep=1,
                    **({{"cache": cache}} if s else {{}}))
                cache = off._offload_runtime._owned_kv
            last = off(ids[:, T:], cache=cache, use_cache=True).logits
        st = offload.stats(off)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cfg = model.config
        kv = 2 * cfg.num_hidden_layers * B * 4 * (T + 1) * 32 * 4
        print(json.dumps(dict(kv=kv, budget=budget, grew=peak - base, peak=st["accounted_peak_bytes"],
                              positions=st["kv"]["positions"], disk=st["kv"]["disk_bytes"],
                              finite=bool(torch.isfinite(last).all()))))
        offload.close(off)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["positions"] == 8193 and res["finite"] and res["disk"] > 0
    print(res)
    assert res["kv"] > 1.9 * res["budget"]
    assert res["peak"] <= res["budget"], res          # offload's accounting
    assert res["grew"] <= res["budget"], res          # measured by the OS


def test_heavy_hitter_cache_is_exact_until_it_evicts_then_keeps_its_size():
    from transformers import DynamicCache

    from offload.prefetch.kv_evict import HeavyHitterCache

    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 3000, (1, 50), generator=torch.Generator().manual_seed(6))

    def step_by_step(cache):
        with torch.no_grad():
            return torch.cat([model(ids[:, i:i + 1], cache=cache, use_cache=True).logits
                              for i in range(ids.shape[1])], 1)

    model.set_attn_implementation("eager")
    ref = step_by_step(DynamicCache(config=model.config))
    model.set_attn_implementation("sdpa")
    with HeavyHitterCache(model, keep=64) as cache:   # never full: nothing evicted
        assert model.config._attn_implementation == "eager"
        assert torch.equal(step_by_step(cache), ref)
        assert cache.evicted == 0
    assert model.config._attn_implementation == "sdpa", "restored on exit"
    with HeavyHitterCache(model, keep=16, recent=8) as cache:
        lossy = step_by_step(cache)
        assert cache.get_seq_length() == 50
        assert all(layer.keys.shape[-2] == 16 for layer in cache.layers)
        assert cache.evicted == 2 * (50 - 16)
    assert torch.equal(lossy[:, :16], ref[:, :16])   # the same until the first eviction
    assert not torch.equal(lossy, ref)               # lossy after it: opt-in, measured


@pytest.mark.parametrize("crop_to", [100, 96, 40, 33, 5, -7])
def test_a_cropped_paged_cache_is_a_cropped_dynamic_cache(crop_to, tmp_path):
    """Positions fed in chunks past two spills, cropped (into the device tail, to a block
    edge, into a spilled block that must come back to the device, as a negative count), then
    fed again: every layer's keys and values equal DynamicCache's doing the same, and a crop's
    disk slots are reused before the scratch file grows."""
    from transformers import DynamicCache

    model = tiny_model("llama", num_hidden_layers=3)
    cache = PagedKVCache(model.config, max_context=200, batch=2, block_tokens=8,
                         device_blocks=1, spill_dir=tmp_path)
    ref = DynamicCache(config=model.config)
    bt = cache.block_tokens   # 32: raised for 4096-byte rows
    g = torch.Generator().manual_seed(3)

    def feed(n):
        """Each layer's keys and values as returned, compared at once (the paged cache
        returns views of a gather buffer the layer after next reuses)."""
        same = []
        for layer in range(3):
            k, v = (torch.randn(2, 2, n, 32, generator=g) for _ in range(2))
            (pk, pv), (rk, rv) = cache.update(k, v, layer), ref.update(k, v, layer)
            same.append(torch.equal(pk, rk) and torch.equal(pv, rv))
        return same

    for n in (50, 40, 30):   # 120 positions: blocks 0-1 spilled in every layer
        assert feed(n) == [True] * 3
    assert cache.stats.spilled_blocks == 3 * 2 and cache.get_seq_length() == 120
    kept = crop_to % 120
    cache.crop(crop_to)
    ref.crop(kept - 120)   # this transformers' DynamicCache takes a count to drop
    assert cache.get_seq_length() == ref.get_seq_length() == kept
    slots = cache._spill.slots
    assert feed(45) == [True] * 3   # past the crop again, across spills
    assert cache._spill.slots <= max(slots, -(-(kept + 45) // bt) * 3)
    cache.close()
