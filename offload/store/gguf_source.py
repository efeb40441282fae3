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
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ModelError, StoreError
from ..kernels import gguf as kernels
from .source import Source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as rows of GGUF blocks: ``raw`` is ``[..., rows, row bytes]`` (uint8), each row
    ``cols`` elements of type ``qtype``. Stands in for a float32 tensor of ``shape``."""

    raw: np.ndarray
    qtype: str
    cols: int
    # drops the file's pages of a ``raw`` that views the file's map, once its bytes are copied
    release: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.raw.shape[:-1], self.cols)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32   # what it decodes to

    def __getitem__(self, i: int) -> "QuantizedTensor":
        """One matrix of a 3-D tensor (an expert of a layer's fused experts)."""
        return QuantizedTensor(self.raw[i], self.qtype, self.cols, self.release)

    def rows(self, start: int, stop: int) -> "QuantizedTensor":
        return QuantizedTensor(self.raw[start:stop], self.qtype, self.cols, self.release)

    def cat(self, others: list["QuantizedTensor"]) -> "QuantizedTensor":
        """Rows of ``others`` appended (an expert's gate and up projections as one)."""
        if any(o.qtype != self.qtype or o.cols != self.cols for o in others):
            raise StoreError(f"cannot join {self.qtype} rows with "
                             f"{[o.qtype for o in others]}: pack this model unquantized")
        joined = np.concatenate([self.raw, *(o.raw for o in others)])
        for t in (self, *others):
            if t.release is not None:
                t.release()
        return QuantizedTensor(joined, self.qtype, self.cols)

    def blob(self) -> torch.Tensor:
        """The stored bytes, contiguous (uint8, CPU)."""
        raw = self.raw if self.raw.flags.c_contiguous and self.raw.flags.owndata else \
            np.array(self.raw)   # a view of the file's (or a caller's) bytes: copied
        if self.release is not None:
            self.release()
        return torch.from_numpy(raw.reshape(-1))


@dataclass(frozen=True)
class JoinedExperts:
    """A layer's experts whose gate and up projections are two GGUF tensors (``ffn_gate_exps``,
    ``ffn_up_exps``: ``[experts, I, H]`` each), standing in for transformers' fused
    ``gate_up_proj`` ``[experts, 2I, H]``: expert ``e`` is its gate rows, then its up rows."""

    pieces: tuple[QuantizedTensor, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.pieces[0]
        return (first.shape[0], sum(p.shape[1] for p in self.pieces), first.cols)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __getitem__(self, e: int) -> QuantizedTensor:
        first, *rest = (p[e] for p in self.pieces)
        return first.cat(rest)


def open_gguf(path: Path, config, file: "GGUFFile | None" = None):
    """The Source of a GGUF file whose transformers config is ``config`` (``file``: its header,
    when the caller has read it already). The file's tensors are checked (``_check_types``,
    ``_group``) only when a store is packed: a run on a store packed before needs the
    config and the fingerprint alone.

    Raises (when packing):
        StoreError: a truncated file, the tensor it ends in named.
        ModelError: a tensor of a block type offload cannot decode (named, with the fix).
    """
    index: dict = {}

    def tensors() -> dict:
        """hf name -> (file, its GGUF tensors, processor), built once, on the first need: one
        tensor, or a layer's ``ffn_gate_exps`` and ``ffn_up_exps`` for its ``gate_up_proj``."""
        if not index:
            f = file or GGUFFile(path)
            _check_types(path, f.tensors)
            processor = _processor(f, config)
            groups = _group(path, f.architecture, f.tensors,
                            _hf_names(config, processor, f.architecture))
            index.update({hf: (f, ts, processor) for hf, ts in groups.items()})
        return index

    def shapes() -> dict:
        return {hf: (_shape(ts, processor), torch.float32)
                for hf, (_, ts, processor) in tensors().items()}

    def row_bytes() -> dict:
        """hf name -> (encoding, bytes per row) of each block-quantized tensor."""
        return {hf: (kernels.encoding(ts[0].qtype), ts[0].n_bytes // max(1, _rows(ts[0].dims)))
                for hf, (_, ts, _) in tensors().items()
                if ts[0].qtype not in kernels.FLOAT_TYPES}

    st = path.stat()
    fp = hashlib.sha256(f"{path.absolute()}:{st.st_size}:{st.st_mtime_ns}:q".encode()).hexdigest()
    return Source(name=path.stem, description=str(path.absolute()), config=config,
                  fingerprint=fp, shapes=shapes, load=lambda name: _load(*tensors()[name]),
                  tokenizer_path=(str(path.parent), path.name), row_bytes=row_bytes,
                  files=(path,))


def _shape(ts: tuple["GGUFTensor", ...], processor) -> tuple[int, ...]:
    """The torch shape of one GGUF tensor as transformers' processor leaves it (Qwen2-MoE's
    shared-expert gate gains a leading 1), or of a layer's gate and up experts joined."""
    shapes = [tuple(int(s) for s in reversed(t.dims)) for t in ts]
    if len(shapes) == 1:
        if ts[0].qtype not in kernels.FLOAT_TYPES:   # rows only permuted (``_row_order``)
            return shapes[0]
        proxy = np.broadcast_to(np.zeros((), np.float32), shapes[0])   # no bytes behind it
        return tuple(processor.process(weights=proxy, name=ts[0].name).weights.shape)
    e, _, h = shapes[0]
    return (e, sum(s[1] for s in shapes), h)


def _rows(dims: tuple[int, ...]) -> int:
    """Rows of a tensor of GGUF ``dims`` (fastest first): every dimension but the first."""
    n = 1
    for d in dims[1:]:
        n *= int(d)
    return n


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a GGUF file's tensor table: ``dims`` in GGUF order (fastest first),
    ``offset`` from the start of the file, ``n_bytes`` of stored data."""

    name: str
    qtype: str
    dims: tuple[int, ...]
    offset: int
    n_bytes: int


class GGUFFile:
    """A GGUF file's header (metadata and tensor table) and a read-only map of its data.

    The ``gguf`` package's ``GGUFReader`` builds two numpy views per element of every metadata
    array: 165 MB and 4.5 s for SmolLM2's 49,152-token vocabulary and merge table, more than a
    small model's whole budget. This reads the header once with ``struct`` and keeps a string
    array as its length unless asked for (``string_arrays``), the form transformers' own fast
    reader (``transformers.integrations.gguf.read_gguf_metadata``) gives; block sizes and type
    names come from the ``gguf`` package.

    Raises:
        StoreError: not a GGUF file, or a truncated one (the tensor it ends in named).
        ModelError: a tensor of a block type the ``gguf`` package does not know (named).
    """

    def __init__(self, path: Path, string_arrays: tuple[str, ...] = ()):
        self.path = Path(path)
        self._map = np.memmap(self.path, mode="r", dtype=np.uint8)
        try:
            self.metadata, self.tensors = self._parse(string_arrays)
        except struct.error:
            raise StoreError(f"cannot read GGUF file {self.path}: its header ends early; the file "
                             "is truncated or not GGUF", path=str(self.path)) from None

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def data(self, t: GGUFTensor) -> np.ndarray:
        """``t``'s bytes as the ``gguf`` package shapes them (``GGUFReader``'s ``data``): float
        types as values ``[..., dims[0]]``, block types as ``[..., row bytes]`` of uint8."""
        from gguf.quants import quant_shape_to_byte_shape
        from gguf.constants import GGMLQuantizationType

        shape = tuple(reversed(t.dims))
        raw = self._map[t.offset:t.offset + t.n_bytes]
        if t.qtype in _VALUE_TYPES:
            return raw.view(_VALUE_TYPES[t.qtype]).reshape(shape)
        return raw.reshape(quant_shape_to_byte_shape(shape, GGMLQuantizationType[t.qtype]))

    def release(self, t: GGUFTensor) -> None:
        """Drop the file's pages of ``t`` from this process (``MADV_DONTNEED``): read once,
        they would otherwise count in its RSS until the whole file is unmapped; the kernel
        keeps them as reclaimable page cache at most."""
        import mmap

        m = getattr(self._map, "_mmap", None)
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            m.madvise(mmap.MADV_DONTNEED, start, t.offset + t.n_bytes - start)
        except (OSError, ValueError):   # a read-only or exotic map: the pages only stay longer
            pass

    def _parse(self, string_arrays):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        blob, size, path = self._map, self._map.shape[0], self.path
        if bytes(blob[:4]) != b"GGUF":
            raise StoreError(f"cannot read GGUF file {path}: it does not start with the GGUF "
                             "magic; the file is not GGUF", path=str(path))
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise StoreError(f"GGUF file {path} is version {version}; offload reads versions 2 "
                             "and 3: convert it again with a current llama.cpp", path=str(path))
        pos, metadata = 24, {}
        for _ in range(n_kv):
            key, pos = _string(blob, pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            metadata[key], pos = _value(blob, pos + 4, kind, key in string_arrays)
        if "general.architecture" not in metadata:
            raise StoreError(f"GGUF file {path} has no general.architecture in its metadata: it "
                             "is not a model file", path=str(path))
        entries = []
        for _ in range(n_tensors):
            name, pos = _string(blob, pos)
            (n_dims,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
            raw_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            entries.append((name, dims, raw_type, offset))
        align = int(metadata.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
        tensors = []
        for name, dims, raw_type, offset in entries:
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_bytes = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelError(f"GGUF tensor {name} of {path.name} has block type {raw_type}, "
                                 "which the gguf package does not know: offload cannot decode "
                                 "it; use a GGUF of a type llama-quantize makes (Q4_K_M, Q8_0 "
                                 "...)") from None
            n_bytes = math.prod(dims) * type_bytes // block
            end = start + offset + n_bytes
            if end > size:
                raise StoreError(f"GGUF file {path} ends inside tensor {name} (it needs {end} "
                                 f"bytes, the file has {size}): it is truncated; download it "
                                 "again", path=str(path))
            tensors.append(GGUFTensor(name, qtype.name, tuple(int(d) for d in dims),
                                      start + offset, n_bytes))
        return metadata, tensors


_VALUE_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
# GGUF metadata value types: struct formats of the fixed-width ones (8 string, 9 array)
_KV_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
              12: "d"}


def _string(blob, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", blob, pos)
    if pos + 8 + n > blob.shape[0]:
        raise struct.error("string past the end")
    return bytes(blob[pos + 8:pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n


def _value(blob, pos: int, kind: int, keep_strings: bool):
    """One metadata value and the offset past it; an array of strings is its length unless
    ``keep_strings`` (a vocabulary is walked, not built)."""
    if kind in _KV_FORMAT:
        fmt = "<" + _KV_FORMAT[kind]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if kind == 8:
        return _string(blob, pos)
    if kind != 9:
        raise StoreError(f"GGUF metadata holds a value of unknown type {kind}: the file is "
                         "damaged or newer than this gguf reader")
    item, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if item in _KV_FORMAT:
        fmt = f"<{count}{_KV_FORMAT[item]}"
        return list(struct.unpack_from(fmt, blob, pos)), pos + struct.calcsize(fmt)
    if item != 8:
        raise StoreError(f"GGUF metadata holds an array of type {item}, which offload cannot "
                         "read: the file is damaged or newer than this reader")
    if keep_strings:
        values = []
        for _ in range(count):
            v, pos = _string(blob, pos)
            values.append(v)
        return values, pos
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", blob, pos)
        pos += 8 + n
    return count, pos


def _check_types(path: Path, tensors) -> None:
    for t in tensors:
        name = t.qtype
        if name not in kernels.TYPES and name not in kernels.FLOAT_TYPES:
            raise ModelError(
                f"GGUF tensor {t.name} of {path.name} is {name}, which offload cannot decode "
                f"(it runs {', '.join(kernels.FLOAT_TYPES + tuple(kernels.TYPES))}): use a "
                "GGUF of one of those types (llama.cpp's llama-quantize makes Q4_K_M, Q8_0 "
                "...)")


_EXPERTS = re.compile(r"^(?P<stem>blk\.\d+\.ffn_(?P<w>gate|up|down|gate_up)_exps)\.weight$")


def _group(path: Path, arch: str, tensors, names: dict[str, str]) -> dict[str, tuple]:
    """transformers parameter name -> the GGUF tensors it is made of, as transformers maps
    them: one tensor each, but a layer's experts' ``ffn_gate_exps`` and ``ffn_up_exps`` both
    go to its ``gate_up_proj`` (gate rows first; transformers names the pair by the tensors'
    stem, without ``.weight``).

    Raises:
        ModelError: expert tensors in a file whose header declares no experts, or an
            expert's gate and up projections in two encodings (offload keeps them as one
            tensor of one block type).
    """
    groups: dict[str, list] = {}
    for t in tensors:
        m = _EXPERTS.match(t.name)
        hf = names.get(t.name) or (names.get(m["stem"]) if m else None)
        if hf is None:
            if m:
                raise ModelError(
                    f"GGUF tensor {t.name} of {path.name} holds every expert of its layer, but "
                    f"the file's header declares no experts ({arch}.expert_count): offload "
                    "cannot tell how they are routed; use a GGUF written by a current "
                    "llama.cpp converter, or pack the model from its safetensors checkpoint")
            continue
        groups.setdefault(hf, []).append(t)
    out = {}
    for hf, ts in groups.items():
        ts.sort(key=lambda t: 0 if "_gate_exps" in t.name else 1)   # gate rows, then up rows
        if len({t.qtype for t in ts}) > 1:
            raise ModelError(
                f"GGUF tensors {' and '.join(t.name for t in ts)} of {path.name} are "
                f"{' and '.join(t.qtype for t in ts)}: offload keeps an expert's gate and up "
                "projections as one tensor of one block type; use a GGUF that quantizes them "
                "alike (llama-quantize does unless told otherwise), or pack the model from its "
                "safetensors checkpoint")
        out[hf] = tuple(ts)
    return out


def _hf_names(config, processor, arch: str) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, as transformers maps them; for a
    Mixtral file (``llama`` with experts, which transformers does not load as Mixtral) its
    Llama names plus the experts': fused (``ffn_{gate,up,down}_exps``) or one tensor per
    expert (``ffn_gate.<e>.weight``: files converted before llama.cpp fused them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    if config.model_type != "mixtral":
        return get_gguf_hf_weights_map(skeleton, processor)
    names = get_gguf_hf_weights_map(skeleton, processor, model_type=arch)
    for i in range(config.num_hidden_layers):
        experts = f"model.layers.{i}.mlp.experts"
        names.update({f"blk.{i}.ffn_gate_exps": f"{experts}.gate_up_proj",
                      f"blk.{i}.ffn_up_exps": f"{experts}.gate_up_proj",
                      f"blk.{i}.ffn_down_exps": f"{experts}.down_proj"})
        for e in range(config.num_local_experts):
            for w in ("gate", "up", "down"):
                names[f"blk.{i}.ffn_{w}.{e}.weight"] = f"{experts}.{e}.{w}_proj.weight"
    return names


def _processor(file: GGUFFile, config):
    """transformers' tensor processor for the file's architecture (Llama's q/k permutation)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(file.architecture, TensorProcessor)(config=config.to_dict())


def _load(file: GGUFFile, ts: tuple[GGUFTensor, ...], processor):
    """One parameter's tensor: a GGUF tensor, or a layer's gate and up experts joined along
    their rows (``JoinedExperts``; float ones concatenated as transformers does)."""
    if len(ts) == 1:
        return _load_one(file, ts[0], processor)
    parts = [_load_one(file, t, processor) for t in ts]
    if isinstance(parts[0], QuantizedTensor):
        return JoinedExperts(tuple(parts))
    return torch.cat(parts, dim=1)


def _load_one(file: GGUFFile, t: GGUFTensor, processor):
    """One tensor: float types widened to float32 and processed as transformers does, copied
    out of the file's map; a quantized one as rows of blocks, the processor's row permutation
    applied to them (a copy), else a view of the map that is copied, and its pages let go,
    when it is written (``QuantizedTensor.blob``)."""
    from gguf import dequantize
    from gguf.constants import GGMLQuantizationType

    qtype = t.qtype
    data = file.data(t)
    try:
        if qtype in kernels.FLOAT_TYPES:
            weights = processor.process(
                weights=dequantize(data, GGMLQuantizationType[qtype]), name=t.name).weights
            out = torch.from_numpy(np.array(weights))
            file.release(t)
            return out
        if data.ndim not in (2, 3):
            raise ModelError(f"GGUF tensor {t.name} is a {data.ndim}-D {qtype} tensor: "
                             "offload keeps 2-D quantized tensors (3-D: experts) only; pack "
                             "this model from an unquantized checkpoint")
        order = _row_order(processor, t.name, math.prod(data.shape[:-1]))
        if order is None:   # rows of the map, copied when written (a row-chunk: its rows only)
            return QuantizedTensor(data, qtype, int(t.dims[0]), lambda: file.release(t))
        if data.ndim != 2:
            raise ModelError(f"transformers permutes the rows of the experts in GGUF tensor "
                             f"{t.name}; offload cannot keep it quantized: pack this model "
                             "from an unquantized checkpoint")
        raw = data[order]
    except BaseException:
        file.release(t)
        raise
    file.release(t)
    return QuantizedTensor(raw, qtype, int(t.dims[0]))


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
