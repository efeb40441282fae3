"""The budget is a promise, measured: each case runs in a fresh process, and the process's
resident high-water mark over the run (``stats()["measured_peak_bytes"]``: VmHWM reset when
``run`` starts, the baseline subtracted) stays under the budget.

A warm-up on another model first runs the same code paths (imports, allocator pools), so the
figure is the run's own memory; the measured peak must also cover what the runtime allocated
(a measurement that reads nothing would pass any budget)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model, weight_bytes
    import offload
    case, work = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    family = "mixtral" if case.startswith("moe") else "llama"
    # moe-bf16: torch's bf16 matmuls (oneDNN kernels per row count on AVX512-BF16 CPUs)
    dtype = torch.bfloat16 if case == "moe-bf16" else torch.float32
    dims = dict(hidden_size=256, intermediate_size=1024, vocab_size=8000,
                num_hidden_layers=8 if family == "llama" else 4)
    # warm-up: the same paths on another model of the family (imports, pools, kernels)
    warm = tiny_model(family, seed=1, num_hidden_layers=2, dtype=dtype)
    # (bf16: what the kernel caches may hold comes on top, up to 32 MiB)
    wb = "90%" if dtype == torch.float32 else int(0.9 * weight_bytes(warm)) + (32 << 20)
    off = offload.run(warm, budget=wb, offload_dir=tempfile.mkdtemp(), max_tokens=64,
                      progress=False)
    with torch.no_grad():
        off.generate(torch.randint(3, 3000, (2, 12)), max_new_tokens=3, do_sample=False,
                     pad_token_id=0)
    offload.close(off)
    del off, warm
    if case == "long":   # one KV head: the long context's cache fits the default reserve
        dims.update(num_key_value_heads=1)
    model = tiny_model(family, dtype=dtype, **dims)
    weights = weight_bytes(model)
    kw = dict(sparse="bitmap") if case == "sparse" else {{}}
    if case == "sparse":
        store = offload.pack(model, offload_dir=work, prune=0.6, sparse="bitmap",
                             progress=False).path
    elif case in ("quantized", "fast"):
        store = offload.pack(model, offload_dir=work, quantize="q4_0", progress=False).path
    else:
        store = offload.pack(model, offload_dir=work, progress=False).path
    del model
    batch = 3 if case in ("batch", "moe-bf16") else 1
    prompt = {{"long": 800}}.get(case, 24)
    opts = {{}} if case == "long" else dict(max_tokens=64)   # long: the default reserve
    if case == "fast":   # the fused kernel multiplies the Q4_0 blocks as stored
        opts.update(compute="fast")
    if case == "paged":
        opts = dict(kv="paged", max_context=prompt + 40, batch=batch, prefill_chunk=16,
                    kv_device_blocks=1)
    budget = int(weights * (0.45 if case in ("paged", "long", "moe-bf16") else 0.3))
    off = offload.run(str(store), budget=budget, progress=False, **opts)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 3000, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :4], mask[1, :4] = 0, 0   # left padding
    with torch.no_grad():
        out = off.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           pad_token_id=0)
    s = offload.stats(off)
    print(json.dumps(dict(budget=budget, weights=weights, tokens=out.shape[1] - prompt,
                          **{{k: s[k] for k in ("measured_peak_bytes", "accounted_peak_bytes",
                                             "allocated_bytes", "baseline_bytes",
                                             "prefill_chunk")}},
                          disk=s["bytes_read"]["disk"], kv=(s.get("kv") or {{}}))))
""")


@pytest.mark.parametrize("case", ["dense", "moe", "moe-bf16", "paged", "sparse", "quantized",
                                  "fast", "batch", "long"])
