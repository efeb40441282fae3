"""The command line's flags: one parser, its help showing every default."""
from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Run language models larger than memory: offload packs a checkpoint once into a store on
disk, keeps what fits the budget in memory and streams the rest, exactly (same tokens and,
in float32, the same logits as the model loaded whole).

examples:
  offload run --budget 20%                        the embedded SmolLM2-135M, 20% in memory
  offload run model.gguf --budget 2GB --prompt "Hello"
  offload chat model.gguf --budget 2GB            multi-turn, the conversation's KV kept
  offload plan model.gguf --budget 2GB            where every byte goes, predicted speed
  offload pack ./checkpoint ./store               pack once, run many times
"""

BUDGET_HELP = ("compute-tier memory: a size (200MB, 1.5GiB; K/M/G/T alone are binary: 300M = "
               "300 MiB) or a percentage of the model's weights as they sit in memory, "
               "decoded (float32 for a GGUF)")


CHAT_CONTEXT = 2048   # positions a chat is planned for unless --max-context says otherwise


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after each flag's help where a default exists (argparse's
    ``ArgumentDefaultsHelpFormatter`` prints ``None`` and ``False`` defaults too)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def parser(version: str, commands: dict, presets=(), profiles=()) -> argparse.ArgumentParser:
    """The ``offload`` parser; ``commands`` maps each command's name to its function;
    ``presets`` and ``profiles`` are the shipped architectures and machines ``plan`` knows."""
    p = argparse.ArgumentParser(prog="offload", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    p.add_argument("--version", action="version", version=f"offload {version}")
    sub = p.add_subparsers(required=True, metavar="COMMAND", dest="command")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        c.set_defaults(func=commands[name])
        return c

    r = command("run", "generate text with a model streamed under a budget")
    _model_flags(r)
    g = r.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="the prompt (chat template applied when the model has "
                                    "one); default: a question about the sky")
    g.add_argument("--prompts", type=Path, metavar="FILE",
                   help="a file with one prompt per line, generated as one batch")
    _generation_flags(r)

    c = command("chat", "talk to a model: one line per turn, the conversation's KV kept "
                        "between turns; /reset starts over, /exit (or end of input) quits")
    _model_flags(c)
    c.add_argument("--system", help="a system message opening the conversation")
    _generation_flags(c, max_new_tokens=256)
    c.set_defaults(max_context=CHAT_CONTEXT)   # a conversation grows: plan for it

    pl = command("plan", "print the placement and predicted speed (packs nothing); MODEL may "
                         "also be a config.json, a checkpoint directory without weights, or a "
                         "preset: " + ", ".join(presets))
    _model_flags(pl)
    pl.add_argument("--dtype", help="for a config without weights: the weights' type, bf16, "
                                    "f16, f32 or a GGUF block type such as q4_k or q8_0 "
                                    "(default: the config's)")
    pl.add_argument("--profile", metavar="FILE",
                    help="plan for a machine described in a JSON file (device, disk_read_bps, "
                         "h2d_bps, compute_bps) or shipped: " + ", ".join(profiles)
                         + " (default: this machine, measured once and cached)")
    pl.add_argument("--max-tokens", type=int, metavar="N",
                    help="positions (batch x context) to reserve KV cache and a one-shot "
                         "prefill for (default: 256)")
    pl.add_argument("--batch", type=int, default=1, help="sequences per forward")

    sv = command("serve", "an OpenAI-compatible HTTP server: concurrent requests decoded "
                          "together, one pass over the weights per step for all of them")
    _model_flags(sv)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (loopback: only this machine)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument("--api-key", metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on every /v1 request")
    sv.add_argument("--max-batch", type=int, default=8, metavar="N",
                    help="sequences decoded together (their KV is planned in the budget)")
    sv.add_argument("--queue", type=int, default=64, metavar="N",
                    help="requests that may wait beyond the batch (more get 503)")
    sv.add_argument("--name", help="the model name clients send (default: the model "
                                   "file's name)")

    pk = command("pack", "convert a checkpoint into a packed store, once")
    pk.add_argument("model", help="a checkpoint directory (config.json + *.safetensors) or a "
                                  ".gguf file")
    pk.add_argument("out", type=Path, help="the store directory to write")
    pk.add_argument("--force", action="store_true", help="rebuild even if the store is valid")
    pk.add_argument("--offload-dir", type=Path,
                    help="where wanda's dense calibration store goes (default: "
                         "$OFFLOAD_CACHE, else ~/.cache/offload)")
    _pack_flags(pk)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    """The model and where it runs: ``run``, ``chat`` and ``plan`` share them."""
    p.add_argument("model", nargs="?",
                   help="a checkpoint directory, a .gguf file or a packed store (default: the "
                        "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--budget", default="25%", help=BUDGET_HELP)
    p.add_argument("--offload-dir", type=Path,
                   help="where packed stores live (default: $OFFLOAD_CACHE, else "
                        "~/.cache/offload)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--host-budget", metavar="SIZE",
                   help="pinned host RAM for Units that do not fit the GPU (GPU only)")
    p.add_argument("--prefetch", type=int, metavar="N",
                   help="Units fetched ahead of the one computing (default: about 64 MB in "
                        "flight, 1 to 3)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="compute threads (default: torch's, one per core)")
    p.add_argument("--compute", choices=("exact", "fast"), default="exact",
                   help="exact: weights decoded to float32, bitwise transformers' model; fast: "
                        "GGUF-quantized weights multiplied from their blocks by fused kernels "
                        "(activations rounded to 8 bits per block, as llama.cpp: lossy, faster)")
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help="a tokenizer directory or .gguf, for a model without one")
    k = p.add_argument_group("KV cache")
    k.add_argument("--max-context", type=int, metavar="N",
                   help="the longest sequence to serve (prompt + new tokens; chat: the whole "
                        f"conversation, default {CHAT_CONTEXT}); with --kv auto a context whose "
                        "KV would take over half the budget is paged to disk")
    k.add_argument("--kv", choices=("auto", "paged", "dynamic"), default="auto",
                   help="paged: newest KV blocks in the budget, older ones on disk; dynamic: "
                        "all of it in the budget")
    e = p.add_argument_group("MoE models (Mixtral, Qwen-MoE, OLMoE)")
    e.add_argument("--experts", choices=("cache", "stream"), default="cache",
                   help="cache: fetch the experts the router picks into a device expert cache; "
                        "stream: stream every expert with its layer")
    e.add_argument("--predict", action="store_true",
                   help="prefetch the next layers' experts by pre-gating")
    e.add_argument("--predict-depth", type=int, default=1, metavar="N",
                   help="MoE layers ahead to predict")
    e.add_argument("--predict-width", type=int, metavar="N",
                   help="experts per token to prefetch (default: the model's top-k)")
    e.add_argument("--expert-cache", choices=("lru", "lfu"), default="lru",
                   help="expert cache eviction (lfu: frequency-aware)")


def _generation_flags(p: argparse.ArgumentParser, *, max_new_tokens: int = 64) -> None:
    g = p.add_argument_group("generation (greedy unless --temperature is above 0)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 decodes greedily (exact, reproducible)")
    g.add_argument("--top-p", type=float, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P")
    g.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens")
    g.add_argument("--seed", type=int, help="seed for sampling: the same seed, the same text")
    g.add_argument("--no-chat", action="store_true",
                   help="do not apply the model's chat template")


def _pack_flags(pk: argparse.ArgumentParser) -> None:
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
