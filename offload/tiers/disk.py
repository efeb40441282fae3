"""The Disk tier: one packed data file read with O_DIRECT into caller buffers.

Reads bypass the page cache, so a budget is honest: the kernel does not quietly keep the model
in RAM for us. Where the filesystem refuses O_DIRECT (tmpfs, some overlays) the tier falls back
to buffered reads followed by ``POSIX_FADV_DONTNEED``, and says so in ``direct``.

Reads here are synchronous and thread-safe; what runs them in the background is the runtime's
one Transport (``offload/runtime/transport.py``), so every read of the file is counted in one
place.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
import zlib

import numpy as np

from ..errors import StoreError
from ..units import Unit, align

log = logging.getLogger(__name__)

BLOCK = 4096
CHUNK_BYTES = 8 << 20   # one preadv per 8 MiB keeps a read in flight without huge syscalls


class DiskTier:
    """Reads Units of one data file into aligned host buffers, from any thread.

    Args:
        path: the store's data file.
        direct: try O_DIRECT (default); ``False`` forces buffered reads.
    """

    def __init__(self, path: str | os.PathLike, *, direct: bool = True):
        self.path = os.fspath(path)
        self.direct = False
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.warning("O_DIRECT refused on %s; using buffered reads with "
                            "POSIX_FADV_DONTNEED (the page cache may briefly hold pages)", path)
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        self.bytes_read = 0
        self.busy_seconds = 0.0   # summed over threads
        self.wall_seconds = 0.0   # wall time with at least one read in flight
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0

    def read(self, unit: Unit, dest: np.ndarray, verify: bool = True) -> float:
        """Read ``unit`` into ``dest`` (uint8, 4096-aligned, at least the aligned size); with
        ``verify`` check its CRC32 once the bytes land. Returns the seconds it took."""
        t0 = time.perf_counter()
        with self._lock:
            if self._active == 0:
                self._since = t0
            self._active += 1
        try:
            self._read_into(unit, dest, verify)
        finally:
            t1 = time.perf_counter()
            with self._lock:
                self._active -= 1
                self.busy_seconds += t1 - t0
                if self._active == 0:
                    self.wall_seconds += t1 - self._since
        return t1 - t0

    def _read_into(self, unit: Unit, dest: np.ndarray, verify: bool) -> None:
        length = align(unit.stored_bytes, BLOCK)   # an encoded Unit moves as stored
        if dest.nbytes < length or (self.direct and dest.ctypes.data % BLOCK):
            raise ValueError(f"buffer for {unit.key} is too small or misaligned")
        done = 0
        while done < length:
            n = min(CHUNK_BYTES, length - done)
            got = os.preadv(self._fd, [dest[done:done + n]], unit.offset + done)
            if got <= 0:
                raise self._truncated(unit)
            done += got
        if not self.direct:
            os.posix_fadvise(self._fd, unit.offset, length, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += length
        if verify:
            self.check(unit, dest)

    def check(self, unit: Unit, data: np.ndarray) -> None:
        """Raise StoreError naming ``unit`` unless ``data`` starts with its bytes (CRC32)."""
        if zlib.crc32(data[:unit.stored_bytes]) != unit.checksum:
            raise self._corrupt(unit)

    def read_rows(self, unit: Unit, offset: int, row_bytes: int, rows: list[int],
                  out: np.ndarray, scratch: np.ndarray) -> None:
        """Read rows ``rows`` of the row-major tensor at ``offset`` inside ``unit`` into
        ``out[i]`` (uint8, ``[len(rows), row_bytes]``): one aligned read per row through
        ``scratch`` (aligned, at least ``row_bytes + 2 * 4096``). Synchronous: a few KB."""
        for i, r in enumerate(rows):
            start = unit.offset + offset + r * row_bytes
            base = start // BLOCK * BLOCK
            length = align(start + row_bytes - base, BLOCK)
            got = os.preadv(self._fd, [scratch[:length]], base)
            if got < start + row_bytes - base:
                raise self._truncated(unit)
            out[i] = scratch[start - base:start - base + row_bytes]
            with self._lock:
                self.bytes_read += length

    def verify(self, unit: Unit, scratch: np.ndarray) -> None:
        """Check ``unit``'s CRC32 by reading it through ``scratch`` (aligned) piece by piece."""
        crc, done, step, total = 0, 0, scratch.nbytes // BLOCK * BLOCK, unit.stored_bytes
        while done < total:
            n = min(step, align(total - done, BLOCK))
            got = os.preadv(self._fd, [scratch[:n]], unit.offset + done)
            take = min(got, total - done)
            if take <= 0:
                raise self._truncated(unit)
            crc = zlib.crc32(scratch[:take], crc)
            done += take
        if crc != unit.checksum:
            raise self._corrupt(unit)

    def _corrupt(self, unit: Unit) -> StoreError:
        return StoreError(f"checksum mismatch in unit {unit.key} of {self.path}: the store is "
                          "corrupt; delete it (or run `offload pack` again) to rebuild it",
                          path=self.path, unit=unit.key)

    def _truncated(self, unit: Unit) -> StoreError:
        return StoreError(f"the store's data file {self.path} ends inside unit {unit.key} "
                          "(truncated store): delete it and pack again",
                          path=self.path, unit=unit.key)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
