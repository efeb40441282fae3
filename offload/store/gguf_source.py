"""A .gguf file as a Source: read tensor by tensor from its memory map, quantized tensors kept
in their block encoding.

transformers loads a GGUF by dequantizing every tensor to float32 (``gguf.dequantize``), then
applying its architecture's tensor processor (Llama's q/k row permutation) and naming it by
``get_gguf_hf_weights_map``. Here the same names and transformations apply, but a quantized
tensor stays rows of blocks (``QuantizedTensor``): a row permutation moves whole rows of
blocks, so the packed store holds the file's bytes and the runtime dequantizes them bitwise as
transformers would. Float tensors (F32, F16, BF16) are widened to float32 as transformers does.
Nothing reads the whole file: a pack holds a few tensors at a time.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, StoreError
from ..kernels import gguf as kernels
from .source import Source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D tensor as rows of GGUF blocks: ``raw`` is ``[rows, row bytes]`` (uint8), each row
    ``cols`` elements of type ``qtype``. Stands in for a float32 tensor of ``shape``."""

    raw: np.ndarray
    qtype: str
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw.shape[0], self.cols)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32   # what it decodes to

    def rows(self, start: int, stop: int) -> "QuantizedTensor":
        return QuantizedTensor(self.raw[start:stop], self.qtype, self.cols)

    def cat(self, others: list["QuantizedTensor"]) -> "QuantizedTensor":
        """Rows of ``others`` appended (an expert's gate and up projections as one)."""
        if any(o.qtype != self.qtype or o.cols != self.cols for o in others):
            raise StoreError(f"cannot join {self.qtype} rows with "
                             f"{[o.qtype for o in others]}: pack this model unquantized")
        return QuantizedTensor(np.concatenate([self.raw, *(o.raw for o in others)]),
                               self.qtype, self.cols)

    def blob(self) -> torch.Tensor:
        """The stored bytes, contiguous (uint8, CPU)."""
        return torch.from_numpy(np.ascontiguousarray(self.raw).reshape(-1).copy())


def open_gguf(path: Path, config):
    """The Source of a GGUF file whose transformers config is ``config``. The file's tensors
    are read (and checked: ``read_gguf``, ``_check_types``) only when a store is packed: a run
    on a store packed before needs the config and the fingerprint alone.

    Raises (when packing):
        StoreError: a truncated file, the tensor it ends in named.
        ModelError: a tensor of a block type offload cannot decode (named, with the fix).
    """
    index: dict = {}

    def tensors() -> dict:
        """hf name -> (GGUF tensor, processor), built once, on the first need."""
        if not index:
            reader = read_gguf(path)
            found = {t.name: t for t in reader.tensors}
            _check_types(path, found.values())
            _check_experts(path, found.values())
            processor = _processor(reader, config)
            names = _hf_names(config, processor)
            index.update({names[g]: (reader, t, processor) for g, t in found.items()
                          if g in names})
        return index

    def shapes() -> dict:
        return {hf: (tuple(int(s) for s in reversed(t.shape)), torch.float32)
                for hf, (_, t, _) in tensors().items()}

    st = path.stat()
    fp = hashlib.sha256(f"{path.absolute()}:{st.st_size}:{st.st_mtime_ns}:q".encode()).hexdigest()
    return Source(name=path.stem, description=str(path.absolute()), config=config,
                  fingerprint=fp, shapes=shapes, load=lambda name: _load(*tensors()[name]),
                  tokenizer_path=(str(path.parent), path.name))


def read_gguf(path: Path):
    """The ``gguf`` package's memory-mapped reader of ``path``, after checking that every
    tensor's bytes lie inside the file.

    Raises:
        StoreError: a truncated file (the tensor it ends in named) or an unreadable one.
        ModelError: a tensor of a block type the ``gguf`` package does not know.
    """
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size

    class Reader(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            for field in fields:   # before the reader reshapes bytes that are not there
                _, name, _, dims, raw_type, offset = field.parts
                name = bytes(name).decode("utf-8", "replace")
                try:
                    block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type[0])]
                except (ValueError, KeyError):
                    raise ModelError(f"GGUF tensor {name} of {path.name} has block type "
                                     f"{int(raw_type[0])}, which the gguf package does not "
                                     "know: offload cannot decode it") from None
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_bytes // block
                if end > size:
                    raise StoreError(f"GGUF file {path} ends inside tensor {name} (it needs "
                                     f"{end} bytes, the file has {size}): it is truncated; "
                                     "download it again", path=str(path))
            super()._build_tensors(start_offs, fields)

    try:
        return Reader(path)
    except (StoreError, ModelError):
        raise
    except Exception as e:   # gguf raises ValueError and others on a damaged header
        raise StoreError(f"cannot read GGUF file {path}: {e}; the file is truncated or not "
                         "GGUF", path=str(path)) from e


