"""A paged KV cache for transformers models: recent blocks on the compute device, older blocks
spilled to a scratch file on disk and read back ahead of the layer that needs them.

Each layer's cache is a list of blocks of ``block_tokens`` positions (``[B, H, bt, D]`` keys and
values). A layer keeps its newest ``device_blocks`` full blocks and its partial tail block in a
pool on the compute device; an older block is written to the scratch file (O_DIRECT) and its
device block reused. ``update`` returns the layer's whole keys and values gathered into one of
two ``[B, H, max_context, D]`` buffers (a view of the first ``T`` positions): layer ``i`` uses
buffer ``i % 2`` while the disk blocks of layer ``i + 1`` are read into the other one by a
reader thread. The values returned are DynamicCache's, position for position, so attention over
them gives bitwise the same logits (``tests/test_kv.py``).

Memory on the compute device: ``2 x 2 x B x H x max_context x D`` bytes of gather buffers plus
``layers x (device_blocks + 1) + 1`` blocks (keys and values each; the spare lets a prefill chunk
of up to a block cross a block boundary): ``device_bytes`` says it before the first token.
CPU compute device only for now.
"""
from __future__ import annotations

import errno
import os
import tempfile
import time

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..planner.kv import kv_geometry
from ..tiers.base import Ticket
from ..tiers.device import aligned_host
from ..tiers.transport import Transport


class KVStats:
    def __init__(self):
        self.spilled_blocks = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.stall_seconds = 0.0


