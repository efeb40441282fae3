"""MoE bench: a Mixtral-shaped random bf16 model at a budget of 25% of its weights.

    .venv/bin/python benches/bench_moe.py              # the full bench (10-20 minutes)
    .venv/bin/python benches/bench_moe.py --toy        # a tiny Mixtral, about a minute

Rows: the resident model (no cap: the compute floor), Hugging Face Accelerate disk offload at
the same budget and cap (``device_map`` with ``max_memory`` and ``offload_folder``: it reads
every expert of every offloaded layer each token), then offload three ways at batch 1:
``offload-layer`` streams every expert of every layer as the dense path does
(``experts="stream"``), ``offload-experts`` fetches the experts the router picks on demand into
a device expert cache (``experts="cache", predict=False``), ``offload-predict`` adds predictive
loading (``predict=True``); ``--lfu`` adds the cache with LFU eviction. Then the I/O floors:
(bytes the plan streams per token + top-k experts per layer) / the disk bandwidth measured in
this run with O_DIRECT for the expert path, the plan's streamed bytes / bandwidth for
layer-only streaming.

A memory-limited machine is simulated honestly: every capped contender runs in its own memory
cgroup (``../shared/tools/memlimit.sh``) capped at the budget plus the interpreter's idle
footprint, so the page cache counts against it, and the page cache is dropped before each one.
Without root or cgroup v1 the contenders run uncapped and the output says so.

Targets (from the issue): offload-predict >= 5x Accelerate tok/s at batch 1; offload-predict
>= 2x offload-layer tok/s at batch 1. Every offload row's greedy tokens must equal the
resident model's.

Each contender runs in a subprocess (``bench_moe.py --contender NAME ...``) that loads its
model, prefills, decodes one untimed warm-up token, times N greedy decode tokens and prints one
``BENCH_RESULT {json}`` line; offload rows carry ``offload.stats`` from before and after the
timed steps, so their per-token figures cover the timed steps only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    bench_entry, bench_defaults, bench_parser, cap_and_disk_rows, cgroup_status,
    load_with_accelerate,
    device_reads, disk_bandwidth, emit_result, failure_reason, fmt_bytes, format_header,
    format_table, greedy_decode, idle_footprint, idle_footprint_cgroup, launch_contender,
    proc_io, save_random_checkpoint, system_info, write_json)

SCRIPT = Path(__file__).resolve()

# Mixtral-shaped (about 1.28 GB of bf16 weights, 1.13 GB of them experts).
FULL = dict(hidden_size=1024, num_hidden_layers=8, num_local_experts=8, num_experts_per_tok=2,
            intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8,
            vocab_size=32000)
# A tiny Mixtral for CI: the whole bench in about a minute. A layer's experts are about a tenth
# of the weights, as in FULL, so layer-only streaming (one Unit per layer's experts) still fits
# its staging slots in a small budget.
TOY = dict(hidden_size=128, num_hidden_layers=8, num_local_experts=8, num_experts_per_tok=2,
           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
# The interpreter every contender pays for before any weights: imports, and one tiny bf16
# Mixtral forward (prefill + decode), so the kernels' code pages and the OpenMP threads are in
# it too. Measured once with imports only, the cap left no room for those, and every capped
# contender (Accelerate too) spent the run faulting its own code back in.
IDLE_IMPORTS = (
    "import torch, transformers, accelerate, offload\n"
    "from transformers import MixtralConfig, MixtralForCausalLM\n"
    "m = MixtralForCausalLM(MixtralConfig(hidden_size=64, num_hidden_layers=2, "
    "num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, num_attention_heads=2, "
    "num_key_value_heads=1, vocab_size=128)).to(torch.bfloat16).eval()\n"
    "with torch.no_grad():\n"
    "    o = m(torch.arange(16)[None], use_cache=True)\n"
    "    m(torch.tensor([[1]]), cache=o.past_key_values, use_cache=True)\n"
    "del m, o\n")

TARGET_VS_ACCELERATE = 5.0
TARGET_VS_LAYER = 2.0

# key: (table label, offload.run keyword arguments)
OFFLOAD_ROWS = {
    "offload-layer": ("offload, layer-only streaming", {"experts": "stream"}),
    "offload-experts": ("offload, expert cache", {"experts": "cache", "predict": False}),
    "offload-predict": ("offload, expert cache + prediction",
                        {"experts": "cache", "predict": True}),
    "offload-lfu": ("offload, LFU expert cache + prediction",
                    {"experts": "cache", "predict": True, "expert_cache": "lfu"}),
}
EXPERT_COUNTS = ("accesses", "hits", "resident_hits", "on_demand", "refetches", "prefetched",
                 "bytes_read", "decode_bytes", "wrong_guess_bytes", "tp", "fp", "fn",
                 "stall_seconds", "io_seconds")


# -- the model -------------------------------------------------------------------------------
def build_model(model_dir: Path, dims: dict, seed: int = 0) -> dict:
    """A random-init bf16 MixtralForCausalLM checkpoint (config.json + model.safetensors) at
    ``model_dir``, reused when its marker matches. transformers 5 keeps each layer's experts
    fused (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) and the
    router at ``mlp.gate.weight``; the file is saved under those names, which
    ``from_pretrained`` loads with no missing or unexpected keys."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=False,
                           dtype="bfloat16")
    want = {"dims": dims, "seed": seed, "dtype": "bfloat16", "arch": "mixtral", "version": 1}
    return save_random_checkpoint(model_dir, config, MixtralForCausalLM, want, seed)


