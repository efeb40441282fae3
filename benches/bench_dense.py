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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    bench_entry, bench_defaults, bench_parser, cap_and_disk_rows, cgroup_status,
    device_reads, disk_bandwidth, emit_result, fmt_bytes, format_header, format_table,
    greedy_decode, idle_footprint, idle_footprint_cgroup, launch_contender, load_with_accelerate,
    save_random_checkpoint, system_info, write_json)

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


def prompts_for(batch: int, length: int, vocab: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g, dtype=torch.long)


def max_tokens_for(batch: int, prompt_len: int, tokens: int, warmup: int) -> int:
    """Positions (batch x context) the offload runtime must reserve KV cache for."""
    return batch * (prompt_len + 1 + warmup + tokens + 1)


# -- contenders (run in a subprocess) ----------------------------------------------------------
def contender_main(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    model_dir = Path(a.model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    prompts = prompts_for(a.batch_size, a.prompt_len, config["vocab_size"])
    base = {"contender": a.contender, "batch": a.batch_size, "budget_bytes": a.budget_bytes}
    t0 = time.perf_counter()

    if a.contender == "resident":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model.eval()
        base["load_s"] = time.perf_counter() - t0
        for b in [int(x) for x in (a.batch_sizes or str(a.batch_size)).split(",")]:
            ids = prompts_for(b, a.prompt_len, config["vocab_size"])
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
def main(a: argparse.Namespace) -> int:
    import torch  # noqa: F401  (the header reports its version)

    import offload
    from offload.sizes import parse_size

    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "tinyllama")
    dims = TOY if a.toy else FULL
    budget_arg = a.budget or "25%"
    info = system_info(work)

    print("== offload dense bench ==", flush=True)
    model_dir = work / "model"
    print(f"building/reusing the random bf16 model at {model_dir} ...", file=sys.stderr,
          flush=True)
    model_info = build_model(model_dir, dims)
    t0 = time.perf_counter()
    manifest = offload.pack(str(model_dir), offload_dir=str(work / "stores"), progress=False)
    pack_s = time.perf_counter() - t0
    weight_bytes = manifest.weight_bytes
    budget = parse_size(budget_arg, total_bytes=weight_bytes)

    batches = [1, a.batch]
    plans, max_tokens = {}, {}
    for b in batches:
        max_tokens[b] = max_tokens_for(b, a.prompt_len, a.tokens, a.warmup)
        plans[b] = offload.plan(str(model_dir), budget, offload_dir=str(work / "stores"),
                                max_tokens=max_tokens[b], prefetch=a.prefetch)

    disk = disk_bandwidth(manifest.data_path)
    idle = idle_footprint()
    cap = budget + idle + a.cap_slack
    capped, cg_reason = (False, "disabled by --no-cap") if a.no_cap else cgroup_status()
    idle_cg = idle_footprint_cgroup() if capped and not a.toy else None

    model_desc = (f"random bf16 Llama, hidden {dims['hidden_size']}, {dims['num_hidden_layers']} "
                  f"layers, intermediate {dims['intermediate_size']}, "
                  f"{dims['num_attention_heads']}/{dims['num_key_value_heads']} heads, vocab "
                  f"{dims['vocab_size']}: {fmt_bytes(weight_bytes)} of weights"
                  + (" (TOY)" if a.toy else " (TinyLlama-1.1B shape)"))
    print(format_header(info, [
        ("model", model_desc),
        ("budget", f"{budget_arg} = {fmt_bytes(budget)}"),
        *cap_and_disk_rows(cap, idle, a.cap_slack, capped, cg_reason, idle_cg, disk),
        ("decode", f"prompt {a.prompt_len} tokens, {a.warmup} untimed warm-up token(s), then "
                   f"{a.tokens} timed tokens ({a.accelerate_tokens} for Accelerate), greedy; "
                   + ("prefill keeps the last logits only (logits_to_keep=1, as generate() does)"
                      if a.prefill_logits == "last" else "prefill computes ALL logits "
                      "(--prefill-logits all: not what generate() does)")),
    ]), flush=True)
    print(f"\noffload plan at batch 1 (max_tokens {max_tokens[1]}):\n{plans[1].table()}\n",
          flush=True)

    common = ["--model-dir", str(model_dir), "--prompt-len", str(a.prompt_len),
              "--prefill-logits", a.prefill_logits,
              "--warmup", str(a.warmup), "--budget-bytes", str(budget)]
    runs: dict[str, object] = {}

    def launch(key, contender, batch, tokens, capped_run, extra=()):
        argv = [str(SCRIPT), "--contender", contender, "--batch-size", str(batch),
                "--n-tokens", str(tokens), *common, *extra]
        runs[key] = launch_contender(key, argv, cap_bytes=cap if capped_run else None,
                                     wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)
        return runs[key]

    wanted = set(a.only.split(",")) if a.only else None

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
        launch("accelerate", "accelerate", 1, a.accelerate_tokens, capped,
               ["--accelerate-offload-dir", str(work / "accelerate_offload")])
    for b in batches:
        key = f"offload-b{b}"
        if want(key):
            extra = ["--offload-dir", str(work / "stores"), "--max-tokens", str(max_tokens[b])]
            if a.prefetch is not None:
                extra += ["--prefetch", str(a.prefetch)]
            launch(key, "offload", b, a.tokens, capped, extra)

    # -- the table ---------------------------------------------------------------------------
    def res(key):
        r = runs.get(key)
        return r.results[0] if r is not None and r.ok else None

    io_floor_s = {b: plans[b].streamed_bytes / disk["bps"] for b in batches}  # s per forward
    resident_step = {1: (res("resident") or {}).get("s_per_step"),
                     a.batch: (res(f"resident-b{a.batch}") or {}).get("s_per_step")}

    def floor_tok_s(b):
        parts = [io_floor_s[b]] + ([resident_step[b]] if resident_step.get(b) else [])
        return b / max(parts)

    acc = res("accelerate")
    acc_tok_s = acc["tok_s"] if acc else None
    rows, table_rows = [], []
    order = [("resident", "resident (no cap; compute floor)"),
             (f"resident-b{a.batch}", "resident (no cap)"),
             ("accelerate", "Accelerate disk offload"),
             ("offload-b1", "offload"),
             (f"offload-b{a.batch}", "offload")]
    for key, label in order:
        if key not in runs:
            continue
        r = runs[key]
        x = res(key)
        mem = r.memlimit or {}
        row = {"key": key, "contender": label, "ok": r.ok, "capped": r.capped,
               "cap_bytes": r.cap_bytes, "cgroup_max_usage": mem.get("max_usage"),
               "cgroup_failcnt": mem.get("failcnt"), "returncode": r.returncode}
        if x is None:
            why = "killed at the cap (OOM)" if r.killed else f"failed rc {r.returncode}"
            row.update(batch=None, tok_s=None, note=why)
            table_rows.append([label, "?", "-", "-", "-", "-", "-",
                               fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
                               fmt_bytes(mem.get("max_usage")), "-", why])
            rows.append(row)
            continue
        b = x["batch"]
        row.update(batch=b, tok_s=x["tok_s"], s_per_token=x["s_per_token"],
                   s_per_step=x["s_per_step"], rss_peak_bytes=x.get("rss_peak_bytes"),
                   vs_accelerate=(x["tok_s"] / acc_tok_s) if acc_tok_s else None,
                   of_floor=x["tok_s"] / floor_tok_s(b))
        note = ""
        if key.startswith("offload"):
            t, st = x["timed"], x["stats"]
            note = (f"stall {t['stall_s_per_step']:.2f} s/step, overlap {t['overlap']:.2f}, "
                    f"read {fmt_bytes(t['bytes_read_per_step'])}/step = "
                    f"{fmt_bytes(t['read_bps'])}/s"
                    + (f" in {t['device_avg_request_bytes'] / 1024:.0f} KiB disk requests"
                       if t.get("device_avg_request_bytes") else "")
                    + f", peak {fmt_bytes(st['peak_bytes'])} of "
                    f"{fmt_bytes(st['budget_bytes'])}"
                    + ("" if st.get("direct_io") else ", BUFFERED I/O"))
            row["offload_timed"], row["offload_stats"] = t, st
        elif key == "accelerate":
            dm = x.get("device_map", {})
            note = "map " + ", ".join(f"{d} {fmt_bytes(v['bytes'])}" for d, v in dm.items())
            row["device_map"] = dm
        else:
            note = f"load {x.get('load_s', 0):.1f} s"
        ref = res("resident") if b == 1 else res(f"resident-b{a.batch}")
        if ref is not None and not key.startswith("resident"):
            n = min(len(ref["generated"][0]), len(x["generated"][0]))
            same = [g[:n] for g in ref["generated"]] == [g[:n] for g in x["generated"]]
            row["tokens_match_resident"] = same
            note += f", {n} tokens {'==' if same else '!='} resident"
        if r.memlimit and r.memlimit.get("failcnt"):
            note += f", cgroup at its limit {r.memlimit['failcnt']}x"
        if x.get("major_faults"):
            note += f", {x['major_faults'] / max(x['tokens'], 1):.0f} major faults/step"
        if r.foreign_cpu is not None and r.foreign_cpu > 0.05:
            note += f", OTHER PROCESSES used {r.foreign_cpu:.0%} of the CPUs"
        row["foreign_cpu"] = r.foreign_cpu
        row["note"] = note
        rows.append(row)
        table_rows.append([
            label, str(b), f"{x['tok_s']:.3f}", f"{x['s_per_token']:.3f}",
            f"{x['median_s_per_step']:.3f}",
            f"{row['vs_accelerate']:.2f}x" if row["vs_accelerate"] else "-",
            f"{row['of_floor']:.2f}", fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
            fmt_bytes(mem.get("max_usage")) if mem else "-",
            fmt_bytes(x.get("rss_peak_bytes")), note])
    for b in batches:
        tok_s = b / io_floor_s[b]
        rows.append({"key": f"io-floor-b{b}", "contender": "I/O floor", "batch": b,
                     "tok_s": tok_s, "s_per_token": 1 / tok_s,
                     "streamed_bytes": plans[b].streamed_bytes, "disk_bps": disk["bps"]})
        if b != 1 and not any(r.startswith(f"offload-b{b}") for r in runs):
            continue
        table_rows.append([
            "I/O floor", str(b), f"{tok_s:.3f}", f"{1 / tok_s:.3f}", f"{io_floor_s[b]:.3f}",
            f"{tok_s / acc_tok_s:.2f}x" if acc_tok_s else "-", "-", "-", "-", "-",
            f"{fmt_bytes(plans[b].streamed_bytes)}/forward / {fmt_bytes(disk['bps'])}/s"])

    headers = ["contender", "batch", "tok/s", "s/token", "p50 s/step", "vs Accel", "of floor",
               "cap", "cgroup peak", "RSS peak", "notes"]
    print("\n" + format_table(headers, table_rows, right=set(range(1, 10))))
    print("\ntok/s and s/token are over all timed steps (mean); p50 s/step is the median step "
          "(robust to other processes); 'of floor' = tok/s / (batch / max(resident s/step at "
          "that batch, I/O floor s/forward)); 'cgroup peak' includes page cache.")

    # -- the targets -------------------------------------------------------------------------
    targets = []
    o1, ob = res("offload-b1"), res(f"offload-b{a.batch}")
    r1 = res("resident")

    killed = [k for k in ("accelerate", "offload-b1", f"offload-b{a.batch}")
              if k in runs and runs[k].killed]

    def target(name, value, goal, ok, detail):
        status = "N/A" if value is None else ("PASS" if ok else "SHORT")
        if value is None and any(k.startswith("offload") for k in killed):
            status = "FAIL"
            detail = f"{detail}: {', '.join(killed)} killed at the memory cap"
        targets.append({"target": name, "value": value, "goal": goal, "status": status,
                        "detail": detail})

    v = o1["tok_s"] / acc_tok_s if (o1 and acc_tok_s) else None
    target(f"offload >= {TARGET_VS_ACCELERATE}x Accelerate at batch 1", v,
           TARGET_VS_ACCELERATE, v is not None and v >= TARGET_VS_ACCELERATE,
           f"{o1['tok_s']:.3f} vs {acc_tok_s:.3f} tok/s" if v is not None else "missing rows")
    floor_s = max(io_floor_s[1], r1["s_per_step"]) if r1 else io_floor_s[1]
    v = o1["s_per_token"] / floor_s if o1 else None
    target(f"time per token <= {TARGET_OF_FLOOR}x max(resident, I/O floor)", v, TARGET_OF_FLOOR,
           v is not None and v <= TARGET_OF_FLOOR,
           (f"{o1['s_per_token']:.3f} s vs floor {floor_s:.3f} s (resident "
            f"{r1['s_per_step']:.3f} s, I/O {io_floor_s[1]:.3f} s)"
            if o1 and r1 else f"I/O floor {io_floor_s[1]:.3f} s; resident row missing")
           if o1 else "missing rows")
    v = ob["tok_s"] / o1["tok_s"] if (o1 and ob) else None
    target(f"batch {a.batch} >= {TARGET_BATCH_SCALING}x batch-1 tok/s", v, TARGET_BATCH_SCALING,
           v is not None and v >= TARGET_BATCH_SCALING,
           f"{ob['tok_s']:.3f} vs {o1['tok_s']:.3f} tok/s" if v is not None else "missing rows")
    print("\ntargets" + ("" if capped else " (UNCAPPED run: not a memory-limited measurement)"))
    for t in targets:
        val = "-" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"  {t['status']:<5}  {t['target']:<52} measured {val:>7}   {t['detail']}")

    out = {
        "bench": "dense", "toy": a.toy, "args": vars(a), "system": info,
        "model": {"dir": str(model_dir), "dims": dims, **model_info,
                  "store": str(manifest.path), "store_weight_bytes": weight_bytes,
                  "pack_seconds": pack_s},
        "budget": budget_arg, "budget_bytes": budget, "idle_bytes": idle,
        "idle_cgroup_bytes": idle_cg, "cap_bytes": cap,
        "capped": capped, "cgroup": cg_reason, "disk": disk,
        "plans": {str(b): {**plans[b].to_json(), "table": plans[b].table()} for b in batches},
        "contenders": {k: r.to_json() for k, r in runs.items()},
        "rows": rows, "targets": targets,
    }
    path = write_json(Path(a.json), out)
    print(f"\nJSON: {path}")
    failed = [k for k, r in runs.items() if not r.ok]
    if failed:
        print(f"contenders that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


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
