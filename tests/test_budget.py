"""The budget is a promise: the runtime's accounting and the process's RSS stay under it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import offload
from conftest import tiny_model, weight_bytes


def test_plan_total_equals_bytes_allocated(offload_dir):
    model = tiny_model("mistral")
    budget = int(weight_bytes(model) * 0.3)
    off = offload.run(model, budget=budget, offload_dir=offload_dir, max_tokens=32)
    rt = off._offload_runtime
    assert rt.device_tier.allocated_bytes == rt.plan.resident_bytes + rt.plan.slots * rt.plan.slot_bytes
    assert rt.plan.total_bytes <= budget
    with torch.no_grad():
        off.generate(torch.randint(3, 3000, (2, 6)), max_new_tokens=5, do_sample=False,
                     pad_token_id=0)
    s = offload.stats(off)
    assert 0 < s["accounted_peak_bytes"] <= budget
    assert s["kv_bytes"] > 0 and s["accounted_peak_bytes"] >= s["allocated_bytes"] + s["kv_bytes"]
    offload.close(off)


RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys, tempfile, psutil, torch
    import offload
    from transformers import LlamaConfig, LlamaForCausalLM
    store, budget = sys.argv[1], int(sys.argv[2])
    # Warm the interpreter: imports, kernels and allocator pools of the same code paths on a
    # tiny model, so that the growth measured next is the runtime's own memory.
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    warm = offload.run(tiny, budget="2MB", offload_dir=tempfile.mkdtemp(), max_tokens=16)
    with torch.no_grad():
        warm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    offload.close(warm)
    del warm, tiny
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")            # reset the peak RSS (VmHWM) to the current RSS
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = psutil.Process().memory_info().rss
    # (Should the reset not take, VmHWM keeps an earlier peak: the growth measured below can
    # then only come out larger, never smaller, so the check stays sound.)
    model = offload.run(store, budget=budget, max_tokens=64)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    peak = hwm()
    print(json.dumps({"base": base, "peak": peak, "stats": offload.stats(model)}))
    print("RSS growth", (peak - base) >> 10, "KiB; budget", budget >> 10, "KiB", file=sys.stderr)
""")


def test_rss_stays_under_budget_smollm2(smollm2, tmp_path):
    """Cross-check the accounting with the OS: peak RSS growth of a fresh process running
    SmolLM2 at 20% of its weights (page cache is not RSS; O_DIRECT keeps it out anyway)."""
    path, _, resident = smollm2
    budget = int(weight_bytes(resident) * 0.20)
    store = offload.pack(path, offload_dir=tmp_path, progress=False).path
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(store), str(budget)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["base"]
    assert r["stats"]["accounted_peak_bytes"] <= budget
    s = r["stats"]   # it really streamed: every forward read what the plan streams
    assert s["predicted"]["bytes_per_step"] > 0 and s["forwards"] >= 12
    assert s["bytes_read"]["disk"] >= s["forwards"] * s["predicted"]["bytes_per_step"]
    print(out.stderr.strip().splitlines()[-1])
    # measured: the peak RSS since run() began above its baseline (skeleton, kernels'
    # workspaces: the growth from before run() includes them)
    print(f"measured {s['measured_peak_bytes']} above {s['baseline_bytes']}; growth {growth}")
    assert s["allocated_bytes"] <= s["measured_peak_bytes"] <= budget, s
