"""Dense bench: a TinyLlama-1.1B-shaped random bf16 model at a budget of 25% of its weights.

    .venv/bin/python benches/bench_dense.py              # the full bench (10-20 minutes)
    .venv/bin/python benches/bench_dense.py --toy        # a tiny model, well under a minute

Rows: the resident model (no cap: the compute floor), Hugging Face Accelerate disk offload at
the same budget and cap (``device_map`` with ``max_memory`` and ``offload_folder``), offload at
batch 1 and batch 8, and the I/O floor (bytes offload streams per token / the disk bandwidth
measured in this run with O_DIRECT).

A memory-limited machine is simulated honestly: every capped contender runs in its own memory
cgroup (``../shared/tools/memlimit.sh``) capped at the budget plus the interpreter's idle
footprint, so the page cache counts against it, and the page cache is dropped before each one.
Without root or cgroup v1 the contenders run uncapped and the output says so.

Targets (from the issue): offload >= 2.2x Accelerate at batch 1; offload's time per token
within 1.2x of max(resident time per token, I/O floor); batch 8 >= 6x batch-1 tokens/s.

Each contender runs in a subprocess (``bench_dense.py --contender NAME ...``) that loads its
model, prefills, decodes one untimed warm-up token, times N greedy decode tokens and prints one
``BENCH_RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BuiltModel, Machine, Report, bench_defaults, bench_entry, bench_parser, contender_row,
    device_reads, emit_result, fmt_bytes, greedy_decode, launch_contender, load_with_accelerate,
    positions_for, random_prompts, result_of, run_notes, same_tokens, save_random_checkpoint,
    system_info)

SCRIPT = Path(__file__).resolve()

# TinyLlama-1.1B's shape (about 2.2 GB of bf16 weights).
FULL = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
# A tiny model for CI: the whole bench in well under a minute. Layers are small next to the
# weights so a 25%-ish budget still has room for two staging slots and the KV reserve.
TOY = dict(hidden_size=256, num_hidden_layers=16, intermediate_size=512,
           num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)

TARGET_VS_ACCELERATE = 2.2
TARGET_OF_FLOOR = 1.2
TARGET_BATCH_SCALING = 6.0


# -- the model -------------------------------------------------------------------------------
def build_model(model_dir: Path, dims: dict, seed: int = 0) -> dict:
    """A random-init bf16 LlamaForCausalLM checkpoint (config.json + model.safetensors) at
    ``model_dir``, reused when its marker matches (``_common.save_random_checkpoint``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=False,
                         dtype="bfloat16")
    want = {"dims": dims, "seed": seed, "dtype": "bfloat16", "version": 1}
    return save_random_checkpoint(model_dir, config, LlamaForCausalLM, want, seed)