def test_measured_peak_stays_under_the_budget(case, tmp_path):
    script = SCRIPT.format(tests=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", script, case, str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(case, res)
    assert res["tokens"] == 16
    assert res["disk"] > 0   # it streamed
    assert res["measured_peak_bytes"] >= res["allocated_bytes"], res   # it measured something
    assert res["measured_peak_bytes"] <= res["budget"], res
    if case == "long":   # 800 positions: 3x the default reserve's 256, prefilled in chunks
        assert res["prefill_chunk"] < 800, res


KERNELS = textwrap.dedent("""
    import gc, json, os, sys, torch
    import offload
    from offload.hardware import measure_kernel_cache
    from offload.memory import KERNEL_CACHE_VARS, release_free_heap, rss_bytes
    torch.set_num_threads(2)
    env = [os.environ.get(v) for v in KERNEL_CACHE_VARS]
    if sys.argv[1] == "reserve":
        print(json.dumps(dict(reserve=measure_kernel_cache(torch.bfloat16), env=env)))
        sys.exit()
    # a run's shapes, from a baseline with oneDNN started (a run warms its code paths before
    # its meter starts): three weights at every row count from 1 to 96 (an MoE's experts over
    # a prefill and decode steps), twice
    torch.nn.functional.linear(torch.zeros(3, 160).bfloat16(), torch.zeros(96, 160).bfloat16())
    ws = [torch.randn(n, k).bfloat16() for n, k in ((512, 128), (128, 512), (384, 128))]
    xs = [torch.randn(96, w.shape[1]).bfloat16() for w in ws]
    gc.collect()
    release_free_heap()
    before = rss_bytes()
    for _ in range(2):
        for m in range(1, 97):
            for w, x in zip(ws, xs):
                torch.nn.functional.linear(x[:m], w)
    print(json.dumps(dict(growth=rss_bytes() - before, env=env)))
""")


def test_torch_kernel_caches_stay_within_what_the_plan_reserves():
    """A bf16 matmul at a new row count makes torch keep a new oneDNN kernel on CPUs with
    native bf16 (unbounded: 140 MiB over 236 shapes, measured); offload's import caps the
    caches and the plan reserves what they can hold (``hardware.measure_kernel_cache``, as a
    fresh process measures it): 288 shapes, each run twice in another fresh process, grow it
    by no more than that (on a CPU without per-shape kernels both are about 0)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    res = {}
    for what in ("reserve", "growth"):
        r = subprocess.run([sys.executable, "-c", KERNELS, what], capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out.pop("env") == ["32", "32"], out   # set by offload's import
        res.update(out)
    print(res)
    assert res["growth"] <= res["reserve"] + (1 << 20), res


HEAP = textwrap.dedent("""
    import torch
    import offload
    from offload.memory import rss_bytes
    big = torch.ones(16 << 18)             # a 16 MiB block (mapped), freed: glibc's default
    del big                                # serves blocks up to that size from the heap now
    before = rss_bytes()
    xs = [torch.ones(1 << 18) for _ in range(24)]   # a forward's activations: 24 x 1 MiB,
    del xs                                          # freed
    print(rss_bytes() - before)
""")


def test_activations_freed_after_offloads_import_go_back_to_the_os():
    """glibc serves large blocks from the heap once a larger one has been freed, and keeps
    them resident there when freed: a run's activations stayed counted against its budget
    (a Q4_0 store at batch 8 measured up to 103.9% of it, depending on the heap's layout).
    After ``import offload`` every large block is a mapping of its own, gone when freed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator only")
    r = subprocess.run([sys.executable, "-c", HEAP], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = int(r.stdout.split()[-1])
    assert kept < 2 << 20, f"{kept / 2**20:.1f} MiB of freed activations still resident"


def test_a_phase_before_the_run_keeps_its_peak_and_its_leftovers_join_the_baseline():
    """``PeakMeter.restart`` (after a first run's hardware profile): the phase's peak still
    counts, what it left resident moves into the baseline, and the run's own growth after it
    is measured from there."""
    import numpy as np
    import torch

    from offload.memory import PeakMeter

    meter = PeakMeter(torch.device("cpu"))
    meter.start()
    if meter.peak() is None:
        pytest.skip("no VmHWM here: nothing to measure")
    base = meter.baseline
    probe = np.ones(24 << 20, dtype=np.uint8)      # the phase's peak: 24 MiB touched
    left = np.ones(6 << 20, dtype=np.uint8)        # and what it leaves resident
    del probe
    meter.restart()
    assert meter.peak() >= 24 << 20                # the first phase's peak counts
    assert meter.baseline - base >= 6 << 20        # its leftovers are the baseline's now
    run = np.ones(30 << 20, dtype=np.uint8)        # the run grows past the first phase
    assert 30 << 20 <= meter.peak() < 33 << 20     # measured from the new baseline
    del run, left
