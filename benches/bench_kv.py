"""KV bench: decode speed against context length, and what lossy eviction costs in perplexity.

    .venv/bin/python benches/bench_kv.py          # the full bench (about 15 minutes)
    .venv/bin/python benches/bench_kv.py --toy    # a tiny model, about a minute

Part 1, speed: a Llama-shaped random bf16 model (hidden 512, 8 layers, 8 heads / 4 KV heads of
64, intermediate 1536, vocab 32000; 8 KB of KV per position), saved once as a checkpoint, at a
fixed budget (160 MB), batch 1, contexts of 1k, 4k and 16k positions. Every contender prefills
the same prompt in chunks of 64 positions (the activations of a longer chunk attending 16k
positions would not fit), then times 16 greedy decode steps. Rows: the resident model with
DynamicCache (where weights + KV fit the budget), offload with the dynamic KV in its budget
(where its planner fits it), offload with the paged KV (recent blocks in the budget, older ones
on disk), and transformers' OffloadedCache (``DynamicCache(offloading=True)``) where this
machine can run it (it moves layers between a CUDA GPU and the CPU). Each contender and context
runs in its own process under the memory cap of the other benches (``memlimit.sh``: budget +
the idle interpreter, page cache included and dropped first); offload's rows report the
measured peak (``stats()["measured_peak_bytes"]``) beside the budget.

Part 2, quality (LOSSY eviction, opt-in): SmolLM2-135M-Instruct (the embedded model, float32)
over the first 2048 tokens of README.md, token by token, with ``HeavyHitterCache`` keeping 50%
and 20% of the positions (half recent, half heavy hitters), against the full cache: perplexity
and its change (in this process, uncapped: no budget is involved).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Machine, Report, emit_result, fmt_bytes, launch_contender, result_of, save_random_checkpoint,
    system_info)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
FULL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=1536, vocab_size=32000)
TOY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=256, vocab_size=1024)
CHUNK = 64
DECODE = 16


def build_model(dims, dtype):
    """The toy model of the quality part (random float32, in memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**dims, max_position_embeddings=1 << 15, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def build_checkpoint(work: Path, dims) -> tuple[Path, dict]:
    """The speed part's random bf16 checkpoint (reused when it has these dims)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dims, max_position_embeddings=1 << 15, tie_word_embeddings=False,
                      dtype="bfloat16")
    model_dir = work / "model"
    return model_dir, save_random_checkpoint(model_dir, cfg, LlamaForCausalLM, dims)


def decode_speed(model, ids, cache) -> dict:
    """Chunked prefill, then DECODE timed greedy steps; tok/s."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        for s in range(0, ids.shape[1], CHUNK):
            out = model(ids[:, s:s + CHUNK], cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        prefill_s = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(DECODE):
            out = model(nxt, cache=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    return {"prefill_s": prefill_s, "tok_s": DECODE / decode_s}


def contender_main(a) -> None:
    """One contender at one context, in this (capped) process: ``resident`` (the checkpoint
    loaded with transformers), ``dynamic`` or ``paged`` (offload.run on the checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    import offload
    from offload.errors import OffloadError

    config = json.loads((Path(a.model_dir) / "config.json").read_text())
    ids = torch.randint(0, config["vocab_size"], (1, a.context - DECODE - 1),
                        generator=torch.Generator().manual_seed(a.context))
    base = {"contender": a.contender, "context": a.context}
    if a.contender == "resident":
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.bfloat16).eval()
        emit_result({**base, **decode_speed(model, ids, DynamicCache(config=model.config))})
        return
    try:
        off = offload.run(a.model_dir, budget=a.budget_bytes, kv=a.contender,
                          max_context=a.context, prefill_chunk=CHUNK, offload_dir=a.store,
                          progress=False, device="cpu",
                          **({"max_tokens": a.context} if a.contender == "dynamic" else {}))
    except OffloadError as e:
        emit_result({**base, "skip": str(e).split(";")[0][:90]})
        return
    res = decode_speed(off, ids, None)
    st = offload.stats(off)
    res.update(peak=st["accounted_peak_bytes"], measured=st["measured_peak_bytes"],
               baseline=st["baseline_bytes"],
               kv_disk=(st.get("kv") or {}).get("disk_bytes", 0))
    offload.close(off)
    emit_result({**base, **res})


def part_speed(a, budget: int, contexts: list[int], dtype, work: Path, model_dir: Path,
               weights: int, machine) -> tuple[list[dict], dict]:
    import torch

    dims = TOY if a.toy else FULL
    kv_per_pos = 2 * dims["num_hidden_layers"] * dims["num_key_value_heads"] * \
        (dims["hidden_size"] // dims["num_attention_heads"]) * dtype.itemsize
    rows, runs = [], {}
    cap = machine.cap_for(True)
    for ctx in contexts:
        kv = kv_per_pos * ctx
        row = {"context": ctx, "kv_bytes": kv}
        for key in ("resident", "dynamic", "paged"):
            if key == "resident" and weights + kv > budget:
                row[key] = {"skip": f"weights {fmt_bytes(weights)} + KV {fmt_bytes(kv)} "
                                    "over the budget"}
                continue
            argv = [str(SCRIPT), "--contender", key, "--context", str(ctx),
                    "--model-dir", str(model_dir), "--budget-bytes", str(budget),
                    "--store", str(work / "store")]
            run = launch_contender(f"{key}@{ctx}", argv, cap_bytes=cap,
                                   wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)
            runs[f"{key}@{ctx}"] = run
            res = result_of(runs, f"{key}@{ctx}")
            row[key] = res if res is not None else {
                "skip": f"failed (rc {run.returncode})", "failed": True}
            row[key]["cap"] = run.cap_bytes
        row["offloaded_cache"] = ({"skip": "needs a CUDA GPU (it moves layers GPU <-> CPU)"}
                                  if not torch.cuda.is_available() else
                                  {"skip": "not run: a GPU row needs its own capped process"})
        rows.append(row)
        print(f"  context {ctx}: done", flush=True)
    return rows, runs


def part_quality(a) -> dict:
    import torch

    from offload.prefetch.kv_evict import HeavyHitterCache

    if a.toy:
        model = build_model(TOY, torch.float32)
        ids = torch.randint(0, TOY["vocab_size"], (1, 256),
                            generator=torch.Generator().manual_seed(5))
        text = "random tokens (toy)"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from offload.cli import default_model_path

        path = default_model_path()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
        ids = tok((ROOT / "README.md").read_text(), return_tensors="pt").input_ids[:, :2048]
        text = f"README.md, first {ids.shape[1]} tokens"
    n = ids.shape[1]

    def nll_full() -> float:
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()

    def nll_evicting(keep: int) -> tuple[float, int]:
        total = 0.0
        with torch.no_grad(), HeavyHitterCache(model, keep=keep) as cache:
            for i in range(n - 1):
                logits = model(ids[:, i:i + 1], cache=cache, use_cache=True).logits[0, -1]
                total += torch.nn.functional.cross_entropy(logits.float()[None],
                                                           ids[0, i + 1:i + 2]).item()
            return total / (n - 1), cache.evicted

    base = nll_full()
    out = {"text": text, "tokens": n, "full_ppl": math.exp(base), "budgets": []}
    for frac in (0.5, 0.2):
        keep = max(2, int(n * frac))
        t0 = time.perf_counter()
        nll, evicted = nll_evicting(keep)
        out["budgets"].append({"fraction": frac, "keep": keep, "ppl": math.exp(nll),
                               "delta_ppl": math.exp(nll) - math.exp(base),
                               "evicted_per_layer": evicted / model.config.num_hidden_layers,
                               "seconds": time.perf_counter() - t0})
        print(f"  eviction at {frac:.0%}: done", flush=True)
    return out


def main(a) -> int:
    import torch

    from offload.sizes import parse_size

    dtype = torch.bfloat16   # the checkpoint's
    budget = parse_size(a.budget or ("12MB" if a.toy else "160MB"))
    contexts = [128, 256, 512] if a.toy else [1024, 4096, 16384]
    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "full")
    dims = TOY if a.toy else FULL
    model_dir, info = build_checkpoint(work, dims)
    weights = info["weight_bytes"]
    machine = Machine.measure(a, budget, model_dir / "model.safetensors", cgroup_idle=False)
    report = Report("kv", "offload KV bench", a, system_info(work))
    report.header([
        ("model", ("TOY " if a.toy else "") + f"Llama-shaped random bf16 {dims}: "
         f"{fmt_bytes(weights)} of weights"),
        ("budget", fmt_bytes(budget)),
        *machine.rows(a),
        ("method", f"batch 1, prefill in chunks of {CHUNK}, then {DECODE} timed greedy steps; "
                   "each contender and context in its own process under the cap"),
    ])
    speed, runs = part_speed(a, budget, contexts, dtype, work, model_dir, weights, machine)
    speed_table(speed, budget, report)
    quality = part_quality(a)
    quality_table(a, quality, report)
    print("\n(no numeric target in the issue; the I/O floor does not apply to a KV bench)")
    return report.finish(runs, {"budget": budget, **machine.as_json(), "speed": speed,
                                "quality": quality}, capped=machine.capped)


def speed_table(speed: list[dict], budget: int, report: Report) -> None:
    def cell(r):
        return r.get("skip", "-")[:40] if "tok_s" not in r else f"{r['tok_s']:.2f}"

    def peaks(r):
        return (f"{fmt_bytes(r['measured'])} measured ({fmt_bytes(r['peak'])} accounted)"
                if r.get("measured") is not None else "")

    rows = []
    for r in speed:
        p, d = r["paged"], r["dynamic"]
        notes = [f"paged: peak {peaks(p)} of {fmt_bytes(budget)}, {fmt_bytes(p['kv_disk'])} "
                 "KV on disk"] if "tok_s" in p else []
        if "tok_s" in d:
            notes.append(f"dynamic: peak {peaks(d)}")
        rows.append([str(r["context"]), fmt_bytes(r["kv_bytes"]), cell(r["resident"]),
                     cell(d), cell(p), cell(r["offloaded_cache"]), "; ".join(notes)])
    report.table(["context", "KV", "resident tok/s", "offload dynamic KV", "offload paged KV",
                  "transformers OffloadedCache", "notes"], rows, right={0, 1, 2, 3, 4})


def quality_table(a, quality: dict, report: Report) -> None:
    rows = [["full cache", "100%", f"{quality['full_ppl']:.3f}", "-"]]
    for b in quality["budgets"]:
        rows.append(["HeavyHitterCache (LOSSY)", f"{b['fraction']:.0%} ({b['keep']} positions)",
                     f"{b['ppl']:.3f}", f"{b['delta_ppl']:+.3f} "
                     f"({b['ppl'] / quality['full_ppl'] - 1:+.1%})"])
    print(f"\nperplexity on {quality['text']} ({'toy random model' if a.toy else 'SmolLM2-135M'}):")
    report.table(["cache", "KV budget", "perplexity", "change"], rows, right={2})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true")
    p.add_argument("--budget", default=None, help="default 160MB (toy 12MB)")
    p.add_argument("--work-dir", default="/tmp/offload_bench_kv")
    p.add_argument("--json", default="bench_out/bench_kv.json")
    p.add_argument("--quiet", action="store_true", help="less output from the contenders")
    p.add_argument("--wait-quiet", type=float, default=None,
                   help="seconds to wait for a quiet machine before each contender "
                        "(default 60; toy 0)")
    p.add_argument("--timeout", type=float, default=1800, help="per contender, seconds")
    p.add_argument("--no-cap", action="store_true", help="run every contender uncapped")
    p.add_argument("--cap-slack", type=int, default=None,
                   help="bytes added to the cap (default 0; toy 256 MB)")
    # a contender subprocess's own flags
    p.add_argument("--contender", choices=("resident", "dynamic", "paged"), help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.wait_quiet is None:
        a.wait_quiet = 0 if a.toy else 60
    if a.cap_slack is None:
        a.cap_slack = (256 << 20) if a.toy else 0
    return a


if __name__ == "__main__":
    a = parse_args()
    if a.contender:
        contender_main(a)
    else:
        sys.exit(main(a))