# -- contenders (run in a subprocess) ----------------------------------------------------------
def contender_main(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    model_dir = Path(a.model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    prompts = random_prompts(a.batch_size, a.prompt_len, config["vocab_size"])
    base = {"contender": a.contender, "batch": a.batch_size, "budget_bytes": a.budget_bytes}
    t0 = time.perf_counter()

    if a.contender == "resident":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model.eval()
        base["load_s"] = time.perf_counter() - t0
        for b in [int(x) for x in (a.batch_sizes or str(a.batch_size)).split(",")]:
            ids = random_prompts(b, a.prompt_len, config["vocab_size"])
            res = greedy_decode(model, ids, a.n_tokens, warmup_tokens=a.warmup,
                                last_logits_only=a.prefill_logits == "last")
            emit_result({**base, **res})

    elif a.contender == "accelerate":
        model, base["device_map"] = load_with_accelerate(model_dir, a.budget_bytes,
                                                         a.accelerate_offload_dir)
        base["load_s"] = time.perf_counter() - t0
        res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                            last_logits_only=a.prefill_logits == "last")
        emit_result({**base, **res})

    elif a.contender == "offload":
        import offload

        model = offload.run(str(model_dir), budget=int(a.budget_bytes), offload_dir=a.offload_dir,
                            max_tokens=a.max_tokens, prefetch=a.prefetch, progress=False)
        base["load_s"] = time.perf_counter() - t0
        snap = {}
        data_file = Path(a.offload_dir)  # the device of the store; refined below if possible
        for cand in Path(a.offload_dir).glob("*/units.bin"):
            data_file = cand

        def before_timed():
            snap.update(_flat_stats(offload.stats(model)))
            snap["_dev"] = device_reads(data_file)

        res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                            before_timed=before_timed,
                            last_logits_only=a.prefill_logits == "last")
        after = _flat_stats(offload.stats(model))
        timed = {k: after[k] - snap.get(k, 0) for k in
                 ("bytes_read", "io_seconds", "stall_seconds", "decode_tokens",
                  "decode_seconds", "fetches", "forwards")}
        steps = max(res["tokens"], 1)
        timed["bytes_read_per_step"] = timed["bytes_read"] / steps
        timed["stall_s_per_step"] = timed["stall_seconds"] / steps
        timed["io_s_per_step"] = timed["io_seconds"] / steps
        timed["overlap"] = (max(0.0, 1 - timed["stall_seconds"] / timed["io_seconds"])
                            if timed["io_seconds"] > 0 else 1.0)
        timed["io_bps"] = (timed["bytes_read"] / timed["io_seconds"]
                           if timed["io_seconds"] > 0 else 0.0)
        timed["read_bps"] = timed["bytes_read"] / res["decode_s"] if res["decode_s"] else 0.0
        dev0, dev1 = snap.get("_dev"), device_reads(data_file)
        if dev0 and dev1 and dev1[0] > dev0[0]:   # the whole device: other processes count too
            timed["device_requests"] = dev1[0] - dev0[0]
            timed["device_avg_request_bytes"] = (dev1[1] - dev0[1]) / (dev1[0] - dev0[0])
        emit_result({**base, **res, "stats": offload.stats(model), "timed": timed})
        offload.close(model)
    else:
        raise SystemExit(f"unknown contender {a.contender!r}")


def _flat_stats(st: dict) -> dict:
    out = dict(st)
    out["bytes_read"] = sum((st.get("bytes_read") or {}).values())
    return out


# -- the parent ------------------------------------------------------------------------------
@dataclass
class Setup(BuiltModel):
    """What the parent's steps share: the model, its store and plans, the disk and the cap."""

    manifest: object
    pack_s: float
    budget: int
    batches: list[int]
    plans: dict
    max_tokens: dict
    machine: Machine


def main(a: argparse.Namespace) -> int:
    s = setup(a)
    report = Report("dense", "offload dense bench", a, s.info)
    report.header(header_rows(a, s))
    print(f"\noffload plan at batch 1 (max_tokens {s.max_tokens[1]}):\n{s.plans[1].table()}\n",
          flush=True)
    runs = run_contenders(a, s)
    rows = contender_table(a, s, runs, report)
    dense_targets(a, s, runs, report)
    return report.finish(runs, {
        "model": {"dir": str(s.model_dir), "dims": s.dims, **s.model_info,
                  "store": str(s.manifest.path), "store_weight_bytes": s.manifest.weight_bytes,
                  "pack_seconds": s.pack_s},
        "budget": a.budget, "budget_bytes": s.budget, **s.machine.as_json(),
        "plans": {str(b): {**p.to_json(), "table": p.table()} for b, p in s.plans.items()},
        "rows": rows}, capped=s.machine.capped)


