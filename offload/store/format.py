"""The on-disk format of a packed store and its manifest.

A store is a directory holding ``units.bin`` (every Unit starts on a 4 KiB boundary and its
read length is a multiple of 4 KiB, so one Unit is one O_DIRECT read) and ``manifest.json``.
A store of another format version is refused, never misread.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreError
from ..units import Unit

FORMAT_NAME = "offload-store"
FORMAT_VERSION = 3   # 2: layers split into attention and MLP Units; 3: bitmap-encoded tensors
READABLE_VERSIONS = (2, 3)   # a version-2 store is a version-3 store with no encoded tensor
BLOCK = 4096          # Unit alignment in the file and in memory: the O_DIRECT granule.
DATA_FILE = "units.bin"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """What a store holds: its Units, the model config and where the weights came from."""

    path: Path
    model_type: str
    config: dict
    dtype: str
    source: dict
    units: tuple[Unit, ...]
    tied: dict = field(default_factory=dict)
    data_bytes: int = 0

    @property
    def data_path(self) -> Path:
        return self.path / DATA_FILE

    @property
    def weight_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def groups(self) -> dict[str, list[str]]:
        """Group name -> unit keys, in store order."""
        groups: dict[str, list[str]] = {}
        for u in self.units:
            groups.setdefault(u.group, []).append(u.key)
        return groups

    def unit(self, key: str) -> Unit:
        for u in self.units:
            if u.key == key:
                return u
        raise KeyError(key)

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_type": self.model_type,
                "dtype": self.dtype, "source": self.source, "config": self.config,
                "tied": self.tied, "data_file": DATA_FILE, "data_bytes": self.data_bytes,
                "units": [u.to_json() for u in self.units]}


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Open a store's manifest and check it against its data file.

    Raises:
        StoreError: no manifest, unreadable JSON, another format version, or a data file
            shorter than the manifest says (a truncated store).
    """
    path = Path(path)
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise StoreError(f"no packed store at {path}: {MANIFEST_FILE} is missing; "
                         "run `offload pack MODEL OUT` to build one", path=str(path))
    try:
        d = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"the manifest of store {path} is unreadable ({e}); delete the store "
                         "and pack again", path=str(path)) from e
    if d.get("format") != FORMAT_NAME or d.get("version") not in READABLE_VERSIONS:
        raise StoreError(
            f"store {path} has format {d.get('format')!r} version {d.get('version')!r}; this "
            f"offload reads {FORMAT_NAME!r} versions {READABLE_VERSIONS}: pack the model again",
            path=str(path))
    try:
        units = tuple(Unit.from_json(u) for u in d["units"])
        m = Manifest(path, d["model_type"], d["config"], d["dtype"], d["source"], units,
                     d.get("tied", {}), d["data_bytes"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"the manifest of store {path} is malformed ({e!r}); delete the store "
                         "and pack again", path=str(path)) from e
    size = m.data_path.stat().st_size if m.data_path.exists() else -1
    if size < m.data_bytes:
        raise StoreError(
            f"store {path} is truncated: {DATA_FILE} holds {max(size, 0)} bytes, the manifest "
            f"says {m.data_bytes}; delete the store and pack again", path=str(path))
    return m