def expert_bytes(dims: dict, itemsize: int = 2) -> int:
    """Bytes of one expert: gate and up [I, H] each, down [H, I]."""
    return 3 * dims["hidden_size"] * dims["intermediate_size"] * itemsize


def prompts_for(batch: int, length: int, vocab: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g, dtype=torch.long)


def max_tokens_for(batch: int, prompt_len: int, tokens: int, warmup: int) -> int:
    """Positions (batch x context) the offload runtime must reserve KV cache for."""
    return batch * (prompt_len + 1 + warmup + tokens + 1)


def offload_kwargs(key: str, a: argparse.Namespace) -> dict:
    kw = dict(OFFLOAD_ROWS[key][1])
    if kw.get("predict"):
        if a.predict_depth is not None:
            kw["predict_depth"] = a.predict_depth
        if a.predict_width is not None:
            kw["predict_width"] = a.predict_width
    return kw


# -- contenders (run in a subprocess) ----------------------------------------------------------
def contender_main(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    model_dir = Path(a.model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    prompts = prompts_for(1, a.prompt_len, config["vocab_size"])
    base = {"contender": a.contender, "batch": 1, "budget_bytes": a.budget_bytes}
    last_only = a.prefill_logits == "last"
    snap: dict = {}
    t0 = time.perf_counter()

    if a.contender == "resident":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model.eval()
        base["load_s"] = time.perf_counter() - t0
        res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                            last_logits_only=last_only)
        emit_result({**base, **res})

    elif a.contender == "accelerate":
        model, dm = load_with_accelerate(model_dir, a.budget_bytes, a.accelerate_offload_dir)
        base["load_s"] = time.perf_counter() - t0
        base["device_map"] = dm
        # what it reads: its offload folder's files where it wrote any, else the checkpoint
        folder = Path(a.accelerate_offload_dir)
        probe = next(folder.glob("*"), None) if folder.is_dir() else None
        probe = probe or model_dir / "model.safetensors"

        def before_timed():
            snap["io"], snap["dev"] = proc_io(), device_reads(probe)

        res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                            before_timed=before_timed, last_logits_only=last_only)
        emit_result({**base, **res, "timed": _io_delta(snap, probe, res["tokens"])})

    elif a.contender in OFFLOAD_ROWS:
        import offload

        kw = offload_kwargs(a.contender, a)
        print(f"offload.run(..., {', '.join(f'{k}={v!r}' for k, v in kw.items())})", flush=True)
        model = offload.run(str(model_dir), budget=int(a.budget_bytes), offload_dir=a.offload_dir,
                            max_tokens=a.max_tokens, progress=False, **kw)
        base["load_s"] = time.perf_counter() - t0
        base["kwargs"] = kw
        data_file = next(Path(a.offload_dir).glob("*/units.bin"), Path(a.offload_dir))

        def before_timed():
            snap["stats"] = offload.stats(model)
            snap["io"], snap["dev"] = proc_io(), device_reads(data_file)

        res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                            before_timed=before_timed, last_logits_only=last_only)
        after = offload.stats(model)
        timed = {**_offload_delta(snap["stats"], after, res),
                 **_io_delta(snap, data_file, res["tokens"])}
        emit_result({**base, **res, "stats_before_timed": snap["stats"], "stats": after,
                     "timed": timed})
        offload.close(model)
    else:
        raise SystemExit(f"unknown contender {a.contender!r}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _diff(before: dict, after: dict, key: str):
    a, b = after.get(key), before.get(key)
    return a - (b if _num(b) else 0) if _num(a) else None


def _ratio(num, den):
    return num / den if (num is not None and den) else None


def _offload_delta(before: dict, after: dict, res: dict) -> dict:
    """``offload.stats`` counters over the timed steps only (they are cumulative)."""
    steps = max(res["tokens"], 1)
    t = {k: _diff(before, after, k) for k in
         ("io_seconds", "stall_seconds", "decode_tokens", "decode_seconds", "fetches",
          "forwards")}
    rb0, rb1 = before.get("bytes_read") or {}, after.get("bytes_read") or {}
    t["bytes_read"] = {k: _diff(rb0, rb1, k) for k in rb1}
    t["disk_bytes"] = t["bytes_read"].get("disk")
    t["disk_bytes_per_token"] = _ratio(t["disk_bytes"], steps)
    t["stall_s_per_step"] = _ratio(t["stall_seconds"], steps)
    t["io_s_per_step"] = _ratio(t["io_seconds"], steps)
    if t["io_seconds"] and t["stall_seconds"] is not None:
        t["overlap"] = max(0.0, 1 - t["stall_seconds"] / t["io_seconds"])
    e0, e1 = before.get("experts") or {}, after.get("experts") or {}
    ex = {k: _diff(e0, e1, k) for k in EXPERT_COUNTS}
    # rates from the timed counts where present, else the runtime's cumulative figure
    ex["hit_rate"] = _ratio(ex["hits"], ex["accesses"])
    ex["precision"] = _ratio(ex["tp"], (ex["tp"] or 0) + (ex["fp"] or 0)) \
        if ex["tp"] is not None and ex["fp"] is not None else None
    ex["recall"] = _ratio(ex["tp"], (ex["tp"] or 0) + (ex["fn"] or 0)) \
        if ex["tp"] is not None and ex["fn"] is not None else None
    ex["rates_cumulative"] = []
    for k in ("hit_rate", "precision", "recall"):
        if ex[k] is None and _num(e1.get(k)):
            ex[k] = e1[k]
            ex["rates_cumulative"].append(k)
    for k in ("mode", "resident", "slots", "policy", "predict_depth", "predict_width"):
        ex[k] = e1.get(k)
    for k in ("bytes_read", "on_demand", "wrong_guess_bytes", "prefetched", "accesses"):
        ex[f"{k}_per_token"] = _ratio(ex[k], steps)
    t["experts"] = ex if e1.get("accesses") is not None else (
        {"mode": e1.get("mode")} if e1 else None)
    return t


def _io_delta(snap: dict, path, steps: int) -> dict:
    """This process's block-layer reads (/proc/self/io) and the whole device's reads
    (/proc/diskstats: other processes count too) over the timed steps."""
    out: dict = {}
    io0, io1 = snap.get("io"), proc_io()
    if io0 and io1:
        out["proc_read_bytes"] = io1["read_bytes"] - io0["read_bytes"]
        out["proc_rchar"] = io1["rchar"] - io0["rchar"]
        out["proc_read_bytes_per_token"] = out["proc_read_bytes"] / max(steps, 1)
    dev0, dev1 = snap.get("dev"), device_reads(path)
    if dev0 and dev1:
        out["device_read_bytes"] = dev1[1] - dev0[1]
        out["device_requests"] = dev1[0] - dev0[0]
        if out["device_requests"] > 0:
            out["device_avg_request_bytes"] = out["device_read_bytes"] / out["device_requests"]
    return out


# -- the parent ------------------------------------------------------------------------------
def main(a: argparse.Namespace) -> int:
    import torch  # noqa: F401  (the header reports its version)

    import offload
    from offload.sizes import parse_size

    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "mixtral")
    dims = TOY if a.toy else FULL
    info = system_info(work)

    print("== offload MoE bench ==", flush=True)
    model_dir = work / "model"
    stores = work / "stores"
    print(f"building/reusing the random bf16 model at {model_dir} ...", file=sys.stderr,
          flush=True)
    model_info = build_model(model_dir, dims)
    weight_bytes = model_info["weight_bytes"]
    manifest, pack_s, pack_error = None, None, None
    t0 = time.perf_counter()
    try:
        manifest = offload.pack(str(model_dir), offload_dir=str(stores), progress=False)
        pack_s = time.perf_counter() - t0
        weight_bytes = manifest.weight_bytes
    except Exception as e:  # the offload rows will fail and say why; the rest still run
        pack_error = f"{type(e).__name__}: {e}"
        print(f"WARNING: offload.pack failed: {pack_error}", file=sys.stderr, flush=True)
    budget = parse_size(a.budget, total_bytes=weight_bytes)
    max_tokens = max_tokens_for(1, a.prompt_len, a.tokens, a.warmup)
    e_bytes = expert_bytes(dims)
    topk_bytes = dims["num_hidden_layers"] * dims["num_experts_per_tok"] * e_bytes

    plans, plan_errors = {}, {}
    if manifest is not None:
        for old in stores.glob("*/expert_heat.json"):   # plans and rows start cold
            old.unlink()
        for mode, kw in (("layer", {"experts": "stream"}),
                         ("experts", {"experts": "cache", "predict": True})):
            try:
                plans[mode] = offload.plan(str(model_dir), budget, offload_dir=str(stores),
                                           max_tokens=max_tokens, **kw)
            except Exception as e:
                plan_errors[mode] = f"{type(e).__name__}: {e}"
    else:
        plan_errors = {"layer": pack_error, "experts": pack_error}

    disk = disk_bandwidth(manifest.data_path if manifest else model_dir / "model.safetensors")
    idle = idle_footprint(IDLE_IMPORTS)
    cap = budget + idle + a.cap_slack
    capped, cg_reason = (False, "disabled by --no-cap") if a.no_cap else cgroup_status()
    idle_cg = idle_footprint_cgroup(IDLE_IMPORTS) if capped and not a.toy else None

    model_desc = (f"random bf16 Mixtral, hidden {dims['hidden_size']}, "
                  f"{dims['num_hidden_layers']} layers, {dims['num_local_experts']} experts "
                  f"top-{dims['num_experts_per_tok']}, intermediate "
                  f"{dims['intermediate_size']}, {dims['num_attention_heads']}/"
                  f"{dims['num_key_value_heads']} heads, vocab {dims['vocab_size']}: "
                  f"{fmt_bytes(weight_bytes)} of weights, {fmt_bytes(e_bytes)} per expert "
                  f"({fmt_bytes(e_bytes * dims['num_local_experts'] * dims['num_hidden_layers'])}"
                  f" of experts)" + (" (TOY)" if a.toy else ""))
    predict_desc = ", ".join(f"{k} {v}" for k, v in (("depth", a.predict_depth),
                                                      ("width", a.predict_width))
                             if v is not None) or "the runtime's defaults"
    print(format_header(info, [
        ("model", model_desc),
        ("budget", f"{a.budget} = {fmt_bytes(budget)}"),
        *cap_and_disk_rows(cap, idle, a.cap_slack, capped, cg_reason, idle_cg, disk),
        ("decode", f"batch 1, prompt {a.prompt_len} tokens, {a.warmup} untimed warm-up "
                   f"token(s), then {a.tokens} timed tokens ({a.accelerate_tokens} for "
                   f"Accelerate), greedy; "
                   + ("prefill keeps the last logits only (logits_to_keep=1, as generate() does)"
                      if a.prefill_logits == "last" else "prefill computes ALL logits "
                      "(--prefill-logits all: not what generate() does)")),
        ("prediction", predict_desc),
    ]), flush=True)
    for mode, title in (("experts", "expert cache + prediction"), ("layer", "layer-only")):
        if mode in plans:
            print(f"\noffload plan, {title} (max_tokens {max_tokens}):\n{plans[mode].table()}",
                  flush=True)
        else:
            print(f"\noffload plan, {title}: unavailable ({plan_errors.get(mode)})", flush=True)
    print(flush=True)

    common = ["--model-dir", str(model_dir), "--prompt-len", str(a.prompt_len),
              "--prefill-logits", a.prefill_logits,
              "--warmup", str(a.warmup), "--budget-bytes", str(budget)]
    runs: dict[str, object] = {}

    def launch(key, tokens, capped_run, extra=()):
        argv = [str(SCRIPT), "--contender", key, "--n-tokens", str(tokens), *common, *extra]
        runs[key] = launch_contender(key, argv, cap_bytes=cap if capped_run else None,
                                     wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)
        return runs[key]

    keys = ["resident", "accelerate", "offload-layer", "offload-experts", "offload-predict"]
    if a.lfu:
        keys.append("offload-lfu")
    wanted = set(a.only.split(",")) if a.only else None
    unknown = (wanted or set()) - set(keys) - {"offload-lfu"}
    if unknown:
        print(f"WARNING: --only names unknown rows {sorted(unknown)}; rows: "
              f"{', '.join(keys + ['offload-lfu'])}", file=sys.stderr, flush=True)
    for key in keys if wanted is None else [k for k in [*keys, "offload-lfu"] if k in wanted]:
        if key in runs:
            continue
        if key == "resident":
            launch(key, a.tokens, False)
        elif key == "accelerate":
            launch(key, a.accelerate_tokens, capped,
                   ["--accelerate-offload-dir", str(work / "accelerate_offload")])
        else:
            for old in stores.glob("*/expert_heat.json"):   # every row starts cold: no
                old.unlink()                                 # hot experts from an earlier row
            extra = ["--offload-dir", str(stores), "--max-tokens", str(max_tokens)]
            for flag, v in (("--predict-depth", a.predict_depth),
                            ("--predict-width", a.predict_width)):
                if v is not None:
                    extra += [flag, str(v)]
            launch(key, a.tokens, capped, extra)

    # -- the table ---------------------------------------------------------------------------
    def res(key):
        r = runs.get(key)
        return r.results[0] if r is not None and r.ok else None

    acc, layer, ref = res("accelerate"), res("offload-layer"), res("resident")
    acc_tok_s = acc["tok_s"] if acc else None
    layer_tok_s = layer["tok_s"] if layer else None
    rows, table_rows = [], []
    labels = {"resident": "resident (no cap; compute floor)",
              "accelerate": "Accelerate disk offload",
              **{k: v[0] for k, v in OFFLOAD_ROWS.items()}}
    for key in [k for k in labels if k in runs]:
        r = runs[key]
        x = res(key)
        label = labels[key]
        mem = r.memlimit or {}
        row = {"key": key, "contender": label, "ok": r.ok, "capped": r.capped,
               "cap_bytes": r.cap_bytes, "cgroup_max_usage": mem.get("max_usage"),
               "cgroup_failcnt": mem.get("failcnt"), "returncode": r.returncode}
        if x is None:
            why = failure_reason(r)
            row.update(batch=None, tok_s=None, note=why)
            table_rows.append([label, "?", "-", "-", "-", "-", "-",
                               fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
                               fmt_bytes(mem.get("max_usage")), "-", why])
            rows.append(row)
            continue
        row.update(batch=x["batch"], tok_s=x["tok_s"], s_per_token=x["s_per_token"],
                   s_per_step=x["s_per_step"], median_s_per_step=x["median_s_per_step"],
                   rss_peak_bytes=x.get("rss_peak_bytes"), tokens=x["tokens"],
                   vs_accelerate=_ratio(x["tok_s"], acc_tok_s),
                   vs_layer=_ratio(x["tok_s"], layer_tok_s))
        notes = []
        t = x.get("timed") or {}
        if key in OFFLOAD_ROWS:
            st, ex = x["stats"], t.get("experts")
            if ex and ex.get("mode") == "stream":
                notes.append("every expert streamed with its layer")
            if ex and ex.get("accesses") is not None:
                cum = ex.get("rates_cumulative") or []
                notes.append(f"expert hits {_pct(ex['hit_rate'])}"
                             + (" (cumulative)" if "hit_rate" in cum else ""))
                if ex.get("precision") is not None or ex.get("recall") is not None:
                    notes.append(f"prediction precision {_pct(ex['precision'])} recall "
                                 f"{_pct(ex['recall'])}"
                                 + (" (cumulative)" if {"precision", "recall"} & set(cum)
                                    else ""))
                notes.append(f"experts {fmt_bytes(ex['bytes_read_per_token'])}/tok")
                if ex.get("on_demand_per_token") is not None:
                    notes.append(f"{ex['on_demand_per_token']:.1f} on-demand/tok")
                if ex.get("wrong_guess_bytes_per_token") is not None:
                    notes.append(f"wrong guesses {fmt_bytes(ex['wrong_guess_bytes_per_token'])}"
                                 f"/tok")
                if ex.get("resident") is not None or ex.get("slots") is not None:
                    notes.append(f"{ex.get('resident', '?')} experts resident + "
                                 f"{ex.get('slots', '?')} cache slots")
            elif OFFLOAD_ROWS[key][1]["experts"] == "cache":
                notes.append("no expert stats")
            notes.append(f"disk {fmt_bytes(t.get('disk_bytes_per_token'))}/tok")
            if t.get("stall_s_per_step") is not None:
                notes.append(f"stall {t['stall_s_per_step']:.3f} s/step")
            notes.append(f"peak {fmt_bytes(st.get('peak_bytes'))} of "
                         f"{fmt_bytes(st.get('budget_bytes'))}"
                         + ("" if st.get("direct_io", True) else ", BUFFERED I/O"))
            row["offload_timed"], row["offload_stats"] = t, st
        elif key == "accelerate":
            dm = x.get("device_map", {})
            notes.append("map " + ", ".join(f"{d} {fmt_bytes(v['bytes'])}"
                                            for d, v in dm.items()))
            if t.get("proc_read_bytes_per_token") is not None:
                notes.append(f"read {fmt_bytes(t['proc_read_bytes_per_token'])}/tok")
            row["device_map"], row["accelerate_timed"] = dm, t
        else:
            notes.append(f"load {x.get('load_s', 0):.1f} s")
        if ref is not None and key != "resident":
            n = min(len(ref["generated"][0]), len(x["generated"][0]))
            same = [g[:n] for g in ref["generated"]] == [g[:n] for g in x["generated"]]
            row["tokens_match_resident"] = same
            notes.append(f"{n} tokens {'==' if same else '!='} resident")
        if mem.get("failcnt"):
            notes.append(f"cgroup at its limit {mem['failcnt']}x")
        if x.get("major_faults"):
            notes.append(f"{x['major_faults'] / max(x['tokens'], 1):.0f} major faults/step")
        if r.foreign_cpu is not None and r.foreign_cpu > 0.05:
            notes.append(f"OTHER PROCESSES used {r.foreign_cpu:.0%} of the CPUs")
        row["foreign_cpu"] = r.foreign_cpu
        row["note"] = ", ".join(notes)
        rows.append(row)
        table_rows.append([
            label, str(x["batch"]), f"{x['tok_s']:.3f}", f"{x['s_per_token']:.3f}",
            f"{x['median_s_per_step']:.3f}", _times(row["vs_accelerate"]),
            _times(row["vs_layer"]), fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
            fmt_bytes(mem.get("max_usage")) if mem else "-",
            fmt_bytes(x.get("rss_peak_bytes")), row["note"]])

    # the I/O floors: what the disk alone allows at batch 1
    floors = []
    p = plans.get("experts")
    planned = getattr(p, "expert_bytes_per_step", None)
    floors.append(("io-floor-experts", "I/O floor (expert path)",
                   (p.streamed_bytes if p else 0) + topk_bytes,
                   (f"({fmt_bytes(p.streamed_bytes)} plan-streamed + " if p else
                    f"(LOWER BOUND, no plan: {plan_errors.get('experts')}; ")
                   + f"{dims['num_hidden_layers']} layers x top-{dims['num_experts_per_tok']} x "
                   f"{fmt_bytes(e_bytes)} experts)/token",
                   f"; the plan expects {fmt_bytes(planned)} of experts/token with its cache"
                   if planned is not None else "",
                   {"plan_based": p is not None, "plan_expert_bytes_per_step": planned}))
    p = plans.get("layer")
    if p is not None:
        floors.append(("io-floor-layer", "I/O floor (layer-only)", p.streamed_bytes,
                       f"{fmt_bytes(p.streamed_bytes)} plan-streamed/token", "",
                       {"plan_based": True}))
    for key, label, nbytes, what, more, extra in floors:
        s = nbytes / disk["bps"]
        rows.append({"key": key, "contender": label, "batch": 1, "tok_s": 1 / s,
                     "s_per_token": s, "bytes_per_token": nbytes, "disk_bps": disk["bps"],
                     **extra})
        table_rows.append([label, "1", f"{1 / s:.3f}", f"{s:.3f}", f"{s:.3f}",
                           _times(_ratio(1 / s, acc_tok_s)), _times(_ratio(1 / s, layer_tok_s)),
                           "-", "-", "-", f"{what} / {fmt_bytes(disk['bps'])}/s{more}"])

    headers = ["contender", "batch", "tok/s", "s/token", "p50 s/step", "vs Accel",
               "vs layer-only", "cap", "cgroup peak", "RSS peak", "notes"]
    print("\n" + format_table(headers, table_rows, right=set(range(1, 10))))
    print("\ntok/s and s/token are over all timed steps (mean); p50 s/step is the median step "
          "(robust to other processes); per-token figures cover the timed steps only; expert "
          "hit rate = hits / accesses, prediction precision = right guesses / guesses, recall = "
          "right guesses / experts used; 'read' for Accelerate is its block-layer reads "
          "(/proc/self/io); 'cgroup peak' includes page cache.")

    # -- the targets -------------------------------------------------------------------------
    targets = []
    pr = res("offload-predict")

    def target(name, value, goal, detail, needs):
        status = "N/A" if value is None else ("PASS" if value >= goal else "SHORT")
        failed = [k for k in needs if k.startswith("offload") and k in runs and not runs[k].ok]
        if value is None and failed:   # an offload row that ran and failed fails the target
            status = "FAIL"
            detail = "; ".join(f"{k}: {failure_reason(runs[k])}" for k in failed)
        elif value is None:
            detail = "missing rows: " + ", ".join(k for k in needs if res(k) is None)
        targets.append({"target": name, "value": value, "goal": goal, "status": status,
                        "detail": detail})

    v = _ratio(pr["tok_s"], acc_tok_s) if pr else None
    target(f"offload-predict >= {TARGET_VS_ACCELERATE:g}x Accelerate at batch 1", v,
           TARGET_VS_ACCELERATE,
           f"{pr['tok_s']:.3f} vs {acc_tok_s:.3f} tok/s" if v is not None else "",
           ("offload-predict", "accelerate"))
    v = _ratio(pr["tok_s"], layer_tok_s) if pr else None
    target(f"offload-predict >= {TARGET_VS_LAYER:g}x offload-layer at batch 1", v,
           TARGET_VS_LAYER,
           f"{pr['tok_s']:.3f} vs {layer_tok_s:.3f} tok/s" if v is not None else "",
           ("offload-predict", "offload-layer"))
    print("\ntargets" + ("" if capped else " (UNCAPPED run: not a memory-limited measurement)"))
    for t in targets:
        val = "-" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"  {t['status']:<5}  {t['target']:<52} measured {val:>7}   {t['detail']}")
    checked = [r for r in rows if r["key"] in OFFLOAD_ROWS and "tokens_match_resident" in r]
    mismatched = [r["key"] for r in checked if not r["tokens_match_resident"]]
    if checked:
        print(f"  {'FAIL' if mismatched else 'PASS':<5}  "
              f"{'offload greedy tokens == resident':<52} "
              + (f"differ: {', '.join(mismatched)}" if mismatched
                 else f"{len(checked)} offload row(s) equal"))

    out = {
        "bench": "moe", "toy": a.toy, "args": vars(a), "system": info,
        "model": {"dir": str(model_dir), "dims": dims, **model_info,
                  "expert_bytes": e_bytes, "topk_expert_bytes_per_token": topk_bytes,
                  "store": str(manifest.path) if manifest else None,
                  "store_weight_bytes": manifest.weight_bytes if manifest else None,
                  "pack_seconds": pack_s, "pack_error": pack_error},
        "budget": a.budget, "budget_bytes": budget, "idle_bytes": idle,
        "idle_cgroup_bytes": idle_cg, "cap_bytes": cap,
        "capped": capped, "cgroup": cg_reason, "disk": disk, "max_tokens": max_tokens,
        "plans": {m: {**p.to_json(), "table": p.table()} for m, p in plans.items()},
        "plan_errors": plan_errors,
        "contenders": {k: r.to_json() for k, r in runs.items()},
        "rows": rows, "targets": targets,
    }
    path = write_json(Path(a.json), out)
    print(f"\nJSON: {path}")
    failed = [k for k, r in runs.items() if not r.ok]
    if failed:
        print(f"contenders that failed: {', '.join(failed)}", file=sys.stderr)
    if mismatched:
        print(f"offload rows whose greedy tokens differ from the resident model's: "
              f"{', '.join(mismatched)}", file=sys.stderr)
    return 1 if (failed or mismatched) else 0


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, tokens=16, work_dir="/tmp/offload_bench_moe",
                     json_path="bench_out/bench_moe.json",
                     rows="resident, accelerate, offload-layer, offload-experts, "
                          "offload-predict, offload-lfu")
    p.add_argument("--predict-depth", type=int, default=None,
                   help="offload-predict: layers ahead the predictor guesses (runtime default)")
    p.add_argument("--predict-width", type=int, default=None,
                   help="offload-predict: experts guessed per layer (runtime default)")
    p.add_argument("--lfu", action="store_true",
                   help="add a row: the expert cache with LFU eviction (+ prediction)")
    return bench_defaults(p.parse_args(argv), tokens=16)


if __name__ == "__main__":
    bench_entry(parse_args, contender_main, main)