def setup(a: argparse.Namespace) -> Setup:
    """Build (or reuse) the model, pack it, plan both batches, measure disk and cap."""
    import torch  # noqa: F401  (the header reports its version)

    import offload
    from offload.sizes import parse_size

    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "tinyllama")
    dims = TOY if a.toy else FULL
    info = system_info(work)
    model_dir = work / "model"
    print(f"building/reusing the random bf16 model at {model_dir} ...", file=sys.stderr,
          flush=True)
    model_info = build_model(model_dir, dims)
    t0 = time.perf_counter()
    manifest = offload.pack(str(model_dir), offload_dir=str(work / "stores"), progress=False)
    pack_s = time.perf_counter() - t0
    budget = parse_size(a.budget, total_bytes=manifest.weight_bytes)
    batches = [1, a.batch]
    max_tokens = {b: positions_for(b, a.prompt_len, a.tokens, a.warmup) for b in batches}
    plans = {b: offload.plan(str(model_dir), budget, offload_dir=str(work / "stores"),
                             max_tokens=max_tokens[b], prefetch=a.prefetch) for b in batches}
    return Setup(work, dims, info, model_dir, model_info, manifest, pack_s, budget, batches,
                 plans, max_tokens, Machine.measure(a, budget, manifest.data_path))


def header_rows(a: argparse.Namespace, s: Setup) -> list[tuple[str, str]]:
    dims = s.dims
    model_desc = (f"random bf16 Llama, hidden {dims['hidden_size']}, {dims['num_hidden_layers']} "
                  f"layers, intermediate {dims['intermediate_size']}, "
                  f"{dims['num_attention_heads']}/{dims['num_key_value_heads']} heads, vocab "
                  f"{dims['vocab_size']}: {fmt_bytes(s.manifest.weight_bytes)} of weights"
                  + (" (TOY)" if a.toy else " (TinyLlama-1.1B shape)"))
    return [
        ("model", model_desc),
        ("budget", f"{a.budget} = {fmt_bytes(s.budget)}"),
        *s.machine.rows(a),
        ("decode", f"prompt {a.prompt_len} tokens, {a.warmup} untimed warm-up token(s), then "
                   f"{a.tokens} timed tokens ({a.accelerate_tokens} for Accelerate), greedy; "
                   + ("prefill keeps the last logits only (logits_to_keep=1, as generate() does)"
                      if a.prefill_logits == "last" else "prefill computes ALL logits "
                      "(--prefill-logits all: not what generate() does)")),
    ]


def run_contenders(a: argparse.Namespace, s: Setup) -> dict:
    """Each contender in its own process: resident (no cap), Accelerate and offload (capped)."""
    common = ["--model-dir", str(s.model_dir), "--prompt-len", str(a.prompt_len),
              "--prefill-logits", a.prefill_logits,
              "--warmup", str(a.warmup), "--budget-bytes", str(s.budget)]
    runs: dict[str, object] = {}
    wanted = set(a.only.split(",")) if a.only else None

    def launch(key, contender, batch, tokens, capped_run, extra=()):
        argv = [str(SCRIPT), "--contender", contender, "--batch-size", str(batch),
                "--n-tokens", str(tokens), *common, *extra]
        runs[key] = launch_contender(key, argv, cap_bytes=s.machine.cap_for(capped_run),
                                     wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)
        return runs[key]

    def want(key):
        return wanted is None or key in wanted

    res_batches = [b for b, k in ((1, "resident"), (a.batch, f"resident-b{a.batch}")) if want(k)]
    if res_batches:   # one process, one load, both batches
        r = launch("resident", "resident", res_batches[0], a.tokens, False,
                   ["--batch-sizes", ",".join(map(str, res_batches))])
        del runs["resident"]
        for b in res_batches:
            key = "resident" if b == 1 else f"resident-b{b}"
            runs[key] = dataclasses.replace(r, name=key,
                                            results=[x for x in r.results if x["batch"] == b])
    if want("accelerate"):
        launch("accelerate", "accelerate", 1, a.accelerate_tokens, True,
               ["--accelerate-offload-dir", str(s.work / "accelerate_offload")])
    for b in s.batches:
        key = f"offload-b{b}"
        if want(key):
            extra = ["--offload-dir", str(s.work / "stores"), "--max-tokens",
                     str(s.max_tokens[b])]
            if a.prefetch is not None:
                extra += ["--prefetch", str(a.prefetch)]
            launch(key, "offload", b, a.tokens, True, extra)
    return runs


