"""Where weights come from: a model object in memory, a Hugging Face checkpoint directory
(config.json + *.safetensors), or a .gguf file. A source knows its config, its tensors' names,
shapes and dtypes, how to load one tensor, and a fingerprint that changes when it changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import torch

from ..errors import ModelError, StoreError
from .source import Source

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def open_source(model) -> Source:
    """Resolve what the user passed to ``offload.run`` / the CLI into a Source.

    Raises:
        StoreError: a path that does not exist, or a directory without config.json or weights.
        ModelError: an object that is not a transformers model.
    """
    if isinstance(model, Source):   # built by an integration (offload.integrations)
        return model
    if isinstance(model, torch.nn.Module):
        return _module_source(model)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if not path.exists():
            raise StoreError(f"no model at {path}: pass a Hugging Face checkpoint directory "
                             "(config.json + *.safetensors), a .gguf file, or a model object",
                             path=str(path))
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_source(path)
        if path.is_dir():
            return _hf_dir_source(path)
        raise StoreError(f"{path} is neither a checkpoint directory nor a .gguf file",
                         path=str(path))
    raise ModelError(f"cannot offload a {type(model).__name__}: pass a transformers model, a "
                     "checkpoint directory or a .gguf file")


def _module_source(module: torch.nn.Module) -> Source:
    config = getattr(module, "config", None)
    if config is None:
        raise ModelError(f"{type(module).__name__} has no .config: offload runs transformers "
                         "causal-LM models (pass one, a checkpoint directory or a .gguf file)")
    state = {k: v for k, v in module.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise ModelError("the model has weights on the meta device (already offloaded or built "
                         "empty): pass the checkpoint it came from instead")
    h = hashlib.sha256(_config_json(config).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()).to_bytes(4, "little"))
    fp = h.hexdigest()
    return Source(name=f"{config.model_type}-module-{fp[:12]}",
                  description=f"in-memory {type(module).__name__}", config=config,
                  fingerprint=fp,
                  shapes=lambda: {k: (tuple(v.shape), v.dtype) for k, v in state.items()},
                  load=state.__getitem__, module=module)


def _hf_dir_source(path: Path) -> Source:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise StoreError(f"{path} has no config.json: a Hugging Face checkpoint directory holds "
                         "config.json and *.safetensors", path=str(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise StoreError(f"{path} has no *.safetensors weights (only safetensors checkpoints "
                         "are read; convert .bin checkpoints with transformers first)",
                         path=str(path))
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"cannot read {path / 'config.json'}: {e}") from e
    shapes, where = _safetensors_index(files)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    handles: dict[Path, object] = {}
    recent: dict[str, torch.Tensor] = {}   # the last two tensors: fused expert tensors are
                                           # sliced once per expert, read them once

    def load(name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name in recent:
            return recent[name]
        f = where[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        try:
            t = handles[f].get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise StoreError(f"cannot read tensor {name} from {f}: {e}; the checkpoint is "
                             "damaged, download it again", path=str(f)) from e
        if len(recent) >= 2:
            recent.pop(next(iter(recent)))
        recent[name] = t
        return t

    return Source(name=path.name, description=str(path.absolute()), config=config,
                  fingerprint=h.hexdigest(), shapes=lambda: shapes, load=load,
                  tokenizer_path=(str(path), None), files=tuple(files))


def _safetensors_index(files: list[Path]) -> tuple[dict, dict]:
    shapes, where = {}, {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or n > f.stat().st_size - 8:
                    raise ValueError("header length out of range")
                header = json.loads(fh.read(n))
            data_bytes = f.stat().st_size - 8 - n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, stop = info["data_offsets"]
                if stop > data_bytes:
                    raise ValueError(f"tensor {name} ends at byte {stop} of {data_bytes}")
                shapes[name] = (tuple(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]])
                where[name] = f
        except (OSError, ValueError, KeyError) as e:
            raise StoreError(f"checkpoint file {f} is truncated or corrupt ({e}); download or "
                             "save it again", path=str(f)) from e
    return shapes, where


def _gguf_source(path: Path) -> Source:
    """A .gguf file: quantized tensors kept in their blocks (``store/gguf_source.py``)."""
    from .gguf_source import GGUFFile, open_gguf

    file = GGUFFile(path)
    return open_gguf(path, gguf_config(file), file)


# GGUF architectures whose config transformers' legacy reader special-cases beyond its key
# mapping (t5's gating, stablelm's tensor probes, gpt-oss's rope scaling, lfm2's heads ...):
# their config comes from that reader itself, whatever it costs.
_LEGACY_CONFIG = ("t5", "stablelm", "gpt_oss", "gpt-oss", "lfm2", "gemma4", "minimax")


# Expert widths a Qwen-MoE GGUF states that transformers' mapping (5.x) does not read: it
# leaves its config defaults (768 for Qwen3-MoE, 1408 and 5632 for Qwen2-MoE), so a file of
# other widths would not load. Read here, so such a file runs.
_EXPERT_WIDTHS = {
    "qwen2_moe": {"expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}


def _as_mixtral(d: dict, md: dict, arch: str) -> dict:
    """A Llama-architecture GGUF with experts (llama.cpp writes Mixtral so) as the Mixtral
    config it is: transformers reads it as a dense Llama and would drop its experts."""
    d = {k: v for k, v in d.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
    d.update(model_type="mixtral", num_local_experts=int(md[f"{arch}.expert_count"]),
             num_experts_per_tok=int(md.get(f"{arch}.expert_used_count", 2)))
    return d


def gguf_config(file):
    """The transformers config of a GGUF file (a ``GGUFFile``), equal to
    ``AutoConfig.from_pretrained(dir, gguf_file=name)`` (``tests/test_gguf.py`` compares them)
    but from the header already read: transformers' legacy path for Llama-family files parses
    the whole vocabulary again through ``gguf.GGUFReader`` (175 MB and 6 s for SmolLM2).
    Architectures transformers' fast reader covers use its own ``get_gguf_config``; the key
    mapping below is the legacy reader's generic loop over ``GGUF_TO_TRANSFORMERS_MAPPING``.
    The config computes in float32, as transformers loads a GGUF. Two differences: a Qwen-MoE
    file's expert widths are read (``_EXPERT_WIDTHS``), where transformers keeps defaults, and
    a Llama file with experts is Mixtral (``_as_mixtral``), where transformers sees a Llama."""
    from transformers import CONFIG_MAPPING

    path, md = file.path, file.metadata
    names = tuple(t.name for t in file.tensors)
    try:
        try:
            from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config
        except ImportError:   # transformers before its fast GGUF reader
            GGUF_CONFIG_ARCHS, get_gguf_config = {}, None
        if file.architecture in GGUF_CONFIG_ARCHS:
            d = get_gguf_config(md, names)
        elif any(a in file.architecture for a in _LEGACY_CONFIG):
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            d = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        else:
            d = _mapped_gguf_config(md, names)
        for key, target in _EXPERT_WIDTHS.get(d["model_type"], {}).items():
            if f"{file.architecture}.{key}" in md:
                d[target] = int(md[f"{file.architecture}.{key}"])
        if d["model_type"] in ("llama", "mistral") and md.get(
                f"{file.architecture}.expert_count"):
            d = _as_mixtral(d, md, file.architecture)
        config = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    except Exception as e:  # transformers raises ValueError and KeyError on what it cannot map
        raise StoreError(f"cannot read the config of GGUF file {path}: {e}; the file is "
                         "damaged or of an architecture transformers cannot load",
                         path=str(path)) from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    return config


def gguf_tokenizer(path: Path, model_type: str):
    """The tokenizer of GGUF file ``path`` whose config is of ``model_type``, as
    ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` builds it. AutoTokenizer reads a
    GGUF's config only to pick the tokenizer class, through the legacy reader for Llama-family
    files (the 175 MB and 6 s ``gguf_config`` avoids); given the class it reads the
    vocabulary with transformers' fast reader. The class is AutoTokenizer's: the one registered
    for the model type, else its ``TokenizersBackend`` (``tests/test_gguf.py`` compares)."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    path = Path(path)
    if TOKENIZER_MAPPING_NAMES.get(model_type):
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                             tokenizer_type=model_type)
    return TokenizersBackend.from_pretrained(path.parent, gguf_file=path.name)


def _mapped_gguf_config(md: dict, names: tuple[str, ...]) -> dict:
    """The config dict transformers' legacy ``load_gguf_checkpoint`` builds, from metadata in
    the fast reader's form (a string array as its length)."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = md["general.architecture"]
    name = md.get("general.name")
    renamed = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)
    if "llama" in arch and name == "mistral":   # the legacy reader tests list membership
        renamed = "mistral"
    if arch not in GGUF_CONFIG_MAPPING and renamed not in GGUF_CONFIG_MAPPING:
        raise ValueError(f"GGUF model with architecture {arch} is not supported yet.")
    config: dict = {"tie_word_embeddings": "output.weight" not in names}
    defaults = GGUF_CONFIG_DEFAULTS_MAPPING.get(renamed, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch)
                                                or {})
    for key, value in defaults.items():
        config.setdefault(key, value)
    for key, value in md.items():
        prefix, _, rest = key.replace(arch, renamed).partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, renamed)
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target not in (None, -1):
            config[target] = value
    if config["model_type"] == "gemma3":
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in md:
        tokens = md["tokenizer.ggml.tokens"]
        config["vocab_size"] = tokens if isinstance(tokens, int) else len(tokens)
    return config


def _config_json(config) -> str:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    d.pop("transformers_version", None)
    return json.dumps(d, sort_keys=True, default=str)


def config_dict(config) -> dict:
    """The config as plain JSON data for the manifest (round-trips through ``build_config``)."""
    return json.loads(_config_json(config))


def build_config(d: dict):
    """Rebuild a transformers config from a manifest's config dict."""
    from transformers import AutoConfig

    d = dict(d)
    d.pop("quantization_config", None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def presets() -> list[str]:
    """The architecture presets shipped with offload (``offload/presets/NAME.json``: the
    public configs of well-known models), for planning before any download."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def is_header_only(model) -> bool:
    """Whether ``model`` names a model by its config alone: a preset's name, a config.json, or
    a checkpoint directory with a config.json but no weights (what ``offload plan`` plans on
    before anything is downloaded)."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    path = Path(model).expanduser()
    if not path.exists():
        return str(model).lower() in presets()
    if path.is_file():
        return path.suffix == ".json"
    return (path / "config.json").is_file() and not any(path.glob("*.safetensors"))


def open_config(model, dtype: torch.dtype | None = None) -> Source:
    """A Source with a config and tensor shapes and no weights: a preset name, a config.json,
    or a checkpoint directory without weights (``is_header_only``). Its tensors are those
    transformers' model of that config holds, built on the meta device (no memory), in
    ``dtype`` (default: the config's own, else float32). Loading a tensor is refused: such a
    source can be planned on, not packed.

    Raises:
        StoreError: no config there, or an unknown preset (the presets named).
        ModelError: a config transformers cannot build.
    """
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if not path.exists():
        name = str(model).lower()
        if name not in presets():
            raise StoreError(f"no model or preset named {model}: pass a checkpoint directory, "
                             f"a config.json, a .gguf file, or one of {', '.join(presets())}",
                             path=str(model))
        path = PRESETS_DIR / f"{name}.json"
    file = path if path.is_file() else path / "config.json"
    try:
        d = json.loads(file.read_text())
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot build a model config from {file}: {e}") from e
    dtype = dtype or _config_dtype(config)
    config.dtype = dtype
    shapes = _meta_shapes(config, dtype)
    fp = hashlib.sha256((_config_json(config) + str(dtype)).encode()).hexdigest()

    def load(name: str) -> torch.Tensor:
        raise StoreError(f"{model} is a config without weights: it can be planned on "
                         "(`offload plan`), not packed or run", path=str(path))

    return Source(name=path.stem if path.is_file() else path.name,
                  description=f"{file} (config only)", config=config, fingerprint=fp,
                  shapes=lambda: shapes, load=load)


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _meta_shapes(config, dtype: torch.dtype) -> dict:
    """Tensor name -> (shape, dtype) of transformers' model of ``config``, built on the meta
    device; a tied head is left out, as a checkpoint leaves it out."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(), no_init():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"transformers cannot build a {config.model_type} model from this "
                         f"config: {e}") from e
    shapes = {k: (tuple(v.shape), dtype) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def no_init():
    """transformers' switch for skipping weight initialisation (random values for meta
    parameters that are never used: 0.2 s for SmolLM2 at every start); a no-op where this
    transformers has none."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()
