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
                  tokenizer_path=(str(path), None))


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
    from .gguf_source import open_gguf, read_gguf

    try:
        config = _gguf_config(path)
    except StoreError:
        read_gguf(path)   # a truncated file: say which tensor it ends in
        raise
    return open_gguf(path, config)


def _gguf_config(path: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf parsing errors come from several libraries
        raise StoreError(f"cannot read GGUF file {path}: {e}; the file is truncated or not "
                         "GGUF", path=str(path)) from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
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
