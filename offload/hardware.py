"""Measuring the hardware profile: disk read bandwidth, host-to-device bandwidth, compute speed,
and the decode speed of each encoding a store holds.

Measured once per (offload dir, device, dtype) and cached in ``profile.json`` beside the stores
(written to a temporary name and renamed), so that planning is deterministic for the same
inputs. It times the tiers, so it sits just above them in the import order.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable

import torch

from .planner.profile import HardwareProfile
from .tiers.device import aligned_host
from .tiers.disk import BLOCK, CHUNK_BYTES
from .units import DTYPE_NAMES

log = logging.getLogger(__name__)

PROFILE_VERSION = 2


def load_or_measure(data_file: Path, cache_dir: Path, device: torch.device, dtype: torch.dtype,
                    hidden: int, max_bytes: int | None = None,
                    encodings: Iterable[str] = ()) -> HardwareProfile:
    """The cached profile for this device and dtype, measuring it on first use with at most
    ``max_bytes`` of compute-device memory (the budget: a first run keeps its promise too), and
    the decode speed of each of ``encodings`` it lacks (the store's: ``gguf.Q4_K`` ...)."""
    key = f"{device}|{DTYPE_NAMES[dtype]}|{os.stat(cache_dir).st_dev}"
    path = cache_dir / "profile.json"
    cached, profile = {}, None
    try:
        cached = json.loads(path.read_text())
        if cached.get("version") == PROFILE_VERSION and key in cached.get("profiles", {}):
            profile = HardwareProfile(**cached["profiles"][key])
    except (OSError, ValueError, TypeError):
        cached = {}
    missing = sorted(e for e in set(encodings) if measurable(e) and
                     (profile is None or e not in profile.decode_bps))
    if profile is not None and not missing:
        return profile
    if profile is None:
        bound = max_bytes if max_bytes is not None else 256 << 20
        profile = HardwareProfile(str(device), measure_disk(data_file, chunk_bytes=bound),
                                  measure_h2d(device, min(256 << 20, bound)),
                                  measure_compute(device, dtype, hidden, max_bytes),
                                  DTYPE_NAMES[dtype])
    if missing:
        profile = replace(profile, decode_bps={
            **profile.decode_bps, **{e: measure_decode(e, device, max_bytes) for e in missing}})
    profiles = cached.get("profiles", {}) if cached.get("version") == PROFILE_VERSION else {}
    profiles[key] = asdict(profile)
    tmp = path.with_name(f".profile.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": PROFILE_VERSION, "profiles": profiles}, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache dir only costs a re-measure next time
        log.warning("could not cache the hardware profile in %s: %s", path, e)
    return profile


def measurable(encoding: str) -> bool:
    """Encodings whose decode speed does not depend on the data: the GGUF block types (a
    bitmap's depends on its density, and is not charged)."""
    from .kernels import gguf

    return gguf.type_of(encoding) is not None


def measure_decode(encoding: str, device: torch.device, max_bytes: int | None = None) -> float:
    """Dense bytes per second one thread decodes ``encoding`` into a buffer larger than the
    caches (at most 32 MB out, within ``max_bytes``; ``gguf.sample_blocks``)."""
    from .kernels import gguf

    name = gguf.type_of(encoding)
    if device.type != "cpu":
        return 0.0   # decoded on the CPU only for now (kernels.decode.prepare refuses a GPU)
    out_bytes = 32 << 20 if max_bytes is None else max(1 << 20, min(32 << 20, max_bytes // 2))
    numel = out_bytes // 4 // 256 * 256
    out = torch.empty(numel * 4, dtype=torch.uint8)
    return numel * 4 / gguf.time_decode(gguf.sample_blocks(name, numel), out, name, numel,
                                        reps=3)


def measure_disk(data_file: Path, max_bytes: int = 512 << 20,
                 chunk_bytes: int = CHUNK_BYTES) -> float:
    """O_DIRECT read bandwidth over the first ``max_bytes`` of ``data_file``, in reads of at
    most ``chunk_bytes`` (the runtime's own reads' size; less under a small budget, at least
    1 MiB)."""
    chunk = max(1 << 20, min(CHUNK_BYTES, chunk_bytes)) // BLOCK * BLOCK
    size = os.path.getsize(data_file) // BLOCK * BLOCK
    length = min(size, max_bytes)
    if length < chunk:
        return 1.0e9  # too small to time; a nominal NVMe figure
    buf = aligned_host(chunk).numpy()
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(data_file, flags)
    except OSError:
        fd = os.open(data_file, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in range(0, length - chunk + 1, chunk):
            os.preadv(fd, [buf], off)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return (length // chunk * chunk) / max(elapsed, 1e-9)


def measure_h2d(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Pinned host-to-device copy bandwidth over ``nbytes`` (at most the budget); 0 on CPU."""
    if device.type != "cuda":
        return 0.0
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)  # syncs: a measurement, off the hot path
    t0 = time.perf_counter()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return 4 * nbytes / (time.perf_counter() - t0)


def measure_compute(device: torch.device, dtype: torch.dtype, hidden: int,
                    max_bytes: int | None = None) -> float:
    """Weight bytes per second a batch-1 matmul streams through compute (decode speed), with a
    weight of at most ``max_bytes`` (default 64 MB)."""
    # A weight larger than the caches, as a decoder layer is: batch-1 decode streams it from RAM.
    target = 64 << 20 if max_bytes is None else max(1 << 20, min(64 << 20, max_bytes))
    rows = max(1, target // (hidden * dtype.itemsize))
    w = torch.randn(rows, hidden, device=device, dtype=dtype)   # one buffer, no fp32 copy
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    torch.nn.functional.linear(x, w)
    reps = 8
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # syncs: a measurement, off the hot path
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return reps * w.numel() * w.element_size() / max(time.perf_counter() - t0, 1e-9)
