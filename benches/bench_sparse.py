"""Sparse bench: the TinyLlama-shaped bf16 model pruned to 50%, dense vs bitmap streaming.

    .venv/bin/python benches/bench_sparse.py          # the full bench (about 10 minutes)
    .venv/bin/python benches/bench_sparse.py --toy    # a tiny model, well under a minute

The model of ``bench_dense.py`` (random bf16, TinyLlama-1.1B shape) has every decoder projection
pruned to 50% per row by magnitude and is saved as a new checkpoint: all contenders run that same
pruned model at the same budget (25% of its weights) and the same memory cap
(``../shared/tools/memlimit.sh``: the budget plus the idle interpreter, page cache included
and dropped before each). Rows: the resident pruned model (no cap), Accelerate disk offload,
offload streaming a dense store of it, offload streaming a bitmap store of it (``offload pack
--sparse bitmap``), and the floors: bytes streamed per token over the disk bandwidth measured
in this run. The CPU decode rate of the C++ kernel (one thread, as the I/O thread runs it) is
measured on the store's largest encoded Unit and compared with the disk bandwidth: decode must
never be the bottleneck. (In the runtime one decode thread decodes what the I/O threads read.)

Target (from the issue): bitmap streaming >= 1.6x dense streaming tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dense  # noqa: E402
from _common import (  # noqa: E402
    bench_entry, bench_defaults, bench_parser, cap_and_disk_rows, cgroup_status, disk_bandwidth,
    emit_result, fmt_bytes, format_header, format_table, greedy_decode, idle_footprint,
    launch_contender, system_info, write_json)

SCRIPT = Path(__file__).resolve()
TARGET_VS_DENSE = 1.6
PRUNE = 0.5


def build_pruned(work: Path, dims: dict) -> Path:
    """bench_dense's random model, pruned to 50% per row by magnitude, saved once."""
    import torch
    from transformers import AutoModelForCausalLM

    from offload.adapters import adapter_for
    from offload.store.prune import prune_model

    src = work / "model"
    bench_dense.build_model(src, dims)
    out = work / "model-pruned50"
    marker = out / "pruned.json"
    want = {"source": json.loads((src / "offload_bench.json").read_text())
            if (src / "offload_bench.json").exists() else str(src), "prune": PRUNE,
            "method": "magnitude"}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return out
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    prune_model(model, PRUNE, adapter_for(model.config))
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pruned.json").write_text(json.dumps(want))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def decode_rate(manifest) -> dict:
    """Single-thread C++ decode of the largest encoded Unit on every CPU path this machine runs
    (AVX-512, AVX2, scalar): stored and dense GB/s, median of 7 decodes of one Unit, as the
    runtime's decode thread runs it. ``isa`` is the path the runtime selects
    (``$OFFLOAD_CPU_ISA``, else the best)."""
    import numpy as np
    import torch

    from offload.kernels import cpu
    from offload.kernels.decode import decode_unit
    from offload.tiers.device import aligned_host
    from offload.tiers.disk import DiskTier

    unit = max((u for u in manifest.units if u.encoded), key=lambda u: u.nbytes)
    disk = DiskTier(manifest.data_path)
    stored = aligned_host(-(-unit.stored_bytes // 4096) * 4096)
    disk.read(unit, stored.numpy(), verify=True)
    disk.close()
    dense = torch.empty(unit.nbytes, dtype=torch.uint8)
    selected = cpu.selected()
    paths = {}
    for isa in cpu.supported():
        os.environ[cpu.ENV] = isa   # this process only: the runtime reads it per decode
        decode_unit(unit, stored, dense)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            decode_unit(unit, stored, dense)
            times.append(time.perf_counter() - t0)
        s = float(np.median(times))
        paths[isa] = {"seconds": s, "stored_bps": unit.stored_bytes / s,
                      "dense_bps": unit.nbytes / s}
    os.environ[cpu.ENV] = selected or "auto"
    top = paths.get(selected, {"seconds": float("nan"), "stored_bps": 0.0, "dense_bps": 0.0})
    return {"unit": unit.key, "stored_bytes": unit.stored_bytes, "dense_bytes": unit.nbytes,
            **top, "isa": selected or "torch reference", "paths": paths}


def contender_main(a: argparse.Namespace) -> None:
    if a.contender != "offload-store":
        return bench_dense.contender_main(a)
    import torch

    import offload

    torch.manual_seed(0)
    config = json.loads((Path(a.model_dir) / "config.json").read_text())
    prompts = bench_dense.prompts_for(a.batch_size, a.prompt_len, config["vocab_size"])
    t0 = time.perf_counter()
    model = offload.run(a.store, budget=int(a.budget_bytes), offload_dir=a.offload_dir,
                        max_tokens=a.max_tokens, progress=False, device="cpu")
    base = {"contender": a.contender, "batch": a.batch_size, "load_s": time.perf_counter() - t0}
    snap = {}

    def before_timed():
        snap.update(offload.stats(model))

    res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                        before_timed=before_timed, last_logits_only=True)
    st = offload.stats(model)
    steps = max(res["tokens"], 1)
    timed = {"bytes_read_per_step": (st["bytes_read"]["disk"] - snap["bytes_read"]["disk"]) / steps,
             "stall_s_per_step": (st["stall_seconds"] - snap["stall_seconds"]) / steps}
    if "sparse" in st:
        timed["decode_s_per_step"] = (st["sparse"]["decode_seconds"]
                                      - snap["sparse"]["decode_seconds"]) / steps
    emit_result({**base, **res, "stats": st, "timed": timed})
    offload.close(model)


def main(a: argparse.Namespace) -> int:
    import offload
    from offload.sizes import parse_size

    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "tinyllama")
    dims = bench_dense.TOY if a.toy else bench_dense.FULL
    info = system_info(work)
    print("== offload sparse bench ==", flush=True)
    print("building/reusing the pruned model ...", file=sys.stderr, flush=True)
    model_dir = build_pruned(work, dims)
    stores = work / "stores"
    t0 = time.perf_counter()
    dense = offload.pack(str(model_dir), stores / "pruned-dense", progress=False)
    bitmap_store = offload.pack(str(model_dir), stores / "pruned-bitmap", sparse="bitmap",
                                progress=False)
    pack_s = time.perf_counter() - t0
    budget = parse_size(a.budget, total_bytes=dense.weight_bytes)
    max_tokens = bench_dense.max_tokens_for(1, a.prompt_len, a.tokens, a.warmup)
    plans = {name: offload.plan(str(m.path), budget, max_tokens=max_tokens, device="cpu",
                                offload_dir=str(stores))
             for name, m in (("dense", dense), ("bitmap", bitmap_store))}
    disk = disk_bandwidth(dense.data_path)
    rate = decode_rate(bitmap_store)
    idle = idle_footprint()
    cap = budget + idle + a.cap_slack
    capped, cg_reason = (False, "disabled by --no-cap") if a.no_cap else cgroup_status()
    print(format_header(info, [
        ("model", f"{'TOY ' if a.toy else 'TinyLlama-1.1B-shaped '}random bf16 Llama, every "
                  f"decoder projection pruned to {PRUNE:.0%} per row (magnitude): "
                  f"{fmt_bytes(dense.weight_bytes)} of weights; bitmap store "
                  f"{fmt_bytes(bitmap_store.data_bytes)} (packed both in {pack_s:.0f} s)"),
        ("budget", f"{a.budget} = {fmt_bytes(budget)}"),
        *cap_and_disk_rows(cap, idle, a.cap_slack, capped, cg_reason, None, disk),
        ("decode", f"prompt {a.prompt_len}, {a.warmup} warm-up, {a.tokens} timed tokens "
                   f"({a.accelerate_tokens} for Accelerate), greedy, batch 1"),
    ]), flush=True)
    print(f"\nbitmap plan:\n{plans['bitmap'].table()}\n", flush=True)

    common = ["--model-dir", str(model_dir), "--prompt-len", str(a.prompt_len),
              "--warmup", str(a.warmup), "--budget-bytes", str(budget), "--batch-size", "1",
              "--prefill-logits", "last"]
    runs = {}
    wanted = set(a.only.split(",")) if a.only else None

    def launch(key, contender, tokens, capped_run, extra=()):
        if wanted is not None and key not in wanted:
            return
        argv = [str(SCRIPT), "--contender", contender, "--n-tokens", str(tokens), *common,
                *extra]
        runs[key] = launch_contender(key, argv, cap_bytes=cap if capped_run else None,
                                     wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)

    launch("resident", "resident", a.tokens, False)
    launch("accelerate", "accelerate", a.accelerate_tokens, capped,
           ["--accelerate-offload-dir", str(work / "accelerate_offload_pruned")])
    for name, m in (("dense", dense), ("bitmap", bitmap_store)):
        launch(name, "offload-store", a.tokens, capped,
               ["--store", str(m.path), "--offload-dir", str(stores),
                "--max-tokens", str(max_tokens)])

    def res(key):
        r = runs.get(key)
        return r.results[0] if r is not None and r.ok else None

    ref, acc, dn, bm = res("resident"), res("accelerate"), res("dense"), res("bitmap")
    rows, json_rows = [], []
    labels = {"resident": "resident pruned (no cap)", "accelerate": "Accelerate disk offload",
              "dense": "offload, dense streaming", "bitmap": "offload, bitmap streaming"}
    for key, label in labels.items():
        if key not in runs:
            continue
        x, r = res(key), runs[key]
        if x is None:
            rows.append([label, "?", "-", "-", "-", f"failed rc {r.returncode}"])
            continue
        note = ""
        row = {"key": key, "contender": label, "tok_s": x["tok_s"], "capped": r.capped,
               "cap_bytes": r.cap_bytes}
        json_rows.append(row)
        if key in ("dense", "bitmap"):
            row.update(x["timed"])
            t, st = x["timed"], x["stats"]
            note = (f"reads {fmt_bytes(t['bytes_read_per_step'])}/token, stall "
                    f"{t['stall_s_per_step']:.2f} s/token"
                    + (f", decode {t['decode_s_per_step']:.3f} s/token (decode thread)"
                       if "decode_s_per_step" in t else "")
                    + f", peak {fmt_bytes(st['peak_bytes'])} of {fmt_bytes(st['budget_bytes'])}")
        if ref is not None and key != "resident":
            n = min(len(ref["generated"][0]), len(x["generated"][0]))
            same = ref["generated"][0][:n] == x["generated"][0][:n]
            row["tokens_match_resident"] = same
            note += f"{', ' if note else ''}{n} tokens {'==' if same else '!='} resident"
        rows.append([label, f"{x['tok_s']:.3f}",
                     f"{x['tok_s'] / acc['tok_s']:.2f}x" if acc else "-",
                     f"{x['tok_s'] / dn['tok_s']:.2f}x" if dn else "-",
                     fmt_bytes(r.cap_bytes) if r.capped else "uncapped", note])
    for name in ("dense", "bitmap"):
        floor = plans[name].streamed_bytes / disk["bps"]
        rows.append([f"I/O floor, {name}", f"{1 / floor:.3f}", "-", "-", "-",
                     f"{fmt_bytes(plans[name].streamed_bytes)}/token / "
                     f"{fmt_bytes(disk['bps'])}/s"])
    print(format_table(["contender", "tok/s", "vs Accel", "vs dense", "cap", "notes"], rows,
                       right={1, 2, 3}))
    print(f"\nCPU decode (C++, 1 thread, {rate['isa']}) of "
          f"{rate['unit']}: {fmt_bytes(rate['stored_bps'])}/s of stored bytes in, "
          f"{fmt_bytes(rate['dense_bps'])}/s dense out; disk {fmt_bytes(disk['bps'])}/s: "
          f"decode is {rate['stored_bps'] / disk['bps']:.1f}x the disk")
    print("  every path here: " + "; ".join(
        f"{isa} {fmt_bytes(p['stored_bps'])}/s in, {fmt_bytes(p['dense_bps'])}/s out"
        for isa, p in rate["paths"].items()))

    targets = []
    v = bm["tok_s"] / dn["tok_s"] if bm and dn else None
    targets.append({"target": f"bitmap streaming >= {TARGET_VS_DENSE}x dense streaming",
                    "value": v, "status": "N/A" if v is None else
                    ("PASS" if v >= TARGET_VS_DENSE else "SHORT")})
    v2 = rate["stored_bps"] / disk["bps"]
    targets.append({"target": "CPU decode faster than the disk", "value": v2,
                    "status": "PASS" if v2 > 1 else "SHORT"})
    print("\ntargets" + ("" if capped else " (UNCAPPED run: not a memory-limited measurement)"))
    for t in targets:
        val = "-" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"  {t['status']:<5}  {t['target']:<45} measured {val:>7}")
    out = {"bench": "sparse", "toy": a.toy, "args": vars(a), "system": info,
           "budget_bytes": budget, "cap_bytes": cap, "capped": capped, "disk": disk,
           "decode": rate, "plans": {k: p.to_json() for k, p in plans.items()},
           "contenders": {k: r.to_json() for k, r in runs.items()}, "rows": json_rows,
           "targets": targets}
    print(f"\nJSON: {write_json(Path(a.json), out)}")
    failed = [k for k, r in runs.items() if not r.ok]
    return 1 if failed else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, tokens=8, work_dir="/tmp/offload_bench",
                     json_path="bench_out/bench_sparse.json",
                     rows="resident, accelerate, dense, bitmap")
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-sizes", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prefetch", type=int, default=None, help=argparse.SUPPRESS)
    return bench_defaults(p.parse_args(argv), tokens=8)


if __name__ == "__main__":
    bench_entry(parse_args, contender_main, main)