class PagedKVCache(Cache):
    """A transformers ``Cache`` whose older blocks live on disk.

    Args:
        config: the model's config (layers, KV heads, head size).
        max_context: the most positions a sequence may reach (sizes the gather buffers).
        batch: sequences per forward.
        dtype: the KV dtype (the model's).
        block_tokens: positions per block (raised so a block row is a multiple of 4096 bytes).
        device_blocks: full blocks per layer kept on the compute device (the newest ones).
        spill_dir: where the scratch file goes (it is unlinked at once: nothing is left behind).
        transport: the runtime's Transport, which reads spilled blocks back (its ``kv``
            consumer); a cache made on its own gets one reader thread of its own.

    Raises:
        ValueError: a bad size, or ``update`` past ``max_context`` or with another batch.
    """

    def __init__(self, config, *, max_context: int, batch: int = 1, dtype=torch.float32,
                 block_tokens: int = 256, device_blocks: int = 4, spill_dir=None,
                 transport: Transport | None = None):
        if max_context < 1 or batch < 1 or device_blocks < 1:
            raise ValueError("max_context, batch and device_blocks must be at least 1")
        g = kv_geometry(config, max_context, batch, dtype, block_tokens, device_blocks)
        bt, heads, head_dim = g["block_tokens"], g["heads"], g["head_dim"]
        self.shape = (batch, heads, bt, head_dim)
        self.block_tokens, self.device_blocks, self.dtype = bt, device_blocks, dtype
        self.max_context = max_context            # the limit; buffers are whole blocks
        self._positions = g["max_context"]
        self.block_bytes = g["block_bytes"]                    # keys (values the same)
        self.stats = KVStats()
        self._closed = False
        self._gather = [(self._host(self._positions), self._host(self._positions))
                        for _ in range(2)]
        self._pool = [self._host(bt) for _ in range(g["pool_blocks"])]
        self.device_bytes = g["device_bytes"]
        self._spill = _SpillFile(spill_dir, 2 * self.block_bytes)
        self._owns_transport = transport is None
        self._transport = transport if transport is not None else Transport(1)
        self._pending: dict[int, Ticket] = {}
        super().__init__(layers=[PagedLayer(self, i) for i in range(config.num_hidden_layers)])

    def _host(self, positions: int) -> torch.Tensor:
        b, h, _, d = self.shape
        n = b * h * positions * d
        return aligned_host(n * self.dtype.itemsize).view(self.dtype).view(b, h, positions, d)

    # -- blocks --------------------------------------------------------------------------
    def take_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pool.pop(), self._pool.pop()

    def give_block(self, kv) -> None:
        self._pool.extend(kv)

    def spill(self, kv) -> int:
        slot = self._spill.write(_bytes(kv[0]), _bytes(kv[1]))
        self.stats.spilled_blocks += 1
        self.stats.bytes_written += 2 * self.block_bytes
        self.give_block(kv)
        return slot

    def read_blocks(self, layer: "PagedLayer", parity: int) -> float:
        """Read ``layer``'s spilled blocks into gather buffer ``parity`` (an I/O thread, or the
        compute thread when nothing was prefetched); returns the seconds it took."""
        t0 = time.perf_counter()
        gk, gv = self._gather[parity]
        b, h, bt, _ = self.shape
        for j, (where, slot) in enumerate(layer.blocks):
            if where != "disk":
                continue
            dests = [gk[i, k, j * bt:(j + 1) * bt] for i in range(b) for k in range(h)] + \
                    [gv[i, k, j * bt:(j + 1) * bt] for i in range(b) for k in range(h)]
            self._spill.read(slot, [_bytes(t) for t in dests])
            self.stats.bytes_read += 2 * self.block_bytes
        return time.perf_counter() - t0

    def prefetch(self, layer_idx: int, parity: int) -> None:
        """Start reading ``layer_idx``'s spilled blocks into gather buffer ``parity``. After
        the last layer, the next pass's layer 0 (buffer 0), when the last layer's buffer is
        the other one (an even number of layers)."""
        if layer_idx == len(self.layers) and layer_idx % 2 == 0:
            layer_idx, parity = 0, 0
        if layer_idx < len(self.layers) and self.layers[layer_idx].has_spilled():
            layer = self.layers[layer_idx]
            nbytes = 2 * self.block_bytes * sum(w == "disk" for w, _ in layer.blocks)
            self._pending[layer_idx] = self._transport.submit(
                self.read_blocks, layer, parity, key=f"kv.{layer_idx}", nbytes=nbytes,
                consumer="kv")

    def wait(self, layer_idx: int) -> bool:
        """Wait for ``layer_idx``'s prefetch; False if none was started."""
        ticket = self._pending.pop(layer_idx, None)
        if ticket is None:
            return False
        before = self._transport.stall["kv"]
        try:
            self._transport.wait(ticket, "kv")
        finally:
            self.stats.stall_seconds += self._transport.stall["kv"] - before
        return True

    def report(self) -> dict:
        """KV bytes per tier, the disk traffic and the time compute waited for it."""
        return {"device_bytes": self.device_bytes,
                "disk_bytes": self._spill.slots * 2 * self.block_bytes,
                "positions": self.get_seq_length(), "spilled_blocks": self.stats.spilled_blocks,
                "bytes_written": self.stats.bytes_written, "bytes_read": self.stats.bytes_read,
                "stall_seconds": self.stats.stall_seconds}

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this PagedKVCache was closed (its model was released); make a "
                               "new cache for the next generation")

    def close(self) -> None:
        """Stop the reader, drop the scratch file and the buffers."""
        if self._closed:
            return
        self._closed = True
        for ticket in self._pending.values():   # never free buffers a read still writes
            try:
                ticket.wait()
            except Exception:   # the error was or will never be reported: closing
                pass
        self._pending.clear()
        if self._owns_transport:
            self._transport.close()
        self._spill.close()
        self._gather, self._pool = [], []

    def reset(self) -> None:
        """Forget every position (a new generation); the buffers and file are reused."""
        self.check_open()
        self.wait_all()
        for layer in self.layers:
            layer.reset()
        self._spill.reset()

    def wait_all(self) -> None:
        for i in list(self._pending):
            self.wait(i)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions of every layer (negative: drop that many
        from the end), as ``DynamicCache.crop``: blocks past them go back to the pool or free
        their disk slots, and a partial last block on disk is read back to the device, where
        the next positions are appended (a chat turn that re-tokenises its history otherwise,
        assisted decoding)."""
        self.check_open()
        self.wait_all()
        if max_length < 0:
            max_length = max(0, self.get_seq_length() + max_length)
        for layer in self.layers:
            layer.crop(max_length)


class PagedLayer(CacheLayerMixin):
    """One layer of a ``PagedKVCache``: its blocks, in order (``("device", (k, v))`` or
    ``("disk", slot)``), the last one holding ``tail`` positions."""

    is_sliding = False

    def __init__(self, cache: PagedKVCache, index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.blocks: list[tuple[str, object]] = []
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def has_spilled(self) -> bool:
        return any(w == "disk" for w, _ in self.blocks)

    def update(self, key_states, value_states, *args, **kwargs):
        c = self.cache
        c.check_open()
        b, h, bt, d = c.shape
        new = key_states.shape[-2]
        if tuple(key_states.shape[:2]) != (b, h) or key_states.shape[-1] != d:
            raise ValueError(f"PagedKVCache was made for batch {b}, {h} KV heads of {d}; got "
                             f"keys of shape {tuple(key_states.shape)}")
        if self.length + new > c.max_context:
            raise ValueError(f"this forward needs {self.length + new} positions but the "
                             f"PagedKVCache holds {c.max_context}: make it with a larger "
                             "max_context")
        self._append(key_states, value_states)
        parity = self.index % 2
        if not c.wait(self.index):
            c.read_blocks(self, parity)   # nothing prefetched (the first layer of a pass)
        c.prefetch(self.index + 1, 1 - parity)
        gk, gv = c._gather[parity]
        for j, (where, kv) in enumerate(self.blocks):
            if where == "device":
                n = min(bt, self.length - j * bt)
                gk[:, :, j * bt:j * bt + n].copy_(kv[0][:, :, :n])
                gv[:, :, j * bt:j * bt + n].copy_(kv[1][:, :, :n])
        self._spill_old()
        return gk[:, :, :self.length], gv[:, :, :self.length]

    def _append(self, key_states, value_states) -> None:
        bt = self.cache.block_tokens
        done, new = 0, key_states.shape[-2]
        while done < new:
            at = self.length % bt
            if at == 0:
                self.blocks.append(("device", self.cache.take_block()))
            k, v = self.blocks[-1][1]
            n = min(bt - at, new - done)
            k[:, :, at:at + n].copy_(key_states[:, :, done:done + n])
            v[:, :, at:at + n].copy_(value_states[:, :, done:done + n])
            done += n
            self.length += n

    def _spill_old(self) -> None:
        """Keep the newest ``device_blocks`` full blocks (and the tail) on the device."""
        c = self.cache
        on_device = [j for j, (w, _) in enumerate(self.blocks) if w == "device"]
        full = [j for j in on_device if (j + 1) * c.block_tokens <= self.length]
        for j in full[:max(0, len(full) - c.device_blocks)]:
            self.blocks[j] = ("disk", c.spill(self.blocks[j][1]))

    def crop(self, n: int) -> None:
        """Keep the first ``n`` positions (``PagedKVCache.crop``)."""
        if n >= self.length:
            return
        c, bt = self.cache, self.cache.block_tokens
        keep = -(-n // bt)
        for where, held in self.blocks[keep:]:
            if where == "device":
                c.give_block(held)
            else:
                c._spill.release(held)
        del self.blocks[keep:]
        self.length = n
        if n % bt and self.blocks[-1][0] == "disk":   # the tail must be on the device
            slot = self.blocks[-1][1]
            k, v = c.take_block()
            c._spill.read(slot, [_bytes(k), _bytes(v)])
            c._spill.release(slot)
            self.blocks[-1] = ("device", (k, v))

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.cache.max_context

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        for w, kv in self.blocks:
            if w == "device":
                self.cache.give_block(kv)
        self.blocks, self.length = [], 0


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a numpy view (numpy has no bfloat16)."""
    return t.view(torch.uint8).numpy().reshape(-1)