def io_floor_s(s: Setup, batch: int) -> float:
    """Seconds per forward to read what the plan streams at the disk bandwidth measured."""
    return s.plans[batch].streamed_bytes / s.machine.disk["bps"]


def contender_table(a: argparse.Namespace, s: Setup, runs: dict, report: Report) -> list[dict]:
    """The table of every contender and the I/O floors; returns its rows as data."""
    resident_step = {1: (result_of(runs, "resident") or {}).get("s_per_step"),
                     a.batch: (result_of(runs, f"resident-b{a.batch}") or {}).get("s_per_step")}

    def floor_tok_s(b):
        parts = [io_floor_s(s, b)] + ([resident_step[b]] if resident_step.get(b) else [])
        return b / max(parts)

    acc = result_of(runs, "accelerate")
    acc_tok_s = acc["tok_s"] if acc else None
    rows, table_rows = [], []
    order = [("resident", "resident (no cap; compute floor)"),
             (f"resident-b{a.batch}", "resident (no cap)"),
             ("accelerate", "Accelerate disk offload"),
             ("offload-b1", "offload"),
             (f"offload-b{a.batch}", "offload")]
    for key, label in order:
        if key in runs:
            row, cells = _contender_row(a, runs, key, label, acc_tok_s, floor_tok_s)
            rows.append(row)
            table_rows.append(cells)
    for b in s.batches:
        tok_s = b / io_floor_s(s, b)
        rows.append({"key": f"io-floor-b{b}", "contender": "I/O floor", "batch": b,
                     "tok_s": tok_s, "s_per_token": 1 / tok_s,
                     "streamed_bytes": s.plans[b].streamed_bytes,
                     "disk_bps": s.machine.disk["bps"]})
        if b != 1 and not any(r.startswith(f"offload-b{b}") for r in runs):
            continue
        table_rows.append([
            "I/O floor", str(b), f"{tok_s:.3f}", f"{1 / tok_s:.3f}", f"{io_floor_s(s, b):.3f}",
            f"{tok_s / acc_tok_s:.2f}x" if acc_tok_s else "-", "-", "-", "-", "-",
            f"{fmt_bytes(s.plans[b].streamed_bytes)}/forward / "
            f"{fmt_bytes(s.machine.disk['bps'])}/s"])
    headers = ["contender", "batch", "tok/s", "s/token", "p50 s/step", "vs Accel", "of floor",
               "cap", "cgroup peak", "RSS peak", "notes"]
    report.table(headers, table_rows, right=set(range(1, 10)), note=(
        "tok/s and s/token are over all timed steps (mean); p50 s/step is the median step "
        "(robust to other processes); 'of floor' = tok/s / (batch / max(resident s/step at "
        "that batch, I/O floor s/forward)); 'cgroup peak' includes page cache."))
    return rows


