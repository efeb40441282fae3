"""KV bench: decode speed against context length, and what lossy eviction costs in perplexity.

    .venv/bin/python benches/bench_kv.py          # the full bench (about 10 minutes)
    .venv/bin/python benches/bench_kv.py --toy    # a tiny model, well under a minute

Part 1, speed: a Llama-shaped random bf16 model (hidden 512, 8 layers, 8 heads / 4 KV heads of
64, intermediate 1536, vocab 32000; 8 KB of KV per position) at a fixed budget (160 MB), batch
1, contexts of 1k, 4k and 16k positions. Every contender prefills the same prompt in chunks of
64 positions (the activations of a longer chunk attending 16k positions would not fit), then
times 16 greedy decode steps. Rows: the resident model with DynamicCache (where weights + KV fit
the budget), offload with the dynamic KV in its budget (where its planner fits it), offload
with the paged KV (recent blocks in the budget, older ones on disk), and transformers'
OffloadedCache (``DynamicCache(offloading=True)``) where this machine can run it (it moves
layers between a CUDA GPU and the CPU). All in this one process, uncapped: offload's accounted
peak is printed against the budget (the RSS-measured budget check is
``tests/test_kv.py::test_kv_alone_over_the_budget_runs_under_it_measured``).

Part 2, quality (LOSSY eviction, opt-in): SmolLM2-135M-Instruct (the embedded model, float32)
over the first 2048 tokens of README.md, token by token, with ``HeavyHitterCache`` keeping 50%
and 20% of the positions (half recent, half heavy hitters), against the full cache: perplexity
and its change.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, fmt_bytes, system_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=1536, vocab_size=32000)
TOY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=256, vocab_size=1024)
CHUNK = 64
DECODE = 16


def build_model(dims, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**dims, max_position_embeddings=1 << 15, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


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


def part_speed(a, budget: int, contexts: list[int], dtype) -> list[dict]:
    import torch
    from transformers import DynamicCache

    import offload
    from offload.errors import OffloadError

    dims = TOY if a.toy else FULL
    model = build_model(dims, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_pos = 2 * dims["num_hidden_layers"] * dims["num_key_value_heads"] * \
        (dims["hidden_size"] // dims["num_attention_heads"]) * dtype.itemsize
    rows = []
    store = Path(a.work_dir) / ("toy" if a.toy else "full")
    for ctx in contexts:
        ids = torch.randint(0, dims["vocab_size"], (1, ctx - DECODE - 1),
                            generator=torch.Generator().manual_seed(ctx))
        kv = kv_per_pos * ctx
        row = {"context": ctx, "kv_bytes": kv}
        if weights + kv <= budget:
            row["resident"] = decode_speed(model, ids, DynamicCache(config=model.config))
        else:
            row["resident"] = {"skip": f"weights {fmt_bytes(weights)} + KV {fmt_bytes(kv)} "
                                       "over the budget"}
        for mode in ("dynamic", "paged"):
            try:
                off = offload.run(build_model(dims, dtype), budget=budget, kv=mode,
                                  max_context=ctx, prefill_chunk=CHUNK, offload_dir=store,
                                  progress=False, device="cpu",
                                  **({"max_tokens": ctx} if mode == "dynamic" else {}))
            except OffloadError as e:
                row[mode] = {"skip": str(e).split(";")[0][:90]}
                continue
            res = decode_speed(off, ids, None)
            st = offload.stats(off)
            res.update(peak=st["accounted_peak_bytes"], kv_disk=(st.get("kv") or {}).get("disk_bytes", 0))
            row[mode] = res
            offload.close(off)
        row["offloaded_cache"] = ({"skip": "needs a CUDA GPU (it moves layers GPU <-> CPU)"}
                                  if not torch.cuda.is_available() else
                                  decode_speed(model.cuda(), ids.cuda(),
                                               DynamicCache(config=model.config,
                                                            offloading=True)))
        rows.append(row)
        print(f"  context {ctx}: done", flush=True)
    return rows


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

    dtype = torch.float32 if a.toy else torch.bfloat16
    budget = parse_size(a.budget or ("6MB" if a.toy else "160MB"))
    contexts = [128, 256, 512] if a.toy else [1024, 4096, 16384]
    report = Report("kv", "offload KV bench", a, system_info(Path(a.work_dir)))
    report.header([
        ("model", ("TOY " if a.toy else "") + "Llama-shaped random "
         + ("float32" if a.toy else "bf16") + f" {TOY if a.toy else FULL}"),
        ("budget", fmt_bytes(budget)),
        ("method", f"batch 1, prefill in chunks of {CHUNK}, then {DECODE} timed greedy steps; "
                   "one process, uncapped (offload's accounted peak shown)"),
    ])
    speed = part_speed(a, budget, contexts, dtype)
    speed_table(speed, budget, report)
    quality = part_quality(a)
    quality_table(a, quality, report)
    print("\n(no numeric target in the issue; the I/O floor does not apply to a KV bench)")
    return report.finish({}, {"budget": budget, "speed": speed, "quality": quality},
                         capped=False)


def speed_table(speed: list[dict], budget: int, report: Report) -> None:
    def cell(r):
        return r.get("skip", "-")[:40] if "tok_s" not in r else f"{r['tok_s']:.2f}"

    rows = []
    for r in speed:
        p = r["paged"]
        rows.append([str(r["context"]), fmt_bytes(r["kv_bytes"]), cell(r["resident"]),
                     cell(r["dynamic"]), cell(p), cell(r["offloaded_cache"]),
                     (f"peak {fmt_bytes(p['peak'])} of {fmt_bytes(budget)}, "
                      f"{fmt_bytes(p['kv_disk'])} KV on disk" if "peak" in p else "")])
    report.table(["context", "KV", "resident tok/s", "offload dynamic KV", "offload paged KV",
                  "transformers OffloadedCache", "paged notes"], rows, right={0, 1, 2, 3, 4})


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
    p.add_argument("--budget", default=None, help="default 160MB (toy 6MB)")
    p.add_argument("--work-dir", default="/tmp/offload_bench_kv")
    p.add_argument("--json", default="bench_out/bench_kv.json")
    p.add_argument("--quiet", action="store_true", help="accepted for the smoke test")
    p.add_argument("--wait-quiet", default=None, help="accepted for the smoke test")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
