"""Quantized bench: one GGUF file, offload's quantized store against its float32 store,
llama.cpp and Accelerate, each in its own process under the same memory cap and budget.

    .venv/bin/python benches/bench_quant.py              # the full bench (30-60 minutes; the
                                                         # first run builds llama-cpp-python)
    .venv/bin/python benches/bench_quant.py --toy        # a tiny model, no llama.cpp row
    .venv/bin/python benches/bench_quant.py --quality    # what --quantize costs in perplexity

The model is ``bench_dense.py``'s random bf16 checkpoint of TinyLlama-1.1B's shape (random
weights: shapes, bytes and timings are real, tokens are not). For each of Q4_0 and Q8_0 a GGUF is
written from it with the ``gguf`` package's quantizer and writer (every 2-D weight in that type,
norms F32, q/k rows permuted as ``convert_hf_to_gguf`` does, a placeholder SentencePiece
vocabulary so llama.cpp loads it). Rows, all decoding the same random prompts greedily:

- transformers loading the GGUF (float32, uncapped): the reference tokens and the compute floor;
- offload on the quantized store (``offload pack`` of the GGUF: blocks kept as stored);
- offload on the float32 store of the same file (the model transformers loads, packed);
- llama.cpp (``llama-cpp-python``, built from PyPI once into ``~/.cache/offload/peers``), its
  default mmap, one sequence per batch row;
- Accelerate disk offload of the bf16 checkpoint the GGUF was quantized from (bf16: what a
  user without the GGUF would run; its tokens are not comparable);
- the I/O floor: the bytes the quantized store's plan streams per forward / the disk bandwidth.

Budget: ``--budget-of-file`` (default 0.4) times the GGUF file's bytes, the same for every
contender; the cap is that budget plus the idle interpreter, page cache included
(``../shared/tools/memlimit.sh``), dropped before each contender. At 0.4 the cap is smaller
than the file (Q4_0: 597 MB for a 620 MB file): the case the issue is about, a model larger
than the memory it runs in. At 0.7 the cap (783 MB) holds a Q4_0 file whole and llama.cpp's
mmap keeps most of it in page cache (it re-read 150-210 MB a token on 12-06). Threads: every contender
uses this machine's cores (torch's default; llama.cpp's ``n_threads``). Bytes per token: what
the process had the block layer read during the timed steps (``/proc/self/io``), offload's
own counter beside it.

``--quality``: SmolLM2-135M (the default model, loaded by transformers as float32) packed with
``--quantize`` to each type, perplexity over the first 2,048 tokens of README.md against the
float32 model's (SmolLM2's own weights are already Q4_1/Q8_0, so this measures requantizing
them).

Targets (from the issue): the quantized store >= 3x the float32 store's tok/s, and ahead of
llama.cpp under the cap; each for the default exact compute and for ``compute='fast'``. Exact
multiplies float32 weights as transformers does, so it cannot outrun transformers' own
resident float32 model: the bench prints that ceiling (resident tok/s over the float32
store's) beside the exact target.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dense  # noqa: E402
from _common import (  # noqa: E402
    REPO_ROOT, Machine, Report, bench_defaults, bench_entry, bench_parser, emit_result,
    fmt_bytes, greedy_decode, launch_contender, load_with_accelerate, positions_for, proc_io,
    random_prompts, repeat_key, repeats_of, result_of, run_notes, same_tokens, system_info)

SCRIPT = Path(__file__).resolve()
QTYPES = ("Q4_0", "Q8_0")
TARGET_VS_F32 = 3.0
TARGET_VS_LLAMA_CPP = 1.0
LLAMA_CPP = "llama-cpp-python==0.3.36"
PEERS = Path(os.environ.get("OFFLOAD_PEERS", "~/.cache/offload/peers")).expanduser()
QUALITY_TYPES = ("q8_0", "q5_1", "q4_1", "q4_0")


# -- the GGUF --------------------------------------------------------------------------------
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    """A Llama checkpoint's tensor name as GGUF names it."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)       # model.layers.{i}.{module}.weight
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def permute_rows(w, heads: int):
    """``convert_hf_to_gguf``'s q/k row order (transformers undoes it when it loads)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(model_dir: Path, out: Path, qtype: str) -> Path:
    """A GGUF of the Llama checkpoint at ``model_dir``, every 2-D weight quantized to ``qtype``
    with the gguf package's quantizer; reused when its marker matches. Written under a
    temporary name and renamed when complete."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    marker = out.with_suffix(".json")
    src = json.loads((model_dir / "bench_model.json").read_text())["want"]
    want = {"source": src, "qtype": qtype, "version": 1}
    if out.exists() and marker.exists() and json.loads(marker.read_text()) == want:
        return out
    cfg = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("random-tinyllama-shape")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type({"Q4_0": 2, "Q8_0": 7}[qtype])
    _placeholder_vocab(w, cfg["vocab_size"])
    q = gguf.GGMLQuantizationType[qtype]
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name).float().numpy()
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                t = permute_rows(t, heads if "q_proj" in name else kv_heads)
            if t.ndim == 2:
                w.add_tensor(gguf_name(name), gguf.quantize(np.ascontiguousarray(t), q),
                             raw_dtype=q)
            else:
                w.add_tensor(gguf_name(name), np.ascontiguousarray(t, dtype=np.float32))
            del t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    marker.write_text(json.dumps(want))
    return out


