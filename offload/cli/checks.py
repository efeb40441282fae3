"""What the command line checks before it reads a model, and how it words offload's errors for
people at a shell (flags, not Python keywords)."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import BudgetError, OffloadError
from ..sizes import parse_size

# Files a Hugging Face tokenizer loads from (any one makes a directory a tokenizer's).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "spiece.model", "tekken.json")


def check_flags(args) -> None:
    """Every flag of ``run``, ``chat`` and ``plan``, checked before any model is read: a budget
    that cannot be read, a bare number too small to be meant as bytes, a device this machine
    lacks, counts out of range, sampling settings that contradict each other, files that are
    not there.

    Raises:
        OffloadError: the flag and its fix, in CLI terms.
    """
    _check_budget("--budget", args.budget)
    if getattr(args, "host_budget", None) is not None:
        _check_budget("--host-budget", args.host_budget)
    for flag in ("max_new_tokens", "max_context", "max_tokens", "batch", "threads",
                 "predict_depth", "predict_width"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise OffloadError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "prefetch", None) is not None and args.prefetch < 0:
        raise OffloadError(f"--prefetch must be 0 or more, got {args.prefetch}")
    _check_sampling(args)
    device = (args.device or "").strip().lower()
    if device and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise OffloadError(f"--device {args.device}: use cpu or cuda (cuda:N for a given GPU)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise OffloadError(f"--device {args.device}: this machine has no CUDA device "
                               "torch can use; drop --device (or --device cpu)")
    if args.model is not None and not Path(args.model).expanduser().exists():
        from ..store.sources import presets

        if getattr(args, "command", None) != "plan":
            raise OffloadError(f"no model at {args.model}: pass a checkpoint directory "
                               "(config.json + *.safetensors), a .gguf file or a packed store")
        if args.model.lower() not in presets():
            raise OffloadError(f"no model at {args.model}: pass a checkpoint directory, a "
                               f"config.json, a .gguf file, a packed store, or a preset: "
                               f"{', '.join(presets())}")
    if getattr(args, "profile", None) is not None and args.device is not None:
        raise OffloadError("--device and --profile: the profile names its device; drop "
                           "--device")
    prompts = getattr(args, "prompts", None)
    if prompts is not None and not Path(prompts).is_file():
        raise OffloadError(f"--prompts {prompts}: no such file (one prompt per line)")


def _check_budget(flag: str, value) -> None:
    text = str(value).strip()
    try:
        parse_size(text, total_bytes=1)   # the syntax and range; a percentage's share later
    except BudgetError as e:
        raise OffloadError(f"{flag}: {e}") from None
    if text.replace(".", "", 1).isdigit() and float(text) < 1e6:
        raise OffloadError(f"{flag} {text} is {text} bytes; write {flag} {text}% for that "
                           f"share of the model's weights, or a size such as {text}MB")


def _check_sampling(args) -> None:
    temperature = getattr(args, "temperature", None)
    if temperature is None:
        return
    if temperature < 0:
        raise OffloadError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise OffloadError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise OffloadError(f"--top-k must be at least 1, got {args.top_k}")
    if temperature == 0:
        given = [f for f, v in (("--top-p", args.top_p), ("--top-k", args.top_k),
                                ("--seed", args.seed)) if v is not None]
        if given:
            raise OffloadError(f"{', '.join(given)} only matter when sampling, and decoding is "
                               "greedy at --temperature 0: add --temperature (0.7, say)")


def tokenizer_source(model_path: Path, given: Path | None) -> Path:
    """Where the run's tokenizer comes from, found before anything is packed: ``given``
    (``--tokenizer``), a packed store's saved tokenizer, a GGUF's own vocabulary, or the
    checkpoint directory's tokenizer files.

    Raises:
        OffloadError: none of those has one, with the fix.
    """
    if given is not None:
        given = Path(given).expanduser()
        if given.is_file() and given.suffix == ".gguf" and _gguf_has_tokenizer(given):
            return given
        if given.is_dir() and any((given / f).is_file() for f in TOKENIZER_FILES):
            return given
        raise OffloadError(f"--tokenizer {given}: not a tokenizer (a directory with "
                           f"{' or '.join(TOKENIZER_FILES[:3])}, or a .gguf file with a "
                           "vocabulary)")
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if _gguf_has_tokenizer(path):
            return path
    elif (path / "manifest.json").is_file():
        if (path / "tokenizer").is_dir():
            return path / "tokenizer"
    elif path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        return path
    raise OffloadError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}"
                       f"{' in the GGUF header' if path.suffix == '.gguf' else ''}); pass "
                       "--tokenizer PATH: the directory of the model's original tokenizer "
                       "files, or a .gguf of the same model")


def _gguf_has_tokenizer(path: Path) -> bool:
    from ..store.gguf_source import GGUFFile

    try:
        return "tokenizer.ggml.model" in GGUFFile(path).metadata
    except OffloadError:
        return True   # an unreadable header: pack reports it, with its own message


# Python keywords in offload's messages -> the flag a CLI user sets instead.
_FLAGS = {"max_context": "--max-context", "kv": "--kv", "device": "--device",
          "budget": "--budget", "host_budget": "--host-budget", "prefetch": "--prefetch",
          "experts": "--experts", "predict": "--predict", "predict_depth": "--predict-depth",
          "predict_width": "--predict-width", "expert_cache": "--expert-cache",
          "quantize": "--quantize", "sparse": "--sparse", "prune": "--prune",
          "batch": "--batch", "max_new_tokens": "--max-new-tokens"}


def cli_words(message: str, command: str) -> str:
    """``message`` as a CLI user reads it: ``name=value`` and ``name=`` become ``--name
    value`` for the flags the command has; ``max_tokens`` (which ``run`` and ``chat`` derive
    from the prompt and --max-new-tokens) names what sets it there; "to run()" goes."""
    max_tokens = "--max-tokens" if command == "plan" else "--max-new-tokens (or the prompt)"

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(3) or m.group(4) or ""
        if name == "max_tokens":
            return f"{max_tokens} {value}".rstrip()
        return f"{_FLAGS[name]} {value}".rstrip()

    names = "|".join(sorted([*_FLAGS, "max_tokens"], key=len, reverse=True))
    message = re.sub(rf"\b({names})=('([^']*)'|([\w.%:-]*))", flag, message)
    message = re.sub(r"\b(lower|raise) max_tokens\b", rf"\1 {max_tokens}", message)
    return message.replace(" to run()", "")