class _SpillFile:
    """An unlinked scratch file of fixed-size slots, written and read with O_DIRECT (buffered
    plus ``POSIX_FADV_DONTNEED`` where the filesystem refuses it)."""

    def __init__(self, directory, slot_bytes: int):
        fd, path = tempfile.mkstemp(prefix="offload-kv-", dir=directory)
        os.close(fd)
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, os.O_RDWR | (os.O_DIRECT if self.direct else 0))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, os.O_RDWR)
        os.unlink(path)   # nothing left behind, even if the process dies
        self.slot_bytes = slot_bytes
        self.slots = 0
        self.free: list[int] = []   # slots a crop released, reused before the file grows

    def write(self, k: np.ndarray, v: np.ndarray) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            slot = self.slots
            self.slots += 1
        off = slot * self.slot_bytes
        if os.pwritev(self.fd, [k, v], off) != self.slot_bytes:
            raise OSError(errno.ENOSPC, "short write to the KV scratch file (disk full?)")
        if not self.direct:
            os.posix_fadvise(self.fd, off, self.slot_bytes, os.POSIX_FADV_DONTNEED)
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def reset(self) -> None:
        self.slots, self.free = 0, []

    def read(self, slot: int, dests: list[np.ndarray]) -> None:
        off = slot * self.slot_bytes
        if os.preadv(self.fd, dests, off) != self.slot_bytes:
            raise OSError(errno.EIO, "short read from the KV scratch file")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