def _placeholder_vocab(w, n: int) -> None:
    """A SentencePiece-style vocabulary of ``n`` distinct tokens (<unk>, <s>, </s>, the 256
    byte tokens, then t3 ...): llama.cpp needs one to load a model; prompts are token ids."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), n)]
    types += [1] * (n - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens[:n])
    w.add_token_scores([0.0] * n)
    w.add_token_types(types[:n])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def pack_float32(gguf_path: Path, out: Path):
    """The store offload wrote for a GGUF before quantized Units: the float32 model
    transformers loads from it, packed (reused while the GGUF's marker is unchanged)."""
    import torch
    from transformers import AutoModelForCausalLM

    import offload
    from offload.store.format import read_manifest

    marker, want = out.with_suffix(".json"), gguf_path.with_suffix(".json").read_text()
    if marker.exists() and marker.read_text() == want:
        try:
            return read_manifest(out)
        except Exception:
            pass
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    manifest = offload.pack(model, out, progress=False, force=True)
    marker.write_text(want)
    return manifest


# -- llama.cpp, built once ------------------------------------------------------------------
def llama_cpp_dir(build: bool) -> Path | None:
    """Where llama-cpp-python is installed for the benches (``--target``, outside the venv);
    built from PyPI the first time when ``build``. None where it is not available."""
    home = PEERS / LLAMA_CPP.replace("==", "-")
    if (home / "llama_cpp" / "__init__.py").exists():
        return home
    if not build:
        return None
    tmp = home.with_name(home.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building {LLAMA_CPP} from PyPI into {home} (once; about 15 minutes on 2 cores) ...",
          file=sys.stderr, flush=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1),
               CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
                          "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
    for spec, deps in ((LLAMA_CPP, "--no-deps"), ("diskcache>=5.6", "--no-deps")):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", deps, "--target",
                            str(tmp), spec], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"building {spec} failed: {r.stderr[-2000:]}", file=sys.stderr)
            return None
    tmp.rename(home)
    return home


def import_llama_cpp(home: str):
    sys.path.insert(0, home)
    import llama_cpp

    return llama_cpp


# -- contenders (run in a subprocess) ----------------------------------------------------------
def contender_main(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    config = json.loads((Path(a.model_dir) / "config.json").read_text())
    batches = [int(x) for x in (a.batch_sizes or str(a.batch_size)).split(",")]
    t0 = time.perf_counter()
    if a.contender.startswith("llama-cpp"):
        return llama_cpp_main(a, batches, config["vocab_size"])
    if a.contender.startswith("offload"):
        return offload_main(a, config["vocab_size"])
    if a.contender == "resident":
        from transformers import AutoModelForCausalLM

        path = Path(a.gguf)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    elif a.contender == "accelerate":
        model, _ = load_with_accelerate(a.model_dir, a.budget_bytes, a.accelerate_offload_dir)
    else:
        raise SystemExit(f"unknown contender {a.contender!r}")
    load_s = time.perf_counter() - t0
    for b in batches:
        prompts = random_prompts(b, a.prompt_len, config["vocab_size"])
        io0 = {}
        res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                            before_timed=lambda: io0.update(proc_io() or {}))
        emit_result({"contender": a.contender, "load_s": load_s, **res,
                     "read_bytes_per_step": _read_per_step(io0, res["tokens"])})


def _read_per_step(io0: dict, steps: int) -> float | None:
    io1 = proc_io()
    if not io0 or not io1:
        return None
    return (io1["read_bytes"] - io0["read_bytes"]) / max(steps, 1)


def offload_main(a: argparse.Namespace, vocab: int) -> None:
    import offload

    prompts = random_prompts(a.batch_size, a.prompt_len, vocab)
    t0 = time.perf_counter()
    model = offload.run(a.store, budget=int(a.budget_bytes), offload_dir=a.offload_dir,
                        max_tokens=a.max_tokens, progress=False, device="cpu",
                        compute="fast" if a.contender == "offload-fast" else "exact")
    load_s = time.perf_counter() - t0
    snap, io0 = {}, {}

    def before_timed():
        snap.update(offload.stats(model))
        io0.update(proc_io() or {})

    res = greedy_decode(model, prompts, a.n_tokens, warmup_tokens=a.warmup,
                        before_timed=before_timed)
    st = offload.stats(model)
    steps = max(res["tokens"], 1)
    timed = {"bytes_read_per_step": (st["bytes_read"]["disk"] - snap["bytes_read"]["disk"])
             / steps, "stall_s_per_step": (st["stall_seconds"] - snap["stall_seconds"]) / steps}
    if "sparse" in st:
        timed["decode_s_per_step"] = (st["sparse"]["decode_seconds"]
                                      - snap["sparse"]["decode_seconds"]) / steps
    emit_result({"contender": a.contender, "load_s": load_s, **res, "stats": st,
                 "timed": timed, "read_bytes_per_step": _read_per_step(io0, steps)})
    offload.close(model)


