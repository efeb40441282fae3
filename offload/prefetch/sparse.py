"""Moving encoded Units: the stored (compressed) bytes cross the slow links, and are decoded on
the compute device into the Unit's dense layout, so the compute is unchanged.

CPU: disk -> the slot's landing buffer (an I/O thread) -> decode (C++ kernel) into the slot
(the decode thread).
GPU: disk -> pinned bounce buffer -> validate on the host -> copy to a device landing buffer
-> decode (CUDA kernel) into the slot, on the copy stream (``tiers/host.py``).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import StoreError
from ..kernels import bitmap
from ..tiers.base import Ticket
from ..tiers.disk import DiskTier
from ..units import Unit


class SparseStats:
    """What decoding cost and saved (bytes are 4096-aligned reads and dense Unit bytes)."""

    def __init__(self):
        self.units = 0
        self.stored_bytes = 0
        self.dense_bytes = 0
        self.decode_seconds = 0.0
        self._lock = threading.Lock()

    def add(self, unit: Unit, seconds: float) -> None:
        with self._lock:
            self.units += 1
            self.stored_bytes += unit.stored_bytes
            self.dense_bytes += unit.nbytes
            self.decode_seconds += seconds

    def as_dict(self) -> dict:
        return {"units_decoded": self.units, "stored_bytes": self.stored_bytes,
                "dense_bytes": self.dense_bytes,
                "ratio": self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0,
                "decode_seconds": self.decode_seconds,
                "decode_gbps": (self.dense_bytes / self.decode_seconds / 1e9
                                if self.decode_seconds else 0.0)}


def validate_unit(unit: Unit, stored: torch.Tensor) -> None:
    """Check every bitmap of ``unit`` (its stored bytes, on the CPU) before it is decoded.

    Raises:
        StoreError: naming the Unit and tensor whose set bits disagree with its values.
    """
    for t in unit.tensors:
        if t.encoding == "bitmap":
            at, n = t.source
            try:
                bitmap.validate(stored[at:at + n], t.numel, t.nnz)
            except bitmap.CorruptBitmap as e:
                raise _corrupt(unit, t.name, e) from None


def decode_unit(unit: Unit, stored: torch.Tensor, dest: torch.Tensor, *, stream=None) -> None:
    """Decode ``unit`` from its stored bytes into its dense layout in ``dest`` (same device).

    On the CPU each bitmap is validated as it is decoded (``StoreError`` naming the Unit)."""
    for t in unit.tensors:
        at, n = t.source
        src, out = stored[at:at + n], dest[t.offset:t.offset + t.nbytes]
        if t.encoding != "bitmap":
            out.copy_(src, non_blocking=True)
            continue
        try:
            bitmap.decode(src, out, t.numel, t.nnz, t.torch_dtype.itemsize, stream=stream)
        except bitmap.CorruptBitmap as e:
            raise _corrupt(unit, t.name, e) from None


def _corrupt(unit: Unit, tensor: str, e: Exception) -> StoreError:
    return StoreError(f"unit {unit.key}, tensor {tensor}: {e}: the store is corrupt; delete it "
                      "and pack again", unit=unit.key)


class HostDecoder:
    """CPU compute device: encoded Units are read by the disk tier's I/O threads into their
    slot's landing buffer, then decoded into the slot by one decode thread.

    Why a thread of its own: decoding in the I/O thread after its read kept that thread from
    starting its next read, so fewer reads were in flight while Units decoded. Landing buffer
    ``i`` belongs to slot ``i``: it is free again once slot ``i``'s previous decode finished,
    which happened before that slot's Unit was consumed and the slot refilled.
    """

    def __init__(self, disk: DiskTier, landings: list[torch.Tensor], stats: SparseStats):
        self.disk = disk
        self.stats = stats
        self.landings = landings
        self._landing_np = [b.numpy() for b in landings]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-decode")

    def submit(self, unit: Unit, slot, *, verify: bool) -> Ticket:
        done: Future = Future()
        landing = self.landings[slot.index]
        read = self.disk.submit(unit, self._landing_np[slot.index], verify=verify)._future

        def decode_after(f: Future) -> None:
            if f.exception() is not None:
                if done.set_running_or_notify_cancel():
                    done.set_exception(f.exception())
                return
            try:
                self._pool.submit(self._decode, unit, landing, slot.buffer, f.result(), done)
            except RuntimeError as e:   # closed (or the interpreter exiting): never decoded
                if done.set_running_or_notify_cancel():
                    done.set_exception(e)

        read.add_done_callback(decode_after)
        return Ticket(unit.key, unit.stored_bytes, done)

    def _decode(self, unit: Unit, landing: torch.Tensor, dest: torch.Tensor, read_s: float,
                done: Future) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            t0 = time.perf_counter()
            decode_unit(unit, landing, dest)
            self.stats.add(unit, time.perf_counter() - t0)
        except BaseException as e:   # reported by the pipeline's wait, on the compute thread
            done.set_exception(e)
            return
        done.set_result(read_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
