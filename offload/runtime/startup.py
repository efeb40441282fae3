"""Start-up work of a Runtime: resident Units loaded once, start-up checksums.

Every Unit's first read in a run is checksummed. Resident Units are read (and checked) here;
so are the Units gathered row by row (the embedding) and a layer's experts Unit's members,
whose reads the pipeline never verifies as a whole.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..kernels.decode import decode_unit, validate_unit
from ..tiers.device import aligned_host
from ..tiers.disk import DiskTier
from ..tiers.slots import tensor_views
from ..units import Unit, align


def check_members(disk: DiskTier, unit: Unit, members: list[Unit], data: np.ndarray) -> None:
    """Verify each member Unit inside ``unit``'s bytes ``data`` (from its first byte) by its
    own checksum (a layer's experts Unit: each expert)."""
    for m in members:
        start = m.offset - unit.offset
        disk.check(m, data[start:start + m.stored_bytes])


def load_resident(keys: list[str], units: dict[str, Unit], disk: DiskTier,
                  device: torch.device, alloc: Callable[[int], torch.Tensor],
                  landing: Callable[[int], torch.Tensor],
                  members: Callable[[Unit], list[Unit]]) -> dict[str, dict]:
    """Read the Units ``keys`` into one arena on ``device`` (4 KiB-aligned, in order),
    checksummed, decoded where encoded; returns their tensor views by key.

    ``landing(nbytes)`` gives a device buffer to decode an encoded Unit from; ``members(unit)``
    the Units inside an aggregate Unit, each checked on its own."""
    total = sum(align(units[k].nbytes, 4096) for k in keys)
    arena = alloc(total) if total else None
    bounce = None
    if device.type != "cpu" and keys:   # GPU: through one pinned bounce buffer, once
        bounce = aligned_host(max(align(units[k].stored_bytes, 4096) for k in keys), pin=True)
    views, off = {}, 0
    for k in keys:
        unit = units[k]
        n = align(unit.nbytes, 4096)
        dest = arena[off:off + n]
        if bounce is None:
            _load_host(unit, dest, disk, landing, members(unit))
        else:
            _load_device(unit, dest, disk, bounce, landing, members(unit), device)
        views[k] = tensor_views(dest, unit)
        off += n
    return views


def load_held(keys: list[str], units: dict[str, Unit], disk: DiskTier,
              alloc: Callable[[int], torch.Tensor],
              members: Callable[[Unit], list[Unit]]) -> dict[str, torch.Tensor]:
    """Read the encoded Units ``keys`` as stored into one arena (4 KiB-aligned, in order),
    checksummed (a layer's experts Unit: each expert) and validated; returns each one's
    stored bytes (uint8) by key, decoded into a staging slot at each use (``Plan.held``, CPU
    only)."""
    total = sum(align(units[k].stored_bytes, 4096) for k in keys)
    arena = alloc(total) if total else None
    held, off = {}, 0
    for k in keys:
        unit = units[k]
        n = align(unit.stored_bytes, 4096)
        dest = arena[off:off + n]
        inside = members(unit)
        disk.read(unit, dest.numpy(), verify=not inside)
        check_members(disk, unit, inside, dest.numpy())
        validate_unit(unit, dest)
        held[k] = dest
        off += n
    return held


def _load_host(unit: Unit, dest: torch.Tensor, disk: DiskTier, landing, members) -> None:
    if unit.encoded:
        buf = landing(align(unit.stored_bytes, 4096))
        disk.read(unit, buf.numpy(), verify=not members)
        check_members(disk, unit, members, buf.numpy())
        decode_unit(unit, buf, dest)
        return
    disk.read(unit, dest.numpy(), verify=not members)
    if members:
        check_members(disk, unit, members, dest.numpy())


def _load_device(unit: Unit, dest: torch.Tensor, disk: DiskTier, bounce: torch.Tensor, landing,
                 members, device: torch.device) -> None:
    stored = align(unit.stored_bytes, 4096)
    disk.read(unit, bounce[:stored].numpy(), verify=not members)
    if members:
        check_members(disk, unit, members, bounce.numpy())
    if unit.encoded:
        validate_unit(unit, bounce)
        buf = landing(stored)
        buf[:stored].copy_(bounce[:stored])
        decode_unit(unit, buf, dest)
        torch.cuda.synchronize(device)   # syncs (start-up): bounce is reused
    else:
        dest.copy_(bounce[:dest.numel()])