def llama_cpp_main(a: argparse.Namespace, batches: list[int], vocab: int) -> None:
    """llama.cpp through llama-cpp-python's C API: the GGUF loaded with its defaults (mmap;
    ``llama-cpp-norepack``: without the extra buffer types, which copy repacked weights into
    anonymous memory), one sequence per batch row, greedy (argmax of each row's last
    logits), timed per step."""
    import resource

    import numpy as np

    L = import_llama_cpp(a.llama_cpp)
    L.llama_backend_init()
    t0 = time.perf_counter()
    params = L.llama_model_default_params()
    if a.contender == "llama-cpp-norepack":
        params.use_extra_bufts = False
    model = L.llama_model_load_from_file(a.gguf.encode(), params)
    if not model:
        raise SystemExit(f"llama.cpp could not load {a.gguf}")
    load_s = time.perf_counter() - t0
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    threads = os.cpu_count() or 1
    for b in batches:
        cp = L.llama_context_default_params()
        per_seq = a.prompt_len + a.warmup + a.n_tokens + 8
        cp.n_ctx, cp.n_seq_max = b * per_seq, b
        cp.n_batch = cp.n_ubatch = max(b * a.prompt_len, 32)
        cp.n_threads = cp.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(b * a.prompt_len, 0, b)

        def forward(rows: list[list[int]], pos0: int) -> list[int]:
            batch.n_tokens = 0
            for s, toks in enumerate(rows):
                for j, t in enumerate(toks):
                    i = batch.n_tokens
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + j, 1
                    batch.seq_id[i][0] = s
                    batch.logits[i] = j == len(toks) - 1
                    batch.n_tokens += 1
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            out, k = [], 0
            for toks in rows:
                k += len(toks)
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, k - 1), shape=(n_vocab,))
                out.append(int(row.argmax()))
            return out

        prompts = random_prompts(b, a.prompt_len, vocab).tolist()
        t1 = time.perf_counter()
        nxt = forward(prompts, 0)
        prefill_s = time.perf_counter() - t1
        generated = [[t] for t in nxt]
        pos = a.prompt_len
        for _ in range(a.warmup):
            nxt = forward([[t] for t in nxt], pos)
            pos += 1
            for g, t in zip(generated, nxt):
                g.append(t)
        io0, faults0 = proc_io() or {}, resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        step_s = []
        for _ in range(a.n_tokens):
            t1 = time.perf_counter()
            nxt = forward([[t] for t in nxt], pos)
            step_s.append(time.perf_counter() - t1)
            pos += 1
            for g, t in zip(generated, nxt):
                g.append(t)
        total = sum(step_s)
        emit_result({"contender": a.contender, "batch": b, "load_s": load_s,
                     "prefill_s": prefill_s, "tokens": a.n_tokens, "step_s": step_s,
                     "decode_s": total, "tok_s": b * a.n_tokens / total,
                     "s_per_step": total / a.n_tokens,
                     "median_s_per_step": sorted(step_s)[len(step_s) // 2],
                     "s_per_token": total / (b * a.n_tokens),
                     "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0,
                     "read_bytes_per_step": _read_per_step(io0, a.n_tokens),
                     "threads": threads, "generated": generated})
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_model_free(model)


# -- the parent ------------------------------------------------------------------------------
@dataclass
class Kind:
    """One quantization type's files and plans."""

    qtype: str
    gguf: Path
    quant: object
    f32: object
    budget: int
    plans: dict
    machine: Machine


def main(a: argparse.Namespace) -> int:
    if a.quality:
        return quality_main(a)
    if a.fast:
        return fast_main(a)
    work = Path(a.work_dir).expanduser().absolute() / ("toy" if a.toy else "tinyllama")
    info = system_info(work)
    report = Report("quant", "offload quantized bench", a, info)
    dims = bench_dense.TOY if a.toy else bench_dense.FULL
    print("building/reusing the random bf16 model ...", file=sys.stderr, flush=True)
    bench_dense.build_model(work / "model", dims)
    peer = None if a.toy or a.no_llama_cpp else llama_cpp_dir(build=True)
    if peer is None and not a.no_llama_cpp and not a.toy:
        print(f"llama.cpp row skipped: {LLAMA_CPP} is not installed under {PEERS} (the full "
              "bench builds it)", file=sys.stderr)
    rates = decode_rates(4 << 20 if a.toy else 32 << 20)
    kinds = [setup_kind(a, work, q) for q in a.qtypes.split(",")]
    report.header(header_rows(a, dims, kinds, peer))
    decode_table(rates, kinds[0].machine.disk, report)
    runs, rows = {}, []
    for k in kinds:
        print(f"\n{k.qtype} plan (quantized store, batch 1):\n{k.plans[1].table()}\n",
              flush=True)
        r = run_kind(a, work, k, peer)
        runs.update({f"{k.qtype}/{key}": v for key, v in r.items()})
        rows += kind_table(a, k, r, report)
        quant_targets(a, k, r, report)
    return report.finish(runs, {
        "decode_rates": rates, "rows": rows,
        "kinds": {k.qtype: {"gguf": str(k.gguf), "gguf_bytes": k.gguf.stat().st_size,
                            "quant_store_bytes": k.quant.data_bytes,
                            "f32_store_bytes": k.f32.data_bytes, "budget_bytes": k.budget,
                            **k.machine.as_json(),
                            "plans": {str(b): p.to_json() for b, p in k.plans.items()}}
                  for k in kinds}},
        capped=all(k.machine.capped for k in kinds))


def setup_kind(a: argparse.Namespace, work: Path, qtype: str) -> Kind:
    import offload

    print(f"writing/reusing the {qtype} GGUF and its stores ...", file=sys.stderr, flush=True)
    path = write_gguf(work / "model", work / f"model-{qtype}.gguf", qtype)
    stores = work / "stores"
    quant = offload.pack(str(path), stores / f"gguf-{qtype}", progress=False)
    f32 = pack_float32(path, stores / f"gguf-{qtype}-f32")
    budget = int(path.stat().st_size * a.budget_of_file) if a.budget_bytes is None \
        else a.budget_bytes
    plans = {b: offload.plan(str(quant.path), budget, device="cpu", offload_dir=str(stores),
                             max_tokens=positions_for(b, a.prompt_len, a.tokens, a.warmup))
             for b in a.batches}
    return Kind(qtype, path, quant, f32, budget, plans,
                Machine.measure(a, budget, quant.data_path, cgroup_idle=False))


def run_kind(a: argparse.Namespace, work: Path, k: Kind, peer: Path | None) -> dict:
    common = ["--model-dir", str(work / "model"), "--gguf", str(k.gguf), "--prompt-len",
              str(a.prompt_len), "--warmup", str(a.warmup), "--budget-bytes", str(k.budget)]
    runs = {}
    wanted = set(a.only.split(",")) if a.only else None
    batches = ",".join(map(str, a.batches))

    def launch(key, contender, tokens, capped_run, extra=()):
        if wanted is not None and key.split("-b")[0] not in wanted:
            return
        argv = [str(SCRIPT), "--contender", contender, "--n-tokens", str(tokens), *common,
                *extra]
        runs[key] = launch_contender(f"{k.qtype} {key}", argv,
                                     cap_bytes=k.machine.cap_for(capped_run),
                                     wait_quiet=a.wait_quiet, timeout=a.timeout, quiet=a.quiet)

    launch("resident", "resident", a.tokens, False, ["--batch-sizes", batches])
    for name, m in (("quant", k.quant), ("f32", k.f32), ("fast", k.quant)):
        for b in a.batches:
            launch(f"{name}-b{b}", f"offload-{name}", a.tokens, True,
                   ["--store", str(m.path), "--offload-dir", str(work / "stores"),
                    "--batch-size", str(b), "--max-tokens",
                    str(positions_for(b, a.prompt_len, a.tokens, a.warmup))])
    if peer is not None and not a.no_llama_cpp:
        for name in ("llama-cpp", "llama-cpp-norepack"):
            launch(name, name, a.tokens, True,
                   ["--batch-sizes", batches, "--llama-cpp", str(peer)])
    launch("accelerate", "accelerate", a.accelerate_tokens, True,
           ["--batch-sizes", batches, "--accelerate-offload-dir",
            str(work / "accelerate_offload")])
    return runs


def by_batch(runs: dict, key: str, b: int) -> dict | None:
    """The result of ``key`` at batch ``b`` (one process may report several batches)."""
    r = runs.get(key)
    if r is None or not r.ok:
        return None
    return next((x for x in r.results if x["batch"] == b), None)


def result_at(runs: dict, key: str, b: int) -> dict | None:
    return result_of(runs, f"{key}-b{b}") if f"{key}-b{b}" in runs else by_batch(runs, key, b)


LABELS = {"resident": "transformers, GGUF as float32 (no cap)",
          "quant": "offload, quantized store", "f32": "offload, float32 store",
          "fast": "offload, quantized store, compute='fast'",
          "llama-cpp": "llama.cpp (defaults: mmap, repack)",
          "llama-cpp-norepack": "llama.cpp (mmap, no repack)", "accelerate": "Accelerate disk offload (bf16)"}


def kind_table(a: argparse.Namespace, k: Kind, runs: dict, report: Report) -> list[dict]:
    rows, cells = [], []
    for b in a.batches:
        ref = result_at(runs, "resident", b)
        for key, label in LABELS.items():
            run_key = f"{key}-b{b}" if f"{key}-b{b}" in runs else key
            if run_key not in runs:
                continue
            r, x = runs[run_key], result_at(runs, key, b)
            if x is None:
                cells.append([label, str(b), "?", "-", "-", "-", "-", "failed: see log"])
                rows.append({"qtype": k.qtype, "key": key, "batch": b, "ok": False})
                continue
            f32 = result_at(runs, "f32", b)
            note = []
            if key in ("quant", "f32", "fast"):
                t, st = x["timed"], x["stats"]
                note.append(f"stall {t['stall_s_per_step']:.2f} s/step")
                if "decode_s_per_step" in t:
                    note.append(f"decode {t['decode_s_per_step']:.2f} s/step")
                note.append(f"peak {fmt_bytes(st['accounted_peak_bytes'])} of "
                            f"{fmt_bytes(st['budget_bytes'])} (accounted)")
            if key in ("quant", "f32"):
                m = same_tokens(ref, x)
                if m is not None:
                    note.append(f"{m[1]} tokens {'==' if m[0] else '!='} transformers")
            note += run_notes(r, x)
            read = x.get("read_bytes_per_step")
            row = {"qtype": k.qtype, "key": key, "batch": b, "ok": True, "tok_s": x["tok_s"],
                   "s_per_step": x["s_per_step"], "read_bytes_per_step": read,
                   "offload_bytes_per_step": x.get("timed", {}).get("bytes_read_per_step"),
                   "capped": r.capped, "cgroup_max_usage": (r.memlimit or {}).get("max_usage"),
                   "tokens_match": (same_tokens(ref, x) or (None,))[0]}
            rows.append(row)
            cells.append([label, str(b), f"{x['tok_s']:.3f}", f"{x['median_s_per_step']:.3f}",
                          f"{x['tok_s'] / f32['tok_s']:.2f}x" if f32 else "-",
                          fmt_bytes(read) if read is not None else "-",
                          fmt_bytes(r.cap_bytes) if r.capped else "uncapped", ", ".join(note)])
        floor = k.plans[b].streamed_bytes / k.machine.disk["bps"]
        cells.append(["I/O floor (quantized store)", str(b),
                      f"{b / floor:.3f}" if floor else "none", f"{floor:.3f}", "-",
                      fmt_bytes(k.plans[b].streamed_bytes), "-",
                      f"streamed bytes per forward / {fmt_bytes(k.machine.disk['bps'])}/s"
                      if floor else "the plan keeps every Unit in memory (nothing read)"])
    print(f"\n== {k.qtype}: GGUF {fmt_bytes(k.gguf.stat().st_size)}, quantized store "
          f"{fmt_bytes(k.quant.data_bytes)}, float32 store {fmt_bytes(k.f32.data_bytes)}, "
          f"budget {fmt_bytes(k.budget)} ({a.budget_of_file:.0%} of the file), cap "
          f"{fmt_bytes(k.machine.cap) if k.machine.capped else 'NONE'}")
    report.table(["contender", "batch", "tok/s", "p50 s/step", "vs f32 store",
                  "read/step", "cap", "notes"], cells, right={1, 2, 3, 4, 5},
                 note="read/step: what the process had the block layer read per timed step "
                      "(/proc/self/io: page-cache misses, mmap faults, O_DIRECT alike)")
    return rows


def quant_targets(a: argparse.Namespace, k: Kind, runs: dict, report: Report) -> None:
    for b in a.batches:
        q, f = result_at(runs, "quant", b), result_at(runs, "f32", b)
        lcs = [x for x in (result_at(runs, key, b) for key in ("llama-cpp", "llama-cpp-norepack"))
               if x is not None]
        lc = max(lcs, key=lambda x: x["tok_s"]) if lcs else None   # its better configuration
        ref = result_at(runs, "resident", b)
        ceiling = (f"; exact's ceiling here {ref['tok_s'] / f['tok_s']:.2f}x (transformers' "
                   f"resident float32 model, {ref['tok_s']:.3f} tok/s)" if ref and f else "")
        v = q["tok_s"] / f["tok_s"] if q and f else None
        report.target(f"{k.qtype} b{b}: quantized store >= {TARGET_VS_F32}x float32 store", v,
                      TARGET_VS_F32, f"{q['tok_s']:.3f} vs {f['tok_s']:.3f} tok/s{ceiling}"
                      if v is not None else "", runs=runs)
        v = q["tok_s"] / lc["tok_s"] if q and lc else None
        report.target(f"{k.qtype} b{b}: quantized store ahead of llama.cpp (its best)", v,
                      TARGET_VS_LLAMA_CPP, f"{q['tok_s']:.3f} vs {lc['tok_s']:.3f} tok/s"
                      if v is not None else "", runs=runs)
        fast = result_at(runs, "fast", b)
        v = fast["tok_s"] / f["tok_s"] if fast and f else None
        report.target(f"{k.qtype} b{b}: compute='fast' >= {TARGET_VS_F32}x float32 store", v,
                      TARGET_VS_F32, f"{fast['tok_s']:.3f} vs {f['tok_s']:.3f} tok/s"
                      if v is not None else "", runs=runs)
        v = fast["tok_s"] / lc["tok_s"] if fast and lc else None
        report.target(f"{k.qtype} b{b}: compute='fast' ahead of llama.cpp under the cap", v,
                      TARGET_VS_LLAMA_CPP, f"{fast['tok_s']:.3f} vs {lc['tok_s']:.3f} tok/s"
                      if v is not None else "", runs=runs)
        for key in ("quant", "f32"):
            x = result_at(runs, key, b)
            m = same_tokens(ref, x) if x else None
            if m is not None:
                report.check(f"{k.qtype} b{b}: offload {key} tokens == transformers", m[0],
                             f"{m[1]} tokens per row")


# -- decode rates ---------------------------------------------------------------------------
def decode_rates(numel: int) -> dict:
    """Every block type on every CPU path this machine runs, one thread: blocks of random
    quants with realistic fp16 scales (``gguf.sample_blocks``), median of 5 decodes of
    ``numel`` elements into a float32 buffer larger than the caches."""
    import torch

    from offload.kernels import cpu
    from offload.kernels import gguf as G

    out = torch.empty(numel * 4, dtype=torch.uint8)
    rates: dict = {}
    for name in G.TYPES:
        src = G.sample_blocks(name, numel)
        rates[name] = {}
        for isa in cpu.supported() or ["reference"]:
            s = G.time_decode(src, out, name, numel, reps=5,
                              isa=None if isa == "reference" else isa)
            rates[name][isa] = {"stored_bps": src.numel() / s, "dense_bps": numel * 4 / s}
    return rates


def decode_table(rates: dict, disk: dict, report: Report) -> None:
    paths = list(next(iter(rates.values())))
    report.table(["type"] + [f"{p} in / out GB/s" for p in paths], [
        [name] + [f"{r[p]['stored_bps'] / 1e9:.2f} / {r[p]['dense_bps'] / 1e9:.2f}"
                  for p in paths] for name, r in rates.items()], right=set(range(1, 9)),
        note=f"CPU decode, 1 thread (as the runtime's decode thread runs it): stored bytes in, "
             f"float32 out; the disk reads {fmt_bytes(disk['bps'])}/s")


def header_rows(a, dims, kinds, peer) -> list[tuple[str, str]]:
    return [
        ("model", f"{'TOY ' if a.toy else 'TinyLlama-1.1B-shaped '}random Llama (hidden "
                  f"{dims['hidden_size']}, {dims['num_hidden_layers']} layers, vocab "
                  f"{dims['vocab_size']}): random weights, real shapes and bytes; as "
                  + ", ".join(f"{k.qtype} GGUF {fmt_bytes(k.gguf.stat().st_size)}"
                              for k in kinds)),
        ("budget", ", ".join(f"{k.qtype} {fmt_bytes(k.budget)}" for k in kinds)
         + f" ({a.budget_of_file:.0%} of each file; the same for every contender)"),
        *kinds[0].machine.rows(a),
        ("llama.cpp", f"{LLAMA_CPP} from {peer}" if peer else "not run"),
        ("decode", f"prompt {a.prompt_len}, {a.warmup} warm-up, {a.tokens} timed tokens "
                   f"({a.accelerate_tokens} for Accelerate), greedy, batches "
                   f"{', '.join(map(str, a.batches))}"),
    ]


# -- quality: what --quantize costs -----------------------------------------------------------
def quality_main(a: argparse.Namespace) -> int:
    """SmolLM2 float32, packed with --quantize to each type: perplexity over README.md."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import offload
    from offload.cli import default_model_path

    work = Path(a.work_dir).expanduser().absolute() / "quality"
    info = system_info(work)
    report = Report("quant-quality", "offload --quantize perplexity", a, info)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    n = 256 if a.toy else 2048
    ids = tok((REPO_ROOT / "README.md").read_text(), return_tensors="pt").input_ids[:, :n]
    n = ids.shape[1]
    report.header([("model", f"SmolLM2-135M-Instruct ({path.name}) loaded by transformers as "
                             "float32 (its weights are already Q4_1/Q8_0: this measures "
                             "requantizing them)"),
                   ("text", f"README.md, first {n} tokens, one forward")])

    def ppl(m) -> float:
        with torch.no_grad():
            logits = m(ids).logits[0, :-1].float()
        return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())

    base = ppl(model)
    rows, data = [["float32 (as loaded)", "-", f"{base:.3f}", "-"]], {"float32": base}
    for q in QUALITY_TYPES:
        store = offload.pack(model, work / f"smollm2-{q}", quantize=q, progress=False)
        off = offload.run(str(store.path), budget="2GB", max_tokens=n, progress=False,
                          offload_dir=str(work))
        p = ppl(off)
        offload.close(off)
        data[q] = {"ppl": p, "store_bytes": store.data_bytes}
        rows.append([f"--quantize {q}", fmt_bytes(store.data_bytes), f"{p:.3f}",
                     f"{(p / base - 1) * 100:+.2f}%"])
    f32_store = offload.pack(model, work / "smollm2-f32", progress=False)
    rows[0][1] = fmt_bytes(f32_store.data_bytes)
    report.table(["store", "bytes", "perplexity", "change"], rows, right={1, 2, 3})
    return report.finish({}, {"tokens": n, "perplexity": data}, capped=True)


# -- compute="fast": the fused kernels against llama.cpp on the default model ---------------
FAST_BUDGETS = ("20%", "25%")
TARGET_FAST_VS_LLAMA_CPP = 0.8
FAST_QUALITY_TOKENS = 2048


def fast_main(a: argparse.Namespace) -> int:
    """SmolLM2-135M's own Q4_1/Q8_0 GGUF (real weights): offload exact and fast, resident and
    at 20% / 25% budgets under the cap, llama.cpp resident and under the same caps; then
    fast's quality against exact over 2,048 tokens of text.

    With ``--repeat N`` fast and llama.cpp run N times each at every budget, alternately
    (fast, llama.cpp, fast, ...), and each row gives the median run (the range beside it):
    on this class of VM a contender's speed moves 10-30% from one minute to the next, which a
    single run of each, minutes apart, reads as a ratio between them (12-07: llama.cpp
    resident 88-153 tok/s over four runs of the bench). exact runs once (it is the
    reference, not the race)."""
    import offload
    from offload.cli import default_model_path
    from offload.sizes import parse_size

    path = default_model_path()
    work = Path(a.work_dir).expanduser().absolute() / "smollm2-fast"
    info = system_info(work)
    report = Report("quant-fast", "offload compute='fast' bench", a, info)
    model_dir = _config_dir(path, work / "model")
    stores = work / "stores"
    quant = offload.pack(str(path), stores / "smollm2", progress=False)
    peer = None if a.no_llama_cpp else llama_cpp_dir(build=True)
    common = ["--model-dir", str(model_dir), "--gguf", str(path), "--prompt-len",
              str(a.prompt_len), "--warmup", str(a.warmup), "--n-tokens", str(a.tokens)]
    max_tokens = positions_for(1, a.prompt_len, a.tokens, a.warmup)
    whole = 2 * quant.weight_bytes   # every Unit resident, decoded, with room to spare
    runs, cells, data = {}, [], {"rows": []}
    budgets = [("resident", whole, None)] + [
        (b, parse_size(b, total_bytes=quant.weight_bytes), None) for b in FAST_BUDGETS]
    for label, budget, _ in budgets:
        machine = Machine.measure(a, budget, quant.data_path, cgroup_idle=False)
        cap = None if label == "resident" else machine.cap_for(True)
        contenders = [("offload-quant", "exact", 0)] + [
            (c, n, i) for i in range(max(1, a.repeat)) for c, n in
            [("offload-fast", "fast")] + ([("llama-cpp", "llama.cpp")] if peer else [])]
        for contender, name, i in contenders:
            argv = [str(SCRIPT), "--contender", contender, *common, "--budget-bytes",
                    str(budget)]
            if contender.startswith("offload"):
                argv += ["--store", str(quant.path), "--offload-dir", str(stores),
                         "--max-tokens", str(max_tokens)]
            else:
                argv += ["--batch-sizes", "1", "--llama-cpp", str(peer)]
            key = repeat_key(f"{name}@{label}", i)
            runs[key] = launch_contender(key, argv, cap_bytes=cap, wait_quiet=a.wait_quiet,
                                         timeout=a.timeout, quiet=a.quiet)
        chosen = {name: _median_run(runs, f"{name}@{label}") for name in
                  ("exact", "fast", "llama.cpp")}
        lc = chosen["llama.cpp"][1] if chosen["llama.cpp"] else None
        for name, got in chosen.items():
            if got is None:
                continue
            (r, x), rates = got, [x["tok_s"] for _, x in repeats_of(runs, f"{name}@{label}")]
            if x is None:
                cells.append([name, label, "-", "?", "-", "-", "-", "failed: see log"])
                continue
            st = x.get("stats") or {}
            peak = (f"{fmt_bytes(st['measured_peak_bytes'])} of {fmt_bytes(st['budget_bytes'])}"
                    if st else "-")
            spread = ([f"median of {len(rates)}: {min(rates):.1f}-{max(rates):.1f} tok/s"]
                      if len(rates) > 1 else [])
            cells.append([name, label, fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
                          f"{x['tok_s']:.2f}", f"{x['median_s_per_step'] * 1000:.1f}",
                          f"{x['tok_s'] / lc['tok_s']:.2f}x" if lc else "-", peak,
                          ", ".join(spread + run_notes(r, x))])
            data["rows"].append({"contender": name, "budget": label, "budget_bytes": budget,
                                 "capped": r.capped, "tok_s": x["tok_s"], "tok_s_runs": rates,
                                 "vs_llama_cpp": x["tok_s"] / lc["tok_s"] if lc else None,
                                 "measured_peak_bytes": st.get("measured_peak_bytes"),
                                 "measured_peak_bytes_runs": [
                                     (y.get("stats") or {}).get("measured_peak_bytes")
                                     for _, y in repeats_of(runs, f"{name}@{label}")]})
    report.header([("model", f"{path.name}: SmolLM2-135M-Instruct, real weights (Q4_1 "
                             "projections, Q8_0 embedding/head)"),
                   ("llama.cpp", f"{LLAMA_CPP} from {peer}" if peer else "not run"),
                   ("decode", f"prompt {a.prompt_len} random tokens, {a.warmup} warm-up, "
                              f"{a.tokens} timed, greedy, batch 1, {os.cpu_count()} threads")])
    report.table(["contender", "budget", "cap", "tok/s", "p50 ms/step", "vs llama.cpp",
                  "measured peak", "notes"], cells, right={3, 4, 5},
                 note="budget: a share of the decoded (float32) weights, as offload's "
                      "percentages are; llama.cpp runs under the same cap (its mmap pages in "
                      "what the cap lets it)")
    data["quality"] = fast_quality(path, stores, 256 if a.toy else FAST_QUALITY_TOKENS, report)
    fast_targets(data, runs, report)
    return report.finish(runs, data, capped=True)


def _median_run(runs: dict, key: str) -> tuple | None:
    """``(run, result)`` of ``key``'s median repeat by tok/s (the slower of the middle two),
    ``(run, None)`` where it ran and none gave a result, None where it did not run."""
    done = sorted(repeats_of(runs, key), key=lambda kx: kx[1]["tok_s"])
    if done:
        k, x = done[(len(done) - 1) // 2]
        return runs[k], x
    return (runs[key], None) if key in runs else None


def _config_dir(path: Path, out: Path) -> Path:
    """A directory with the GGUF's transformers config.json (what contenders read)."""
    if not (out / "config.json").is_file():
        from transformers import AutoConfig

        out.mkdir(parents=True, exist_ok=True)
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    return out


def teacher_forced(model, ids, chunk: int, in_place: bool = False):
    """Feed ``ids`` ([1, T]) ``chunk`` positions per forward through one cache (the fused
    kernel's integer path: at most ``INT_ROWS`` rows per product, as in decoding): each
    position's greedy next token, and the mean negative log-likelihood of the text.
    ``in_place``: the runtime's cache written in place, as a fast run decodes (with ``chunk``
    1: every position through the layer kernel's decode step and its attention), else
    transformers' cache (the model's own attention)."""
    import torch
    from transformers import DynamicCache

    from offload import api
    from offload.adapters import kvbuffer

    cache = (kvbuffer.buffered_cache(model.config, ids.shape[1]) if in_place
             else DynamicCache(config=model.config))
    kw = api.runtime_of(model).cache_argument
    preds, nll = [], 0.0
    with torch.no_grad():
        for at in range(0, ids.shape[1], chunk):
            logits = model(ids[:, at:at + chunk], **{kw: cache}, use_cache=True).logits[0]
            preds.append(logits.argmax(-1))
            target = ids[0, at + 1:at + chunk + 1]
            logp = torch.log_softmax(logits[:len(target)].double(), -1)
            nll -= logp.gather(1, target[:, None]).sum().item()
    return torch.cat(preds)[:-1], nll / (ids.shape[1] - 1)


def fast_quality(path: Path, stores: Path, n: int, report: Report) -> dict:
    """Greedy agreement and perplexity of fast against exact, teacher-forced over the first
    ``n`` tokens of README.md then benches/RESULTS.md."""
    import offload
    from offload import api
    from offload.kernels import qmatmul

    tok = api.tokenizer(str(path))
    text = (REPO_ROOT / "README.md").read_text() + (REPO_ROOT / "benches" / "RESULTS.md") \
        .read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    got = {}
    for mode in ("exact", "fast"):
        model = offload.run(str(path), budget="1500MB", compute=mode, offload_dir=str(stores),
                            max_tokens=n + 8, logits="all", progress=False)
        got[mode] = teacher_forced(model, ids, qmatmul.INT_ROWS)
        if mode == "fast":   # as it decodes: one position a forward, the layer's one call
            got["fast, decode road"] = teacher_forced(model, ids, 1, in_place=True)
        offload.close(model)
    agree = {m: (got["exact"][0] == got[m][0]).float().mean().item()
             for m in ("fast", "fast, decode road")}
    ppl = {m: math.exp(v[1]) for m, v in got.items()}
    report.table(["measure", "exact", "fast", "change"], [
        *[[f"perplexity{'' if m == 'fast' else ' (' + m[6:] + ')'}", f"{ppl['exact']:.3f}",
           f"{ppl[m]:.3f}", f"{(ppl[m] / ppl['exact'] - 1) * 100:+.2f}%"] for m in agree],
        *[[f"greedy next token equal to exact's{'' if m == 'fast' else ' (' + m[6:] + ')'}",
           "-", f"{a * 100:.1f}%", "-"] for m, a in agree.items()]],
        right={1, 2, 3}, note=f"teacher-forced over {n} tokens of README.md + RESULTS.md, "
                              f"{qmatmul.INT_ROWS} positions per forward (the integer path) "
                              "through transformers' cache; decode road: one position per "
                              "forward through the cache written in place (the layer kernel's "
                              "attention)")
    worst = min(agree, key=agree.get)
    return {"tokens": n, "agreement": agree[worst], "agreement_by_road": agree,
            "perplexity": {"exact": ppl["exact"], "fast": ppl[worst]}, "perplexity_all": ppl}


def fast_targets(data: dict, runs: dict, report: Report) -> None:
    rows = {(r["contender"], r["budget"]): r for r in data["rows"]}

    def ratio(budget: str):
        f, lc = rows.get(("fast", budget)), rows.get(("llama.cpp", budget))
        return f["tok_s"] / lc["tok_s"] if f and lc else None

    report.target(f"fast resident >= {TARGET_FAST_VS_LLAMA_CPP}x llama.cpp resident",
                  ratio("resident"), TARGET_FAST_VS_LLAMA_CPP, "", runs=runs,
                  needs=("fast@resident", "llama.cpp@resident"))
    for b in FAST_BUDGETS:
        report.target(f"fast ahead of llama.cpp under the {b} cap", ratio(b), 1.0, "",
                      runs=runs, needs=(f"fast@{b}", f"llama.cpp@{b}"))
    q = data["quality"]
    change = q["perplexity"]["fast"] / q["perplexity"]["exact"] - 1
    report.target("fast's greedy tokens equal exact's (share of positions)", q["agreement"],
                  0.95, f"over {q['tokens']} tokens", runs=runs)
    report.target("fast's perplexity change against exact (|%|)", abs(change) * 100, 1.0,
                  f"{change * 100:+.2f}%", runs=runs, at_most=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, tokens=6, work_dir="/tmp/offload_bench",
                     json_path="bench_out/bench_quant.json",
                     rows="resident, quant, f32, fast, llama-cpp, llama-cpp-norepack, "
                          "accelerate")
    p.add_argument("--qtypes", default=",".join(QTYPES), help="GGUF types (default Q4_0,Q8_0)")
    p.add_argument("--budget-of-file", type=float, default=None,
                   help="budget as a fraction of each GGUF file's bytes (default 0.4: the "
                        "cap, budget + interpreter, is smaller than the file; toy 1.5, whose "
                        "layers are small next to its float32 slots: some Units stream)")
    p.add_argument("--batch", type=int, default=8, help="the large batch (default 8)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip (and do not build) "
                   "the llama.cpp row")
    p.add_argument("--quality", action="store_true",
                   help="measure --quantize's perplexity cost on SmolLM2 instead")
    p.add_argument("--fast", action="store_true",
                   help="compute='fast' on the default SmolLM2 GGUF against exact and "
                        "llama.cpp, resident and at 20%% / 25%% budgets, and its quality")
    p.add_argument("--repeat", type=int, default=1,
                   help="--fast: runs of fast and of llama.cpp at each budget, alternated; "
                        "each row gives the median run (default 1)")
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--llama-cpp", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-sizes", default=None, help=argparse.SUPPRESS)
    a = bench_defaults(p.parse_args(argv), tokens=6)
    a.batches = [1, a.batch]
    if a.budget_of_file is None:
        a.budget_of_file = 1.5 if a.toy else 0.4
    return a


if __name__ == "__main__":
    bench_entry(parse_args, contender_main, main)
