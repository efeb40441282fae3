"""The offload command: run, chat, plan and pack models larger than memory."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import OffloadError
from ..hardware import profiles
from ..sizes import format_bytes
from ..store.sources import is_header_only, presets
from . import flags
from .checks import check_flags, cli_words


def default_model_path() -> Path:
    """The embedded default model (``api.default_model``), without importing torch first."""
    from ..api import default_model

    return default_model()


def main(argv: list[str] | None = None) -> int:
    imports = _since_process_start()
    args = flags.parser(__version__, {"run": _cmd_run, "chat": _cmd_chat, "plan": _cmd_plan,
                                      "pack": _cmd_pack,
                                      "serve": _cmd_serve}, presets(), profiles()).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="offload: %(levelname)s: %(message)s" if not args.verbose
                        else "%(levelname)s %(name)s: %(message)s")
    args.imports_s = imports
    try:
        return args.func(args)
    except OffloadError as e:
        print(f"offload: error: {cli_words(str(e), args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload: interrupted", file=sys.stderr)
        return 130


def _since_process_start() -> float:
    """Seconds since this process started (the interpreter and offload's imports)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def _model_path(args) -> Path:
    check_flags(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "plan" and args.model and is_header_only(args.model):
        return args.model   # a preset's name, or a config: read by the plan
    return Path(args.model).expanduser() if args.model else default_model_path()


def _cmd_run(args) -> int:
    from .generate import cmd_run

    return cmd_run(args, _model_path(args))


def _cmd_serve(args) -> int:
    from .serve import cmd_serve

    return cmd_serve(args, _model_path(args))


def _cmd_chat(args) -> int:
    from .generate import cmd_chat

    return cmd_chat(args, _model_path(args))


def _cmd_plan(args) -> int:
    from .. import api

    model = _model_path(args)
    plan = api.plan(model, args.budget, dtype=args.dtype, profile=args.profile,
                    device=args.device, offload_dir=args.offload_dir,
                    host_budget=args.host_budget, prefetch=args.prefetch,
                    max_tokens=args.max_tokens, kv=args.kv, max_context=args.max_context,
                    batch=args.batch, experts=args.experts, predict=args.predict,
                    predict_depth=args.predict_depth, predict_width=args.predict_width,
                    expert_cache=args.expert_cache, compute=args.compute)
    print(plan.table())
    return 0


def _cmd_pack(args) -> int:
    from .. import api

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
    options = api.PackOptions.make(args.sparse, args.prune, args.method, texts, args.quantize)
    prep = api.prepare(args.model, args.out, force=args.force, offload_dir=args.offload_dir,
                       options=options)
    m = prep.manifest
    if prep.packed:
        print(f"packed {len(m.units)} units, {format_bytes(m.data_bytes)}, into {m.path} "
              f"in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"{m.path} already holds a valid store of this model ({len(m.units)} units, "
              f"{format_bytes(m.data_bytes)}): reused it; --force packs it again")
    encoded = [u for u in m.units if u.encoded]
    if args.sparse or args.prune is not None:
        dense = sum(u.nbytes for u in encoded)
        stored = sum(u.stored_bytes for u in encoded)
        print(f"bitmap-encoded: {len(encoded)} of {len(m.units)} units, "
              f"{format_bytes(dense)} -> {format_bytes(stored)}"
              + (f" ({stored / dense:.2f}x)" if dense else " (no tensor has zeros that pay)"))
    return 0
