"""MoE bench: a Mixtral-format bf16 model at a budget of 25% of its weights.

    .venv/bin/python benches/bench_moe.py --model moefied          # trained routing (15-25 min)
    .venv/bin/python benches/bench_moe.py --model moefied --batch 4
    .venv/bin/python benches/bench_moe.py                          # random Mixtral (10-20 min)
    .venv/bin/python benches/bench_moe.py --toy                    # a tiny Mixtral, about a minute

Models: ``moefied`` is SmolLM2-135M-Instruct's trained weights split into experts with fitted
routers (``benches/moefy.py``: 8 experts top-2 by default, each widened 2x with inert random
neurons so the bench moves a real MoE's bytes), decoding windows of real text, so its routing
has the temporal and layer-to-layer correlation of a trained model; ``random`` is a
Mixtral-shaped random-weight model decoding random token ids, whose routing is not a trained
model's (greedy decoding falls into a short token cycle).

Rows: the resident model (no cap: the compute floor), Hugging Face Accelerate disk offload at
the same budget and cap (``device_map`` with ``max_memory`` and ``offload_folder``: it reads
every expert of every offloaded layer each token), then offload three ways:
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

Targets (issue 19): the expert cache (offload-experts) >= 5x Accelerate and >= 2x
offload-layer tok/s; prediction (offload-predict) >= 1.15x the cache alone. Every offload row's
greedy tokens must equal the
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BuiltModel, Machine, Report, bench_defaults, bench_entry, bench_parser, contender_row,
    device_reads, emit_result, fmt_bytes, greedy_decode, launch_contender, load_with_accelerate,
    positions_for, proc_io, random_prompts, result_of, run_notes, same_tokens,
    save_random_checkpoint, system_info)

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


def offload_kwargs(key: str, a: argparse.Namespace) -> dict:
    kw = dict(OFFLOAD_ROWS[key][1])
    if kw.get("predict"):
        if a.predict_depth is not None:
            kw["predict_depth"] = a.predict_depth
        if a.predict_width is not None:
            kw["predict_width"] = a.predict_width
    return kw


# -- contenders (run in a subprocess) ----------------------------------------------------------
def bench_prompts(a: argparse.Namespace, model_dir: Path):
    """What every contender decodes from: ``batch`` windows of real text (moefied; different
    parts of README.md, tokenized by the model's tokenizer) or random ids (random)."""
    if a.model != "moefied":
        config = json.loads((model_dir / "config.json").read_text())
        return random_prompts(a.batch, a.prompt_len, config["vocab_size"])
    import torch
    from transformers import AutoTokenizer

    import moefy

    ids = AutoTokenizer.from_pretrained(model_dir)(moefy.eval_text(),
                                                   return_tensors="pt").input_ids[0]
    step = max(a.prompt_len, (ids.numel() - a.prompt_len) // max(a.batch, 1))
    return torch.stack([ids[i * step:i * step + a.prompt_len] for i in range(a.batch)])


def contender_main(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    model_dir = Path(a.model_dir)
    prompts = bench_prompts(a, model_dir)
    base = {"contender": a.contender, "batch": a.batch, "budget_bytes": a.budget_bytes}
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
@dataclass
class Setup(BuiltModel):
    """What the parent's steps share: the model, its store and plans, the disk and the cap."""

    stores: Path
    manifest: object | None
    pack_s: float | None
    pack_error: str | None
    budget: int
    max_tokens: int
    plans: dict
    plan_errors: dict
    machine: Machine

    @property
    def expert_bytes(self) -> int:
        return expert_bytes(self.dims)

    @property
    def topk_bytes(self) -> int:
        """Bytes of the experts one token routes to, over every layer."""
        d = self.dims
        return d["num_hidden_layers"] * d["num_experts_per_tok"] * self.expert_bytes


def main(a: argparse.Namespace) -> int:
    s = setup(a)
    report = Report("moe", "offload MoE bench", a, s.info)
    report.header(header_rows(a, s))
    for mode, title in (("experts", "expert cache + prediction"), ("layer", "layer-only")):
        if mode in s.plans:
            print(f"\noffload plan, {title} (max_tokens {s.max_tokens}):\n"
                  f"{s.plans[mode].table()}", flush=True)
        else:
            print(f"\noffload plan, {title}: unavailable ({s.plan_errors.get(mode)})",
                  flush=True)
    print(flush=True)
    runs = run_contenders(a, s)
    rows = contender_table(a, s, runs, report)
    moe_targets(runs, rows, report, a.batch)
    return report.finish(runs, {
        "model": {"dir": str(s.model_dir), "dims": s.dims, **s.model_info,
                  "expert_bytes": s.expert_bytes, "topk_expert_bytes_per_token": s.topk_bytes,
                  "store": str(s.manifest.path) if s.manifest else None,
                  "store_weight_bytes": s.manifest.weight_bytes if s.manifest else None,
                  "pack_seconds": s.pack_s, "pack_error": s.pack_error},
        "budget": a.budget, "budget_bytes": s.budget, **s.machine.as_json(),
        "max_tokens": s.max_tokens,
        "plans": {m: {**p.to_json(), "table": p.table()} for m, p in s.plans.items()},
        "plan_errors": s.plan_errors, "rows": rows}, capped=s.machine.capped)


def setup(a: argparse.Namespace) -> Setup:
    """Build (or reuse) the model, pack it, plan layer-only and expert-cache runs, measure
    disk and cap. A failed pack or plan is kept: its rows then fail and say why."""
    import torch  # noqa: F401  (the header reports its version)

    import offload
    from offload.sizes import parse_size

    if a.model == "moefied":
        work = Path(a.work_dir).expanduser().absolute() / (
            f"moefied-{a.experts}x{a.top_k}-w{a.widen}" + ("-toy" if a.toy else ""))
    else:
        work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "mixtral")
    info = system_info(work)
    model_dir, stores = work / "model", work / "stores"
    print(f"building/reusing the {a.model} bf16 model at {model_dir} ...", file=sys.stderr,
          flush=True)
    if a.model == "moefied":
        import moefy

        model_info = moefy.build(model_dir, a.experts, a.top_k, a.widen,
                                 layers=4 if a.toy else None,
                                 calib_tokens=512 if a.toy else 4096,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
        config = json.loads((model_dir / "config.json").read_text())
        dims = {k: config[k] for k in FULL}
    else:
        dims = TOY if a.toy else FULL
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
    max_tokens = positions_for(a.batch, a.prompt_len, a.tokens, a.warmup)
    plans, plan_errors = {}, {"layer": pack_error, "experts": pack_error}
    if manifest is not None:
        plan_errors = {}
        for old in stores.glob("*/expert_heat.json"):   # plans and rows start cold
            old.unlink()
        for mode, kw in (("layer", {"experts": "stream"}),
                         ("experts", {"experts": "cache", "predict": True})):
            try:
                plans[mode] = offload.plan(str(model_dir), budget, offload_dir=str(stores),
                                           max_tokens=max_tokens, **kw)
            except Exception as e:
                plan_errors[mode] = f"{type(e).__name__}: {e}"
    machine = Machine.measure(
        a, budget, manifest.data_path if manifest else model_dir / "model.safetensors",
        idle_imports=IDLE_IMPORTS)
    return Setup(work, dims, info, model_dir, model_info, stores, manifest, pack_s, pack_error,
                 budget, max_tokens, plans, plan_errors, machine)


def header_rows(a: argparse.Namespace, s: Setup) -> list[tuple[str, str]]:
    dims, e_bytes = s.dims, s.expert_bytes
    weight_bytes = s.manifest.weight_bytes if s.manifest else s.model_info["weight_bytes"]
    kind = ("MoEfied SmolLM2-135M (trained weights and fitted routers, experts widened "
            f"{a.widen}x with inert random neurons; benches/moefy.py), bf16 Mixtral"
            if a.model == "moefied" else "random bf16 Mixtral")
    model_desc = (f"{kind}, hidden {dims['hidden_size']}, "
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
    return [
        ("model", model_desc),
        ("budget", f"{a.budget} = {fmt_bytes(s.budget)}"),
        *s.machine.rows(a),
        ("decode", f"batch {a.batch}, prompt {a.prompt_len} tokens "
                   + ("of README.md text" if a.model == "moefied" else "(random ids)")
                   + f", {a.warmup} untimed warm-up token(s), then {a.tokens} timed tokens ({a.accelerate_tokens} for "
                   f"Accelerate), greedy; "
                   + ("prefill keeps the last logits only (logits_to_keep=1, as generate() does)"
                      if a.prefill_logits == "last" else "prefill computes ALL logits "
                      "(--prefill-logits all: not what generate() does)")),
        ("prediction", predict_desc),
    ]


def run_contenders(a: argparse.Namespace, s: Setup) -> dict:
    """Each contender in its own process; every offload row starts with a cold cache."""
    common = ["--model-dir", str(s.model_dir), "--prompt-len", str(a.prompt_len),
              "--model", a.model, "--batch", str(a.batch),
              "--prefill-logits", a.prefill_logits,
              "--warmup", str(a.warmup), "--budget-bytes", str(s.budget)]
    runs: dict[str, object] = {}

    def launch(key, tokens, capped_run, extra=()):
        argv = [str(SCRIPT), "--contender", key, "--n-tokens", str(tokens), *common, *extra]
        runs[key] = launch_contender(key, argv, cap_bytes=s.machine.cap_for(capped_run),
                                     wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)

    keys = ["resident", "accelerate", "offload-layer", "offload-experts", "offload-predict"]
    if a.lfu:
        keys.append("offload-lfu")
    wanted = set(a.only.split(",")) if a.only else None
    unknown = (wanted or set()) - set(keys) - {"offload-lfu"}
    if unknown:
        print(f"WARNING: --only names unknown rows {sorted(unknown)}; rows: "
              f"{', '.join(keys + ['offload-lfu'])}", file=sys.stderr, flush=True)
    for key in keys if wanted is None else [k for k in [*keys, "offload-lfu"] if k in wanted]:
        if key == "resident":
            launch(key, a.tokens, False)
        elif key == "accelerate":
            launch(key, a.accelerate_tokens, True,
                   ["--accelerate-offload-dir", str(s.work / "accelerate_offload")])
        else:
            for old in s.stores.glob("*/expert_heat.json"):  # every row starts cold: no
                old.unlink()                                  # hot experts from an earlier row
            extra = ["--offload-dir", str(s.stores), "--max-tokens", str(s.max_tokens)]
            for flag, v in (("--predict-depth", a.predict_depth),
                            ("--predict-width", a.predict_width)):
                if v is not None:
                    extra += [flag, str(v)]
            launch(key, a.tokens, True, extra)
    return runs


def contender_table(a: argparse.Namespace, s: Setup, runs: dict, report: Report) -> list[dict]:
    """The table of every contender and the I/O floors; returns its rows as data."""
    acc, layer = result_of(runs, "accelerate"), result_of(runs, "offload-layer")
    acc_tok_s = acc["tok_s"] if acc else None
    layer_tok_s = layer["tok_s"] if layer else None
    rows, table_rows = [], []
    labels = {"resident": "resident (no cap; compute floor)",
              "accelerate": "Accelerate disk offload",
              **{k: v[0] for k, v in OFFLOAD_ROWS.items()}}
    for key in [k for k in labels if k in runs]:
        row, cells = _contender_row(runs, key, labels[key], acc_tok_s, layer_tok_s)
        rows.append(row)
        table_rows.append(cells)
    disk = s.machine.disk
    for key, label, nbytes, what, more, extra in (_floors(s) if a.batch == 1 else ()):
        sec = nbytes / disk["bps"]
        rows.append({"key": key, "contender": label, "batch": 1, "tok_s": 1 / sec,
                     "s_per_token": sec, "bytes_per_token": nbytes, "disk_bps": disk["bps"],
                     **extra})
        table_rows.append([label, "1", f"{1 / sec:.3f}", f"{sec:.3f}", f"{sec:.3f}",
                           _times(_ratio(1 / sec, acc_tok_s)),
                           _times(_ratio(1 / sec, layer_tok_s)), "-", "-", "-",
                           f"{what} / {fmt_bytes(disk['bps'])}/s{more}"])
    headers = ["contender", "batch", "tok/s", "s/token", "p50 s/step", "vs Accel",
               "vs layer-only", "cap", "cgroup peak", "RSS peak", "notes"]
    report.table(headers, table_rows, right=set(range(1, 10)), note=(
        "tok/s and s/token are over all timed steps (mean); p50 s/step is the median step "
        "(robust to other processes); per-token figures cover the timed steps only; expert "
        "hit rate = hits / accesses, prediction precision = right guesses / guesses, recall = "
        "right guesses / experts used; 'read' for Accelerate is its block-layer reads "
        "(/proc/self/io); 'cgroup peak' includes page cache."))
    return rows


def _contender_row(runs, key, label, acc_tok_s, layer_tok_s) -> tuple[dict, list[str]]:
    """One contender's data row and table cells."""
    row, failed = contender_row(runs, key, label)
    if failed is not None:
        return row, failed
    r, x = runs[key], result_of(runs, key)
    mem = r.memlimit or {}
    row.update(batch=x["batch"], tok_s=x["tok_s"], s_per_token=x["s_per_token"],
               s_per_step=x["s_per_step"], median_s_per_step=x["median_s_per_step"],
               rss_peak_bytes=x.get("rss_peak_bytes"), tokens=x["tokens"],
               vs_accelerate=_ratio(x["tok_s"], acc_tok_s),
               vs_layer=_ratio(x["tok_s"], layer_tok_s))
    t = x.get("timed") or {}
    if key in OFFLOAD_ROWS:
        notes = _offload_notes(key, x, t)
        row["offload_timed"], row["offload_stats"] = t, x["stats"]
    elif key == "accelerate":
        dm = x.get("device_map", {})
        notes = ["map " + ", ".join(f"{d} {fmt_bytes(v['bytes'])}" for d, v in dm.items())]
        if t.get("proc_read_bytes_per_token") is not None:
            notes.append(f"read {fmt_bytes(t['proc_read_bytes_per_token'])}/tok")
        row["device_map"], row["accelerate_timed"] = dm, t
    else:
        notes = [f"load {x.get('load_s', 0):.1f} s"]
    match = same_tokens(result_of(runs, "resident"), x) if key != "resident" else None
    if match is not None:
        row["tokens_match_resident"] = match[0]
        notes.append(f"{match[1]} tokens {'==' if match[0] else '!='} resident")
    row["foreign_cpu"] = r.foreign_cpu
    row["note"] = ", ".join(notes + run_notes(r, x))
    return row, [
        label, str(x["batch"]), f"{x['tok_s']:.3f}", f"{x['s_per_token']:.3f}",
        f"{x['median_s_per_step']:.3f}", _times(row["vs_accelerate"]),
        _times(row["vs_layer"]), fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
        fmt_bytes(mem.get("max_usage")) if mem else "-",
        fmt_bytes(x.get("rss_peak_bytes")), row["note"]]


def _offload_notes(key: str, x: dict, t: dict) -> list[str]:
    """An offload row's notes: expert hits and prediction, bytes per token, stall, peak."""
    st, ex, notes = x["stats"], t.get("experts"), []
    if ex and ex.get("mode") == "stream":
        notes.append("every expert streamed with its layer")
    if ex and ex.get("accesses") is not None:
        cum = ex.get("rates_cumulative") or []
        notes.append(f"expert hits {_pct(ex['hit_rate'])}"
                     + (" (cumulative)" if "hit_rate" in cum else ""))
        if ex.get("precision") is not None or ex.get("recall") is not None:
            notes.append(f"prediction precision {_pct(ex['precision'])} recall "
                         f"{_pct(ex['recall'])}"
                         + (" (cumulative)" if {"precision", "recall"} & set(cum) else ""))
        notes.append(f"experts {fmt_bytes(ex['bytes_read_per_token'])}/tok")
        if ex.get("on_demand_per_token") is not None:
            notes.append(f"{ex['on_demand_per_token']:.1f} on-demand/tok")
        if ex.get("wrong_guess_bytes_per_token") is not None:
            notes.append(f"wrong guesses {fmt_bytes(ex['wrong_guess_bytes_per_token'])}/tok")
        if ex.get("resident") is not None or ex.get("slots") is not None:
            notes.append(f"{ex.get('resident', '?')} experts resident + "
                         f"{ex.get('slots', '?')} cache slots")
    elif OFFLOAD_ROWS[key][1]["experts"] == "cache":
        notes.append("no expert stats")
    notes.append(f"disk {fmt_bytes(t.get('disk_bytes_per_token'))}/tok")
    if t.get("stall_s_per_step") is not None:
        notes.append(f"stall {t['stall_s_per_step']:.3f} s/step")
    notes.append(f"peak {fmt_bytes(st.get('accounted_peak_bytes'))} of {fmt_bytes(st.get('budget_bytes'))}"
                 + ("" if st.get("direct_io", True) else ", BUFFERED I/O"))
    return notes


def _floors(s: Setup) -> list[tuple]:
    """The I/O floors: what the disk alone allows at batch 1, per path."""
    floors = []
    p = s.plans.get("experts")
    planned = p.experts.bytes_per_step if p is not None and p.experts is not None else None
    dims = s.dims
    floors.append(("io-floor-experts", "I/O floor (expert path)",
                   (p.streamed_bytes if p else 0) + s.topk_bytes,
                   (f"({fmt_bytes(p.streamed_bytes)} plan-streamed + " if p else
                    f"(LOWER BOUND, no plan: {s.plan_errors.get('experts')}; ")
                   + f"{dims['num_hidden_layers']} layers x top-{dims['num_experts_per_tok']} x "
                   f"{fmt_bytes(s.expert_bytes)} experts)/token",
                   f"; the plan expects {fmt_bytes(planned)} of experts/token with its cache"
                   if planned is not None else "",
                   {"plan_based": p is not None, "plan_expert_bytes_per_step": planned}))
    p = s.plans.get("layer")
    if p is not None:
        floors.append(("io-floor-layer", "I/O floor (layer-only)", p.streamed_bytes,
                       f"{fmt_bytes(p.streamed_bytes)} plan-streamed/token", "",
                       {"plan_based": True}))
    return floors


TARGET_PREDICT_VS_CACHE = 1.15


def moe_targets(runs: dict, rows: list[dict], report: Report, batch: int = 1) -> None:
    """The issue's goals (the cache against Accelerate and layer-only streaming, prediction
    against the cache alone), and every offload row's greedy tokens equal to the resident
    model's."""
    pr, acc = result_of(runs, "offload-predict"), result_of(runs, "accelerate")
    layer, cache = result_of(runs, "offload-layer"), result_of(runs, "offload-experts")
    for name, num, den, goal, needs in (
            ("expert cache", cache, acc, TARGET_VS_ACCELERATE, ("offload-experts", "accelerate")),
            ("expert cache", cache, layer, TARGET_VS_LAYER, ("offload-experts", "offload-layer")),
            ("prediction", pr, cache, TARGET_PREDICT_VS_CACHE,
             ("offload-predict", "offload-experts"))):
        v = _ratio(num["tok_s"], den["tok_s"]) if num and den else None
        other = {"accelerate": "Accelerate", "offload-layer": "offload-layer",
                 "offload-experts": "the cache alone"}[needs[1]]
        report.target(f"{name} >= {goal:g}x {other} at batch {batch}", v, goal,
                      f"{num['tok_s']:.3f} vs {den['tok_s']:.3f} tok/s" if v is not None
                      else "", runs=runs, needs=needs)
    checked = [r for r in rows if r["key"] in OFFLOAD_ROWS and "tokens_match_resident" in r]
    mismatched = [r["key"] for r in checked if not r["tokens_match_resident"]]
    if checked:
        report.check("offload greedy tokens == resident", not mismatched,
                     f"differ: {', '.join(mismatched)}" if mismatched
                     else f"{len(checked)} offload row(s) equal")


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
    p.add_argument("--model", choices=("random", "moefied"), default="random",
                   help="random: a random-weight Mixtral (default); moefied: SmolLM2's trained "
                        "weights split into experts (benches/moefy.py), real routing")
    p.add_argument("--batch", type=int, default=1, help="sequences per decode step")
    p.add_argument("--experts", type=int, default=8, help="moefied: experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="moefied: experts per token")
    p.add_argument("--widen", type=int, default=2,
                   help="moefied: each expert this many times wider (inert random neurons)")
    p.add_argument("--lfu", action="store_true",
                   help="add a row: the expert cache with LFU eviction (+ prediction)")
    return bench_defaults(p.parse_args(argv), tokens=16)


if __name__ == "__main__":
    bench_entry(parse_args, contender_main, main)