def _check_types(path: Path, tensors) -> None:
    for t in tensors:
        name = t.tensor_type.name
        if name not in kernels.TYPES and name not in kernels.FLOAT_TYPES:
            raise ModelError(
                f"GGUF tensor {t.name} of {path.name} is {name}, which offload cannot decode "
                f"(it runs {', '.join(kernels.FLOAT_TYPES + tuple(kernels.TYPES))}): use a "
                "GGUF of one of those types (llama.cpp's llama-quantize makes Q4_K_M, Q8_0 "
                "...)")


def _check_experts(path: Path, tensors) -> None:
    """MoE GGUFs hold each layer's experts in one tensor (``ffn_gate_exps`` ...), which the
    store would have to split per expert and the expert cache decode: not built yet."""
    for t in tensors:
        if re.search(r"\.ffn_(gate|up|down|gate_up)_exps\.", t.name):
            raise ModelError(
                f"GGUF tensor {t.name} of {path.name} holds every expert of its layer in one "
                f"{t.tensor_type.name} tensor: offload does not pack MoE GGUF files yet; pack "
                "the model from its safetensors checkpoint instead")


def _hf_names(config, processor) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, as transformers maps them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return get_gguf_hf_weights_map(skeleton, processor)


def _processor(reader, config):
    """transformers' tensor processor for the file's architecture (Llama's q/k permutation)."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          read_field)

    arch = read_field(reader, "general.architecture")[0]
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())


def _load(reader, t, processor):
    """One tensor, copied out of the file's map (whose pages are then let go): float types
    widened to float32 and processed as transformers does; a quantized one as rows of
    blocks, with the processor's row permutation applied to them."""
    from gguf import dequantize

    qtype = t.tensor_type.name
    try:
        if qtype in kernels.FLOAT_TYPES:
            weights = processor.process(weights=dequantize(t.data, t.tensor_type),
                                        name=t.name).weights
            return torch.from_numpy(np.array(weights))
        if t.data.ndim != 2:
            raise ModelError(f"GGUF tensor {t.name} is a {t.data.ndim}-D {qtype} tensor: "
                             "offload keeps 2-D quantized tensors only; pack this model from an "
                             "unquantized checkpoint")
        order = _row_order(processor, t.name, t.data.shape[0])
        raw = np.array(t.data) if order is None else t.data[order]
        return QuantizedTensor(raw, qtype, int(t.shape[0]))
    finally:
        _release_pages(reader, t)


def _release_pages(reader, t) -> None:
    """Drop the file's pages of ``t`` from this process (``MADV_DONTNEED``): read once, they
    would otherwise count in its RSS until the whole file is unmapped; the kernel keeps them
    as reclaimable page cache at most."""
    import mmap

    m = getattr(reader.data, "_mmap", None)
    if m is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        m.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
    except (OSError, ValueError):   # a read-only or exotic map: the pages only stay longer
        pass


def _row_order(processor, name: str, rows: int) -> np.ndarray | None:
    """The processor's effect on ``name`` as a permutation of rows (None: unchanged), found by
    processing each row's index; any other transformation of a quantized tensor is refused."""
    index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    out = processor.process(weights=index, name=name).weights
    if out is index or np.array_equal(out, index):
        return None
    out = np.asarray(out)
    if out.shape != index.shape or sorted(out.reshape(-1).tolist()) != list(range(rows)):
        raise ModelError(f"transformers transforms GGUF tensor {name} other than by permuting "
                         "its rows; offload cannot keep it quantized: pack this model from an "
                         "unquantized checkpoint")
    return out.reshape(-1).astype(np.int64)
