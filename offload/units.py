"""Units and their tensors: the smallest things the planner places and one read fetches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

KINDS = ("layer", "expert", "kv", "static")
TENSOR_ALIGN = 256    # tensor alignment inside a Unit: SIMD kernels see the alignment they expect.


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside a Unit.

    ``offset`` and ``nbytes`` place the decoded tensor in the Unit's memory (a slot or the
    resident arena), relative to the Unit's first byte. In an encoded Unit, ``stored_offset``
    and ``stored_nbytes`` place its bytes as read from the store, and a ``bitmap`` tensor holds
    ``nnz`` non-zero values (``offload.kernels.bitmap`` gives the layout).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    encoding: str = "dense"
    stored_offset: int | None = None
    stored_nbytes: int | None = None
    nnz: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return self.nbytes // self.torch_dtype.itemsize

    @property
    def source(self) -> tuple[int, int]:
        """(offset, nbytes) of the tensor's bytes as stored."""
        if self.stored_offset is None:
            return self.offset, self.nbytes
        return self.stored_offset, self.stored_nbytes

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
             "offset": self.offset, "nbytes": self.nbytes, "encoding": self.encoding}
        if self.stored_offset is not None:
            d.update(stored_offset=self.stored_offset, stored_nbytes=self.stored_nbytes)
        if self.nnz is not None:
            d["nnz"] = self.nnz
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d["offset"], d["nbytes"],
                   d.get("encoding", "dense"), d.get("stored_offset"), d.get("stored_nbytes"),
                   d.get("nnz"))


@dataclass(frozen=True)
class Unit:
    """A piece of a model placed and moved as one aligned read.

    Attributes:
        key: unique name, e.g. ``layer.3``, ``embed.0``, ``norm``.
        kind: one of ``KINDS``.
        group: what the Unit is part of: ``layer`` for decoder layers, or a static group name
            (``embed``, ``head``, ``norm``) whose parts may be row-chunks of one tensor.
        index: the layer number, or the chunk number inside a static group.
        offset: byte offset of the Unit in the store's data file (a multiple of 4096).
        nbytes: bytes of tensor data in memory (a slot holds this many).
        checksum: CRC32 of the bytes as stored (``stored_bytes`` of them).
        rows: for a row-chunk of a larger tensor, the ``[start, stop)`` rows it holds.
        expert: for an ``expert`` Unit, the expert's number inside layer ``index``.
        stored_nbytes: for an encoded Unit (some tensors ``bitmap``), the bytes stored and read
            (decoded into ``nbytes`` on the compute device); ``None`` when stored as in memory.
    """

    key: str
    kind: str
    group: str
    index: int
    offset: int
    nbytes: int
    checksum: int
    tensors: tuple[TensorSpec, ...]
    rows: tuple[int, int] | None = None
    expert: int | None = None
    stored_nbytes: int | None = None

    @property
    def encoded(self) -> bool:
        return self.stored_nbytes is not None

    @property
    def stored_bytes(self) -> int:
        """Bytes of the Unit in the store: what one read moves (before 4096 rounding)."""
        return self.nbytes if self.stored_nbytes is None else self.stored_nbytes

    @property
    def layout(self) -> tuple:
        """Tensors' names, dtypes, shapes and offsets: Units with one layout share slot views."""
        return tuple((t.name, t.dtype, t.shape, t.offset) for t in self.tensors)

    def to_json(self) -> dict:
        return {"key": self.key, "kind": self.kind, "group": self.group, "index": self.index,
                "offset": self.offset, "nbytes": self.nbytes, "checksum": self.checksum,
                "rows": list(self.rows) if self.rows else None, "expert": self.expert,
                "stored_nbytes": self.stored_nbytes,
                "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, d: dict) -> "Unit":
        return cls(d["key"], d["kind"], d["group"], d["index"], d["offset"], d["nbytes"],
                   d["checksum"], tuple(TensorSpec.from_json(t) for t in d["tensors"]),
                   tuple(d["rows"]) if d.get("rows") else None, d.get("expert"),
                   d.get("stored_nbytes"))


@dataclass(frozen=True)
class TensorPart:
    """One tensor of a Unit to be packed: ``source`` names the checkpoint tensor, ``rows`` an
    optional ``[start, stop)`` row slice of it, ``index`` an optional index along its first
    dimension (one expert of a fused ``[experts, ...]`` tensor), and ``concat`` further
    checkpoint tensors appended along dimension 0 (an expert's gate and up projections stored
    apart become one ``gate_up`` tensor)."""

    name: str
    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: tuple[int, int] | None = None
    index: int | None = None
    concat: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class UnitSpec:
    """A Unit before it is written: where its tensors come from."""

    key: str
    kind: str
    group: str
    index: int
    parts: tuple[TensorPart, ...]
    rows: tuple[int, int] | None = None
    expert: int | None = None

    def layout(self) -> tuple[list[TensorSpec], int]:
        specs, off = [], 0
        for p in self.parts:
            off = align(off, TENSOR_ALIGN)
            specs.append(TensorSpec(p.name, DTYPE_NAMES[p.dtype], p.shape, off, p.nbytes))
            off += p.nbytes
        return specs, off


def align(n: int, to: int) -> int:
    """Round ``n`` up to a multiple of ``to``."""
    return (n + to - 1) // to * to
