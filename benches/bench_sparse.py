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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dense  # noqa: E402
from _common import (  # noqa: E402
    Machine, Report, bench_defaults, bench_entry, bench_parser, emit_result, fmt_bytes,
    launch_contender, offload_decode, positions_for, random_prompts, result_of, same_tokens,
    system_info)

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
    want = {"source": json.loads((src / "bench_model.json").read_text())
            if (src / "bench_model.json").exists() else str(src), "prune": PRUNE,
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
    prompts = random_prompts(a.batch_size, a.prompt_len, config["vocab_size"])
    t0 = time.perf_counter()
    model = offload.run(a.store, budget=int(a.budget_bytes), offload_dir=a.offload_dir,
                        max_tokens=a.max_tokens, progress=False, device="cpu")
    base = {"contender": a.contender, "batch": a.batch_size, "load_s": time.perf_counter() - t0}
    res, snap, st = offload_decode(model, prompts, a.n_tokens, a.warmup)
    steps = max(res["tokens"], 1)
    timed = {"bytes_read_per_step": (st["bytes_read"]["disk"] - snap["bytes_read"]["disk"]) / steps,
             "stall_s_per_step": (st["stall_seconds"] - snap["stall_seconds"]) / steps}
    if "sparse" in st:
        timed["decode_s_per_step"] = (st["sparse"]["decode_seconds"]
                                      - snap["sparse"]["decode_seconds"]) / steps
    emit_result({**base, **res, "stats": st, "timed": timed})
    offload.close(model)


@dataclass
class Setup:
    """What the parent's steps share: the pruned model, its dense and bitmap stores and plans,
    the measured decode and disk, the cap."""

    work: Path
    info: dict
    model_dir: Path
    stores: Path
    dense: object
    bitmap: object
    pack_s: float
    budget: int
    max_tokens: int
    plans: dict
    rate: dict
    machine: Machine


def main(a: argparse.Namespace) -> int:
    s = setup(a)
    report = Report("sparse", "offload sparse bench", a, s.info)
    report.header(header_rows(a, s))
    print(f"\nbitmap plan:\n{s.plans['bitmap'].table()}\n", flush=True)
    runs = run_contenders(a, s)
    rows = contender_table(s, runs, report)
    sparse_targets(s, runs, report)
    return report.finish(runs, {
        "budget_bytes": s.budget, **s.machine.as_json(), "decode": s.rate,
        "plans": {k: p.to_json() for k, p in s.plans.items()}, "rows": rows},
        capped=s.machine.capped)


def setup(a: argparse.Namespace) -> Setup:
    """Build (or reuse) the pruned model, pack it dense and as bitmaps, plan both, measure the
    decode on every CPU path, the disk and the cap."""
    import offload
    from offload.sizes import parse_size

    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "tinyllama")
    info = system_info(work)
    print("building/reusing the pruned model ...", file=sys.stderr, flush=True)
    model_dir = build_pruned(work, bench_dense.TOY if a.toy else bench_dense.FULL)
    stores = work / "stores"
    t0 = time.perf_counter()
    dense = offload.pack(str(model_dir), stores / "pruned-dense", progress=False)
    bitmap_store = offload.pack(str(model_dir), stores / "pruned-bitmap", sparse="bitmap",
                                progress=False)
    pack_s = time.perf_counter() - t0
    budget = parse_size(a.budget, total_bytes=dense.weight_bytes)
    max_tokens = positions_for(1, a.prompt_len, a.tokens, a.warmup)
    plans = {name: offload.plan(str(m.path), budget, max_tokens=max_tokens, device="cpu",
                                offload_dir=str(stores))
             for name, m in (("dense", dense), ("bitmap", bitmap_store))}
    return Setup(work, info, model_dir, stores, dense, bitmap_store, pack_s, budget, max_tokens,
                 plans, decode_rate(bitmap_store),
                 Machine.measure(a, budget, dense.data_path, cgroup_idle=False))


def header_rows(a: argparse.Namespace, s: Setup) -> list[tuple[str, str]]:
    return [
        ("model", f"{'TOY ' if a.toy else 'TinyLlama-1.1B-shaped '}random bf16 Llama, every "
                  f"decoder projection pruned to {PRUNE:.0%} per row (magnitude): "
                  f"{fmt_bytes(s.dense.weight_bytes)} of weights; bitmap store "
                  f"{fmt_bytes(s.bitmap.data_bytes)} (packed both in {s.pack_s:.0f} s)"),
        ("budget", f"{a.budget} = {fmt_bytes(s.budget)}"),
        *s.machine.rows(a),
        ("decode", f"prompt {a.prompt_len}, {a.warmup} warm-up, {a.tokens} timed tokens "
                   f"({a.accelerate_tokens} for Accelerate), greedy, batch 1"),
    ]


