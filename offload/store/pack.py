"""Write a packed store once: aligned Units, a CRC32 per Unit, atomically renamed into place."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Callable

import torch

from ..errors import HardwareError, StoreError
from ..sizes import format_bytes
from ..units import TENSOR_ALIGN, TensorPart, TensorSpec, Unit, UnitSpec, align
from ..kernels import gguf
from ..memory import release_free_heap
from .format import BLOCK, DATA_FILE, MANIFEST_FILE, Manifest
from .gguf_source import QuantizedTensor

log = logging.getLogger(__name__)


def store_bytes(specs: list[UnitSpec]) -> int:
    """Bytes the data file of a store of these Units takes on disk."""
    return sum(align(s.layout()[1], BLOCK) for s in specs)


# An encoded tensor as stored: (bytes, encoding name, non-zero count for ``bitmap``).
Encoded = "tuple[torch.Tensor, str, int | None]"
Encoder = Callable[[UnitSpec, TensorPart, torch.Tensor],
                   tuple[torch.Tensor, "Encoded | None"]]


def write_store(out_dir: str | os.PathLike, specs: list[UnitSpec],
                load: Callable[[str], torch.Tensor], meta: dict, *,
                progress: bool = True,
                extras: Callable[[Path], None] | None = None,
                encoder: Encoder | None = None) -> Manifest:
    """Write ``specs`` as a packed store at ``out_dir``, replacing any store there.

    The store is written under a temporary name beside ``out_dir``, fsynced, and renamed into
    place only when complete, so an interrupted pack leaves no store that could be misread.

    Args:
        out_dir: the store directory to create or replace.
        specs: the Units in file order.
        load: returns the checkpoint tensor of a source name (called once per part).
        meta: manifest fields: model_type, config, dtype, source, tied.
        progress: show a progress bar (tqdm) on stderr.
        extras: writes further files (a tokenizer) into the temporary directory, so they are
            committed by the same rename as the Units.
        encoder: given a Unit's spec, a part and its tensor, returns the tensor to store (a
            pruned one, say) and, where it should be stored encoded, ``(bytes, "bitmap", nnz)``
            (``offload.kernels.bitmap``). A GGUF tensor (``QuantizedTensor``) is stored as its
            blocks (``gguf.<type>``) whatever the encoder. A Unit with an encoded tensor stores
            every tensor at ``stored_offset`` and is decoded into the dense layout when read.

    Raises:
        HardwareError: the parent directory is not writable or has too little free space.
        StoreError: a tensor's shape or dtype differs from what the spec promised.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists():
        raise StoreError(f"{out_dir} exists and is not a packed store; refusing to replace it: "
                         "choose another output path", path=str(out_dir))
    total = store_bytes(specs)
    parent = out_dir.parent
    _check_writable(parent, total)
    tmp = parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        units, written = _write_units(tmp / DATA_FILE, specs, load, progress, out_dir.name,
                                      encoder)
        manifest = Manifest(out_dir, meta["model_type"], meta["config"], meta["dtype"],
                            meta["source"], tuple(units), meta.get("tied", {}), written)
        if extras is not None:
            extras(tmp)
        _write_file(tmp / MANIFEST_FILE, json.dumps(manifest.to_json(), indent=1).encode())
        _replace_dir(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HardwareError(
                f"the offload dir {parent} ran out of space while packing ({format_bytes(total)}"
                " needed); free space or choose another --offload-dir", path=str(parent),
                needed_bytes=total) from e
        raise HardwareError(f"cannot write the packed store at {out_dir}: {e}",
                            path=str(out_dir)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    release_free_heap()   # the pack's freed buffers: back to the OS before a run takes its budget
    log.info("packed %d units (%s) into %s", len(units), format_bytes(total), out_dir)
    return manifest


def _check_writable(parent: Path, total: int) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HardwareError(f"cannot create the offload dir {parent}: {e.strerror}; choose a "
                            "writable --offload-dir", path=str(parent)) from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HardwareError(f"the offload dir {parent} is not writable; choose a writable "
                            "--offload-dir or fix its permissions", path=str(parent))
    free = shutil.disk_usage(parent).free
    if free < total + (64 << 20):
        raise HardwareError(
            f"the offload dir {parent} has {format_bytes(free)} free but the packed store needs "
            f"{format_bytes(total)} (plus 64 MB headroom); free space or choose another "
            "--offload-dir", path=str(parent), needed_bytes=total, free_bytes=free)


def _write_units(path: Path, specs: list[UnitSpec], load, progress: bool, name: str,
                 encoder: Encoder | None) -> tuple[list[Unit], int]:
    from tqdm.auto import tqdm

    last: dict = {}

    def load_once(name: str):
        """The last two tensors loaded, again: a row-chunked tensor loads once, not per chunk,
        and a layer's fused experts (``gate_up_proj``, ``down_proj``: each expert takes a slice
        of both) once, not per expert."""
        if name not in last:
            if len(last) == 2:
                del last[next(iter(last))]
            last[name] = load(name)
        return last[name]

    units, offset = [], 0
    # Counted in Units: an encoded Unit's stored bytes are known only once it is encoded, and
    # a byte count of the decoded sizes read 538M for SmolLM2's 97 MB store.
    bar = tqdm(total=len(specs), unit="unit", desc=f"packing {name}", disable=not progress,
               leave=False)
    with open(path, "wb") as f:
        for spec in specs:
            tensors, nbytes = spec.layout()
            datas = []
            for part in spec.parts:
                t = _part_tensor(part, load_once)
                if isinstance(t, QuantizedTensor):   # stored as the file's blocks
                    datas.append((t, (t.blob(), gguf.encoding(t.qtype), None)))
                else:
                    datas.append(encoder(spec, part, t) if encoder is not None else (t, None))
            stored = None
            if any(enc is not None for _, enc in datas):
                tensors, stored = stored_layout(tensors, [
                    None if enc is None else (enc[1], enc[0].numel(), enc[2])
                    for _, enc in datas])
            end = nbytes if stored is None else stored
            checksum = _write_unit(f, [(enc[0] if enc is not None else
                                        t.reshape(-1).view(torch.uint8), *ts.source)
                                       for (t, enc), ts in zip(datas, tensors)],
                                   end, align(end, BLOCK))
            del datas
            units.append(Unit(spec.key, spec.kind, spec.group, spec.index, offset, nbytes,
                              checksum, tuple(tensors), spec.rows, spec.expert, stored))
            offset += align(end, BLOCK)
            bar.set_postfix_str(f"{format_bytes(offset)} written", refresh=False)
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    return units, offset


def _write_unit(f, pieces: list[tuple[torch.Tensor, int, int]], end: int, size: int) -> int:
    """Write one Unit of ``size`` bytes from ``pieces`` (uint8 tensors at their offsets, of
    their byte counts, zeros between) straight to ``f``, and return the CRC32 of its first
    ``end`` bytes. Streaming the tensors keeps a pack's memory at the tensors themselves (no
    Unit-sized buffer)."""
    crc, pos = 0, 0
    for blob, at, n in sorted(pieces, key=lambda p: p[1]):
        if blob.numel() != n or at < pos:
            raise StoreError(f"a tensor of {blob.numel()} bytes does not fit its {n}-byte "
                             f"place at {at} of its Unit: the store layout is inconsistent")
        if at > pos:
            pad = bytes(at - pos)
            f.write(pad)
            crc = zlib.crc32(pad, crc)
        data = memoryview(blob.numpy())
        f.write(data)
        crc = zlib.crc32(data, crc)
        pos = at + blob.numel()
    if end > pos:
        crc = zlib.crc32(bytes(end - pos), crc)
    if size > pos:
        f.write(bytes(size - pos))
    return crc


def stored_layout(tensors: list[TensorSpec], encoded) -> tuple[list[TensorSpec], int]:
    """Where each tensor of an encoded Unit is stored: ``encoded[i]`` is ``(encoding, stored
    bytes, non-zero count or None)`` for an encoded tensor, ``None`` for one stored as it is;
    each at ``TENSOR_ALIGN``. Returns the tensors' specs and the Unit's stored bytes."""
    out, off = [], 0
    for ts, enc in zip(tensors, encoded):
        off = align(off, TENSOR_ALIGN)
        if enc is None:
            out.append(dataclasses.replace(ts, stored_offset=off, stored_nbytes=ts.nbytes))
            off += ts.nbytes
        else:
            encoding, nbytes, nnz = enc
            out.append(dataclasses.replace(ts, encoding=encoding, stored_offset=off,
                                           stored_nbytes=nbytes, nnz=nnz))
            off += nbytes
    return out, off


def units_as_packed(specs: list[UnitSpec], row_bytes: dict[str, tuple[str, int]]) -> list[Unit]:
    """The Units a pack of ``specs`` would write, without reading a weight: each tensor of a
    source named in ``row_bytes`` (``name -> (encoding, stored bytes per row)``: a GGUF's
    block-quantized tensors) stored in that encoding, every other one dense. Checksums are 0:
    nothing was written. What ``offload plan`` plans on before a store exists."""
    units, offset = [], 0
    for spec in specs:
        tensors, nbytes = spec.layout()
        encoded = [None if p.source not in row_bytes else
                   (row_bytes[p.source][0], p.shape[0] * row_bytes[p.source][1], None)
                   for p in spec.parts]
        stored = None
        if any(e is not None for e in encoded):
            tensors, stored = stored_layout(tensors, encoded)
        units.append(Unit(spec.key, spec.kind, spec.group, spec.index, offset, nbytes, 0,
                          tuple(tensors), spec.rows, spec.expert, stored))
        offset += align(nbytes if stored is None else stored, BLOCK)
    return units


def _part_tensor(part: TensorPart, load) -> torch.Tensor | QuantizedTensor:
    t = load(part.source)
    if part.index is not None:   # one expert of a layer's fused experts
        t = t[part.index]
    quantized = isinstance(t, QuantizedTensor)
    if part.rows is not None:
        t = t.rows(*part.rows) if quantized else t[part.rows[0]:part.rows[1]]
    if part.concat:
        more = [load(name) for name in part.concat]
        t = t.cat(more) if quantized else torch.cat([t, *more], dim=0)
    if tuple(t.shape) != part.shape or t.dtype != part.dtype:
        raise StoreError(f"tensor {part.source} is {tuple(t.shape)} {t.dtype}, expected "
                         f"{part.shape} {part.dtype}: the checkpoint does not match its config")
    return t if quantized else t.detach().to("cpu").contiguous()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_partials(parent: Path, name: str) -> None:
    """Remove leftovers of interrupted packs of ``name`` (from processes no longer alive)."""
    if not parent.is_dir():
        return
    for p in parent.glob(f".{name}.partial-*"):
        pid = p.name.rsplit("-", 2)[-2]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