def _contender_row(a, runs, key, label, acc_tok_s, floor_tok_s) -> tuple[dict, list[str]]:
    """One contender's data row and table cells."""
    row, failed = contender_row(runs, key, label)
    if failed is not None:
        return row, failed
    r, x = runs[key], result_of(runs, key)
    mem = r.memlimit or {}
    b = x["batch"]
    row.update(batch=b, tok_s=x["tok_s"], s_per_token=x["s_per_token"],
               s_per_step=x["s_per_step"], rss_peak_bytes=x.get("rss_peak_bytes"),
               vs_accelerate=(x["tok_s"] / acc_tok_s) if acc_tok_s else None,
               of_floor=x["tok_s"] / floor_tok_s(b))
    if key.startswith("offload"):
        t, st = x["timed"], x["stats"]
        note = (f"stall {t['stall_s_per_step']:.2f} s/step, overlap {t['overlap']:.2f}, "
                f"read {fmt_bytes(t['bytes_read_per_step'])}/step = "
                f"{fmt_bytes(t['read_bps'])}/s"
                + (f" in {t['device_avg_request_bytes'] / 1024:.0f} KiB disk requests"
                   if t.get("device_avg_request_bytes") else "")
                + f", peak {fmt_bytes(st['accounted_peak_bytes'])} of {fmt_bytes(st['budget_bytes'])}"
                + ("" if st.get("direct_io") else ", BUFFERED I/O"))
        row["offload_timed"], row["offload_stats"] = t, st
    elif key == "accelerate":
        dm = x.get("device_map", {})
        note = "map " + ", ".join(f"{d} {fmt_bytes(v['bytes'])}" for d, v in dm.items())
        row["device_map"] = dm
    else:
        note = f"load {x.get('load_s', 0):.1f} s"
    ref = result_of(runs, "resident" if b == 1 else f"resident-b{a.batch}")
    match = same_tokens(ref, x) if not key.startswith("resident") else None
    if match is not None:
        row["tokens_match_resident"] = match[0]
        note += f", {match[1]} tokens {'==' if match[0] else '!='} resident"
    note += "".join(f", {n}" for n in run_notes(r, x))
    row["foreign_cpu"], row["note"] = r.foreign_cpu, note
    return row, [
        label, str(b), f"{x['tok_s']:.3f}", f"{x['s_per_token']:.3f}",
        f"{x['median_s_per_step']:.3f}",
        f"{row['vs_accelerate']:.2f}x" if row["vs_accelerate"] else "-",
        f"{row['of_floor']:.2f}", fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
        fmt_bytes(mem.get("max_usage")) if mem else "-",
        fmt_bytes(x.get("rss_peak_bytes")), note]


def dense_targets(a: argparse.Namespace, s: Setup, runs: dict, report: Report) -> None:
    """The issue's goals: against Accelerate, against the floor, batch scaling."""
    o1, ob = result_of(runs, "offload-b1"), result_of(runs, f"offload-b{a.batch}")
    r1, acc = result_of(runs, "resident"), result_of(runs, "accelerate")
    v = o1["tok_s"] / acc["tok_s"] if (o1 and acc) else None
    report.target(f"offload >= {TARGET_VS_ACCELERATE}x Accelerate at batch 1", v,
                  TARGET_VS_ACCELERATE,
                  f"{o1['tok_s']:.3f} vs {acc['tok_s']:.3f} tok/s" if v is not None else "",
                  runs=runs, needs=("offload-b1", "accelerate"))
    floor = max(io_floor_s(s, 1), r1["s_per_step"]) if r1 else io_floor_s(s, 1)
    v = o1["s_per_token"] / floor if o1 else None
    report.target(f"time per token <= {TARGET_OF_FLOOR}x max(resident, I/O floor)", v,
                  TARGET_OF_FLOOR,
                  (f"{o1['s_per_token']:.3f} s vs floor {floor:.3f} s (resident "
                   f"{r1['s_per_step']:.3f} s, I/O {io_floor_s(s, 1):.3f} s)" if o1 and r1 else
                   f"I/O floor {io_floor_s(s, 1):.3f} s; resident row missing") if o1 else "",
                  runs=runs, needs=("offload-b1",), at_most=True)
    v = ob["tok_s"] / o1["tok_s"] if (o1 and ob) else None
    report.target(f"batch {a.batch} >= {TARGET_BATCH_SCALING}x batch-1 tok/s", v,
                  TARGET_BATCH_SCALING,
                  f"{ob['tok_s']:.3f} vs {o1['tok_s']:.3f} tok/s" if v is not None else "",
                  runs=runs, needs=("offload-b1", f"offload-b{a.batch}"))


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, tokens=8, work_dir="/tmp/offload_bench",
                     json_path="bench_out/bench_dense.json",
                     rows="resident, resident-b8, accelerate, offload-b1, offload-b8")
    p.add_argument("--batch", type=int, default=8, help="the large batch (default 8)")
    p.add_argument("--prefetch", type=int, default=None, help="offload prefetch depth")
    p.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-sizes", default=None, help=argparse.SUPPRESS)
    return bench_defaults(p.parse_args(argv), tokens=8)


if __name__ == "__main__":
    bench_entry(parse_args, contender_main, main)