def run_contenders(a: argparse.Namespace, s: Setup) -> dict:
    common = ["--model-dir", str(s.model_dir), "--prompt-len", str(a.prompt_len),
              "--warmup", str(a.warmup), "--budget-bytes", str(s.budget), "--batch-size", "1",
              "--prefill-logits", "last"]
    runs = {}
    wanted = set(a.only.split(",")) if a.only else None

    def launch(key, contender, tokens, capped_run, extra=()):
        if wanted is not None and key not in wanted:
            return
        argv = [str(SCRIPT), "--contender", contender, "--n-tokens", str(tokens), *common,
                *extra]
        runs[key] = launch_contender(key, argv, cap_bytes=s.machine.cap_for(capped_run),
                                     wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)

    launch("resident", "resident", a.tokens, False)
    launch("accelerate", "accelerate", a.accelerate_tokens, True,
           ["--accelerate-offload-dir", str(s.work / "accelerate_offload_pruned")])
    for name, m in (("dense", s.dense), ("bitmap", s.bitmap)):
        launch(name, "offload-store", a.tokens, True,
               ["--store", str(m.path), "--offload-dir", str(s.stores),
                "--max-tokens", str(s.max_tokens)])
    return runs


def contender_table(s: Setup, runs: dict, report: Report) -> list[dict]:
    ref, acc, dn = (result_of(runs, k) for k in ("resident", "accelerate", "dense"))
    rows, json_rows = [], []
    labels = {"resident": "resident pruned (no cap)", "accelerate": "Accelerate disk offload",
              "dense": "offload, dense streaming", "bitmap": "offload, bitmap streaming"}
    for key, label in labels.items():
        if key not in runs:
            continue
        x, r = result_of(runs, key), runs[key]
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
                    + f", peak {fmt_bytes(st['accounted_peak_bytes'])} of {fmt_bytes(st['budget_bytes'])}")
        match = same_tokens(ref, x) if key != "resident" else None
        if match is not None:
            row["tokens_match_resident"] = match[0]
            note += f"{', ' if note else ''}{match[1]} tokens {'==' if match[0] else '!='} " \
                    "resident"
        rows.append([label, f"{x['tok_s']:.3f}",
                     f"{x['tok_s'] / acc['tok_s']:.2f}x" if acc else "-",
                     f"{x['tok_s'] / dn['tok_s']:.2f}x" if dn else "-",
                     fmt_bytes(r.cap_bytes) if r.capped else "uncapped", note])
    for name in ("dense", "bitmap"):
        floor = s.plans[name].streamed_bytes / s.machine.disk["bps"]
        rows.append([f"I/O floor, {name}", f"{1 / floor:.3f}", "-", "-", "-",
                     f"{fmt_bytes(s.plans[name].streamed_bytes)}/token / "
                     f"{fmt_bytes(s.machine.disk['bps'])}/s"])
    rate, disk = s.rate, s.machine.disk
    report.table(["contender", "tok/s", "vs Accel", "vs dense", "cap", "notes"], rows,
                 right={1, 2, 3}, note=(
                     f"CPU decode (C++, 1 thread, {rate['isa']}) of {rate['unit']}: "
                     f"{fmt_bytes(rate['stored_bps'])}/s of stored bytes in, "
                     f"{fmt_bytes(rate['dense_bps'])}/s dense out; disk "
                     f"{fmt_bytes(disk['bps'])}/s: decode is "
                     f"{rate['stored_bps'] / disk['bps']:.1f}x the disk\n  every path here: "
                     + "; ".join(f"{isa} {fmt_bytes(p['stored_bps'])}/s in, "
                                 f"{fmt_bytes(p['dense_bps'])}/s out"
                                 for isa, p in rate["paths"].items())))
    return json_rows


def sparse_targets(s: Setup, runs: dict, report: Report) -> None:
    bm, dn = result_of(runs, "bitmap"), result_of(runs, "dense")
    v = bm["tok_s"] / dn["tok_s"] if bm and dn else None
    report.target(f"bitmap streaming >= {TARGET_VS_DENSE}x dense streaming", v, TARGET_VS_DENSE,
                  f"{bm['tok_s']:.3f} vs {dn['tok_s']:.3f} tok/s" if v is not None else "",
                  runs=runs, needs=("bitmap", "dense"))
    v = s.rate["stored_bps"] / s.machine.disk["bps"]
    report.target("CPU decode faster than the disk", v, 1.0,
                  f"{s.rate['isa']}: {fmt_bytes(s.rate['stored_bps'])}/s", runs=runs)


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
