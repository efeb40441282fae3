"""Accelerate hook bench: one Accelerate loader, before and after the one-line change.

    .venv/bin/python benches/bench_accelerate_hook.py          # the full bench (~5 minutes)
    .venv/bin/python benches/bench_accelerate_hook.py --toy    # a tiny model, well under a minute

Both contenders load the TinyLlama-shaped random bf16 model of ``bench_dense.py`` the same way:
``AutoModelForCausalLM.from_pretrained(dir, device_map="auto", max_memory={"cpu": budget},
offload_folder=...)`` with the budget at 25% of the weights. The second adds one line,
``model = offload.from_accelerate(model, budget=budget)``. Each runs in its own process under
the same memory cap (``../shared/tools/memlimit.sh``: budget plus the idle interpreter, page
cache included and dropped before each). The first take-over packs offload's store beside
Accelerate's offload folder (its time is reported as load time); later runs reuse it.

Target (from the issue): >= 2x the tokens/s of the Accelerate-only run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dense  # noqa: E402
from _common import (  # noqa: E402
    Machine, Report, bench_defaults, bench_entry, bench_parser, emit_result, fmt_bytes,
    greedy_decode, launch_contender, load_with_accelerate, positions_for, random_prompts,
    result_of, same_tokens, system_info)

SCRIPT = Path(__file__).resolve()
TARGET = 2.0


def contender_main(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    config = json.loads((Path(a.model_dir) / "config.json").read_text())
    prompts = random_prompts(1, a.prompt_len, config["vocab_size"])
    t0 = time.perf_counter()
    model, dm = load_with_accelerate(a.model_dir, a.budget_bytes, a.accelerate_offload_dir)
    base = {"contender": a.contender, "batch": 1, "device_map": dm,
            "accelerate_load_s": time.perf_counter() - t0}
    if a.contender == "hook":
        import offload

        t1 = time.perf_counter()
        model = offload.from_accelerate(model, budget=int(a.budget_bytes),   # the one line
                                        max_tokens=a.max_tokens, progress=False)
        base["takeover_s"] = time.perf_counter() - t1
    res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup)
    extra = {}
    if a.contender == "hook":
        import offload

        st = offload.stats(model)
        extra = {"stats": st, "store": str(model._offload_runtime.manifest.path)}
        offload.close(model)
    emit_result({**base, **res, **extra})


def main(a: argparse.Namespace) -> int:
    from offload.sizes import parse_size

    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "tinyllama")
    report = Report("accelerate_hook", "offload Accelerate-hook bench", a, system_info(work))
    model_dir = work / "model"
    bench_dense.build_model(model_dir, bench_dense.TOY if a.toy else bench_dense.FULL)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    budget = parse_size(a.budget, total_bytes=weights)
    machine = Machine.measure(a, budget, next(model_dir.glob("*.safetensors")),
                              cgroup_idle=False)
    report.header([
        ("model", f"{'TOY ' if a.toy else 'TinyLlama-1.1B-shaped '}random bf16 Llama: "
                  f"{fmt_bytes(weights)} of safetensors"),
        ("budget", f"{a.budget} = {fmt_bytes(budget)} (Accelerate's max_memory and offload's "
                   "budget)"),
        *machine.rows(a),
        ("decode", f"prompt {a.prompt_len}, {a.warmup} warm-up, {a.tokens} timed tokens, greedy"),
    ])
    runs = run_contenders(a, work, model_dir, budget, machine.cap_for(True))
    rows = contender_table(runs, report)
    acc, hook = result_of(runs, "accelerate"), result_of(runs, "hook")
    v = hook["tok_s"] / acc["tok_s"] if hook and acc else None
    report.target(f"one-line change >= {TARGET}x Accelerate tok/s", v, TARGET,
                  f"I/O floor for reference: {fmt_bytes(machine.disk['bps'])}/s disk",
                  runs=runs, needs=("accelerate", "hook"))
    return report.finish(runs, {"budget_bytes": budget, **machine.as_json(), "rows": rows},
                         capped=machine.capped)


def run_contenders(a: argparse.Namespace, work: Path, model_dir: Path, budget: int,
                   cap: int | None) -> dict:
    """Accelerate alone, then the same loader plus the one line, each in its own process."""
    max_tokens = positions_for(1, a.prompt_len, a.tokens, a.warmup)
    runs = {}
    for key in ("accelerate", "hook"):
        if a.only and key not in a.only.split(","):
            continue
        folder = work / f"accelerate_offload_{key}"
        argv = [str(SCRIPT), "--contender", key, "--n-tokens", str(a.tokens),
                "--model-dir", str(model_dir), "--prompt-len", str(a.prompt_len),
                "--warmup", str(a.warmup), "--budget-bytes", str(budget),
                "--max-tokens", str(max_tokens), "--accelerate-offload-dir", str(folder)]
        runs[key] = launch_contender(key, argv, cap_bytes=cap, wait_quiet=a.wait_quiet,
                                     timeout=a.timeout, quiet=a.quiet)
    return runs


def contender_table(runs: dict, report: Report) -> list[dict]:
    acc = result_of(runs, "accelerate")
    rows, json_rows = [], []
    for key, label in (("accelerate", "Accelerate (device_map='auto' + offload_folder)"),
                       ("hook", "same + offload.from_accelerate(model)")):
        if key not in runs:
            continue
        x, r = result_of(runs, key), runs[key]
        if x is None:
            rows.append([label, "?", "-", "-", f"failed rc {r.returncode}"])
            continue
        dm = x["device_map"]
        note = "map " + ", ".join(f"{d} {fmt_bytes(v['bytes'])}" for d, v in dm.items())
        row = {"key": key, "tok_s": x["tok_s"], "capped": r.capped}
        if key == "hook":
            st = x["stats"]
            note += (f"; take-over {x['takeover_s']:.1f} s (packs the store the first time), "
                     f"peak {fmt_bytes(st['accounted_peak_bytes'])} of {fmt_bytes(st['budget_bytes'])}, "
                     f"stall {st['stall_seconds'] / max(st['decode_tokens'], 1):.2f} s/token")
            match = same_tokens(acc, x)
            if match is not None:
                row["tokens_match"] = match[0]
                note += f", {match[1]} tokens {'==' if match[0] else '!='} Accelerate's"
        json_rows.append(row)
        rows.append([label, f"{x['tok_s']:.3f}",
                     f"{x['tok_s'] / acc['tok_s']:.2f}x" if acc else "-",
                     fmt_bytes(r.cap_bytes) if r.capped else "uncapped", note])
    report.table(["contender", "tok/s", "vs before", "cap", "notes"], rows, right={1, 2})
    return json_rows


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, tokens=8, work_dir="/tmp/offload_bench",
                     json_path="bench_out/bench_accelerate_hook.json", rows="accelerate, hook")
    return bench_defaults(p.parse_args(argv), tokens=8)


if __name__ == "__main__":
    bench_entry(parse_args, contender_main, main)
