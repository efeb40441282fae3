"""The Host tier on GPU machines: pinned bounce buffers and a copy stream.

Disk -> pinned host buffer (O_DIRECT, in an I/O thread of the runtime's Transport, which
runs ``move``) -> device slot (``copy_`` on a dedicated copy stream, in the same thread), then
an event the compute stream waits on. Every cross-stream point is explicit:

* a bounce buffer is refilled only after its previous host-to-device copy finished
  (``bounce_done[i].synchronize()`` in the I/O thread, never on the compute thread);
* a device slot is overwritten only after the compute that used it finished
  (the copy stream waits on the slot's ``released`` event, recorded by the compute stream);
* compute uses a slot only after its copy finished (the compute stream waits on ``ready``).

An encoded Unit crosses as stored: its bitmaps are validated on the host (bounce buffer),
its stored bytes are copied into the slot's device landing buffer, and the decode kernel
writes the dense layout into the slot, all on the copy stream before ``ready`` is recorded.

Only imported when the compute device is a CUDA GPU.
"""
from __future__ import annotations

import torch

from ..kernels.decode import decode_unit, validate_unit
from ..units import Unit, align
from .device import aligned_host
from .disk import BLOCK, DiskTier
from .slots import Slot


class PinnedStaging:
    """Moves Units from the disk tier into device slots through pinned bounce buffers."""

    def __init__(self, disk: DiskTier, count: int, nbytes: int, device: torch.device, *,
                 landings: list[torch.Tensor] = (), stats=None, as_stored: bool = False):
        self.disk = disk
        self.device = device
        self.landings = list(landings)   # device buffers, one per slot, for encoded Units
        self.as_stored = as_stored   # encoded Units land in the slot as stored (expert cache)
        self.stats = stats
        self.bounce = [aligned_host(nbytes, pin=True) for _ in range(count)]
        self.bounce_np = [b.numpy() for b in self.bounce]
        self.stream = torch.cuda.Stream(device)
        self.bounce_done: list[torch.cuda.Event | None] = [None] * count
        self.ready: list[torch.cuda.Event | None] = [None] * count
        self.released: list[torch.cuda.Event | None] = [None] * count
        self.host_bytes = count * nbytes
        self.h2d_bytes = 0
        self.homed: dict[str, torch.Tensor] = {}   # Units whose home is the Host tier

    def load_homed(self, units: list[Unit]) -> None:
        """Read the Units homed on the Host tier into one pinned slab, once (checksummed)."""
        total = sum(align(u.stored_bytes, BLOCK) for u in units)
        slab = aligned_host(total, pin=True) if total else None
        off = 0
        for u in units:
            n = align(u.stored_bytes, BLOCK)   # kept as stored: encoded Units stay compressed
            self.disk.read(u, slab[off:off + n].numpy(), verify=True)
            self.homed[u.key] = slab[off:off + n]
            off += n
        self.host_bytes += total

    def move(self, unit: Unit, slot: Slot, verify: bool) -> float:
        """Move ``unit`` into ``slot`` (an I/O thread; returns the disk read's seconds)."""
        i = slot.index
        n = align(unit.stored_bytes, BLOCK)
        source = self.homed.get(unit.key)
        seconds = 0.0
        if source is None:   # from disk, through bounce buffer i
            if self.bounce_done[i] is not None:
                self.bounce_done[i].synchronize()   # syncs (I/O thread): bounce buffer i is free
            seconds = self.disk.read(unit, self.bounce_np[i], verify=verify)
            source = self.bounce[i][:n]
        if unit.encoded:
            validate_unit(unit, source)   # before any byte of it reaches the GPU
        with torch.cuda.stream(self.stream):
            if self.released[i] is not None:
                self.stream.wait_event(self.released[i])   # hazard: slot still read by compute
            if unit.encoded and not self.as_stored:
                # Landing i is reused only by the next move into slot i: same stream, ordered.
                self.landings[i][:n].copy_(source, non_blocking=True)
                decode_unit(unit, self.landings[i], slot.buffer, stream=self.stream)
                if self.stats is not None:
                    self.stats.add(unit, 0.0)   # asynchronous: its time is in the copy stream
            else:
                slot.buffer[:n].copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        if unit.key not in self.homed:
            self.bounce_done[i] = done
        self.ready[i] = done
        self.h2d_bytes += n
        return seconds

    def on_ready(self, slot: Slot) -> None:
        """Compute stream: wait (on the device, not the host) for the slot's copy."""
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot.index])

    def on_release(self, slot: Slot) -> None:
        """Compute stream: mark where its use of the slot ends."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.released[slot.index] = ev
