"""Measuring the hardware profile: disk read bandwidth, host-to-device bandwidth, compute speed,
the decode speed of each encoding a store holds, and the runtime's own streaming of small and
large Units.

Measured once per (offload dir, device, dtype) and cached in ``profile.json`` beside the stores
(written to a temporary name and renamed), so that planning is deterministic for the same
inputs. It times the tiers and the prefetch pipeline, so it sits just above them in the
import order.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
import statistics
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable

import torch

from .errors import HardwareError
from .kernels import _build
from .memory import kernel_cache_capacity, release_free_heap, rss_bytes
from .planner.profile import (BATCH, FUSED_COLS, FUSED_LARGE, FUSED_NARROW_COLS, FUSED_SMALL,
                              HardwareProfile, fused_key, parse_fused_key, probe_row_bytes)
from .store.lock import disk_idle
from .tiers.device import aligned_host
from .tiers.disk import BLOCK, CHUNK_BYTES
from .units import DTYPE_NAMES

log = logging.getLogger(__name__)

# 3: disk measured as a run reads (spread, 4 readers, beside compute); 4: the fused kernel
# measured beyond the caches, at two weight sizes; 5: batch-8 compute with a weight beyond the
# caches where the budget leaves room, the fused kernel's working set within the whole bound;
# 6: the fast road's layers timed over a cache written in place (one kernel call a step)
# 7: the fast road's decode step as the model road runs it (a step's layers in one call);
# 8: the runtime's streaming of small and large Units (rate and CPU seconds per Unit), and a
# large Unit read alone.
# A cached profile is also tied to the CPU kernels' sources (``_profile_version``): a kernel
# that changed is measured again, not priced by its old speed.
PROFILE_VERSION = 8


DISK_PASSES = 5
# The Unit sizes the runtime's streaming is measured at (``measure_stream_reads``): a small
# Unit (one linear of a small model: SmolLM2's are 0.55 MB) with the slots the planner gives
# such Units, and a large one (a layer; at most an eighth of the bound) with the usual four.
STREAM_SMALL, STREAM_LARGE = 512 << 10, 16 << 20
STREAM_PASSES = 3
FUSED_ROUNDS = 3


@functools.lru_cache(maxsize=None)   # the sources do not change under a running process
def _profile_version() -> str:
    return f"{PROFILE_VERSION}/{_build.source_digest('gguf_matmul_cpu')}"


def load_or_measure(data_file: Path | None, cache_dir: Path, device: torch.device,
                    dtype: torch.dtype, hidden: int, max_bytes: int | None = None,
                    encodings: Iterable[str] = (), family=None,
                    batch: int = 1, fused: Iterable[str] = (),
                    fast_layers: bool = False) -> HardwareProfile:
    """The cached profile for this device and dtype, measuring it on first use (reading
    ``data_file``, or a scratch file in ``cache_dir`` where there is none yet) with at most
    ``max_bytes`` of compute-device memory (the budget: a first run keeps its promise too), the
    decode speed of each of ``encodings`` it lacks (the store's: ``gguf.Q4_K`` ...), the
    per-layer time of ``family`` (a transformers config) if it lacks it, and for a ``batch``
    over 1 the batch-8 figures (compute, the family's per-layer time) if it lacks them, and
    the fused kernel's speed for each GGUF type in ``fused`` (``compute="fast"``) it lacks;
    ``fast_layers``: the family's per-layer time is that of the fast layer road
    (``kernels.layer``, under ``<family>/fast``) where the family has one."""
    key = f"{device}|{DTYPE_NAMES[dtype]}|{os.stat(cache_dir).st_dev}"
    path = cache_dir / "profile.json"
    cached, profile = {}, None
    try:
        cached = json.loads(path.read_text())
        if cached.get("version") == _profile_version() and key in cached.get("profiles", {}):
            profile = HardwareProfile(**cached["profiles"][key])
    except (OSError, ValueError, TypeError):
        cached = {}
    missing = sorted(e for e in set(encodings) if measurable(e) and
                     (profile is None or e not in profile.decode_bps))
    from .kernels import layer

    model_type = getattr(family, "model_type", None)
    family_key = layer.family_key(model_type, fast_layers and dtype == torch.float32)
    fast = family_key != model_type
    # batch figures only for a batch plan: a batched matmul keeps packing buffers (2-4 MB
    # here) that a batch-1 run would carry over its budget
    compute_at_batch = batch > 1 and (profile is None or
                                      str(BATCH) not in profile.batch_compute_bps)
    layer_keys = {1: family_key, BATCH: f"{family_key}@{BATCH}"}
    batches = tuple(b for b in ((1, BATCH) if batch > 1 else (1,))
                    if model_type is not None
                    and (profile is None or layer_keys[b] not in profile.layer_s))
    fused_keys = sorted(fused_key(q, b, small, narrow) for q in set(fused)
                        for b in ((1, BATCH) if batch > 1 else (1,))
                        for small, narrow in ((False, False), (True, False), (False, True)))
    fused_keys = [k for k in fused_keys if profile is None or k not in profile.fused_bps]
    capacity = str(kernel_cache_capacity())
    kernels = device.type == "cpu" and (profile is None
                                        or capacity not in profile.kernel_cache_bytes)
    cached_in = f"measured on this machine, cached in {path}"
    if profile is not None and not missing and not batches and not compute_at_batch \
            and not fused_keys and not kernels:
        return replace(profile, source=cached_in)
    quiet = disk_idle(cache_dir)   # another offload process reading here skews the figures
    if profile is None:
        bound = max_bytes if max_bytes is not None else 256 << 20
        with _readable(data_file, cache_dir) as data_file:
            # the median of DISK_PASSES passes: one pass of 0.2 s on this project's VM read
            # 2.1-2.9 GB/s from one moment to the next, and a profile taken in a slow one
            # (1.8) put every disk-bound row of bench_plan 20-60% under what it ran
            disk = statistics.median(measure_disk(data_file, chunk_bytes=bound)
                                     for _ in range(DISK_PASSES))
            stream, alone = _stream_reads(data_file, bound)
        profile = HardwareProfile(str(device), disk,
                                  measure_h2d(device, min(256 << 20, bound)),
                                  measure_compute(device, dtype, hidden, max_bytes),
                                  DTYPE_NAMES[dtype], stream_reads=stream,
                                  read_alone_bps=alone)
    if kernels:
        profile = replace(profile, kernel_cache_bytes={
            **profile.kernel_cache_bytes, capacity: measure_kernel_cache(dtype)})
    if missing:
        profile = replace(profile, decode_bps={
            **profile.decode_bps, **{e: measure_decode(e, device, max_bytes) for e in missing}})
    if fused_keys:
        profile = replace(profile, fused_bps={**profile.fused_bps,
                                              **_fused_rounds(fused_keys, max_bytes)})
    if compute_at_batch:
        profile = replace(profile, batch_compute_bps={
            **profile.batch_compute_bps,
            str(BATCH): measure_compute(device, dtype, hidden, max_bytes, batch=BATCH)})
    if batches:   # the family's per-layer time, each batch on one pair of miniatures
        per = measure_layer_time(family, dtype, device, batches=batches, fast=fast)
        profile = replace(profile, layer_s={**profile.layer_s,
                                            **{layer_keys[b]: per[b] for b in batches}})
    if not (quiet and disk_idle(cache_dir)):
        log.warning("the hardware profile was measured while another offload process was "
                    "using %s: this run uses it, but it is not cached (the next run measures "
                    "again)", cache_dir)
        return replace(profile, contended=True, source="measured on this machine now, while "
                       "another offload process read the same disk (not cached)")
    profiles = cached.get("profiles", {}) if cached.get("version") == _profile_version() else {}
    profiles[key] = {k: v for k, v in asdict(profile).items() if k not in ("contended", "source")}
    tmp = path.with_name(f".profile.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": _profile_version(), "profiles": profiles}, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache dir only costs a re-measure next time
        log.warning("could not cache the hardware profile in %s: %s", path, e)
        return replace(profile, source="measured on this machine now (not cached)")
    return replace(profile, source=cached_in)


PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
_REQUIRED = ("device", "disk_read_bps", "compute_bps")


def profiles() -> list[str]:
    """The machines described in ``offload/profiles/NAME.json``, shipped with offload."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def described(spec: str | os.PathLike) -> HardwareProfile:
    """A machine described rather than measured: a JSON file (or a shipped profile's name)
    with ``device``, ``disk_read_bps`` (O_DIRECT reads of the offload dir's disk),
    ``compute_bps`` (weight bytes a batch-1 decode step streams through compute per second),
    ``h2d_bps`` (pinned host-to-device copies; required for a GPU), and optionally ``dtype``
    (what compute was measured in), ``decode_bps`` (per encoding), ``layer_s`` (per model
    family, ``[seconds per layer, seconds per step]`` of a decode step beyond its weight bytes;
    ``<family>@8`` at batch 8), ``batch_compute_bps`` (``{"8": ...}``: compute at batch 8),
    ``stream_reads`` (``{"<Unit bytes>": [bytes per second, CPU seconds per Unit]}``: the
    runtime's streaming at two or more Unit sizes), ``read_alone_bps`` (a large Unit read
    with nothing else in flight) and ``description``.

    Raises:
        HardwareError: no such file or profile, unreadable JSON, or missing or non-positive
            fields (each named).
    """
    path = Path(spec).expanduser()
    if not path.is_file():
        if str(spec) not in profiles():
            raise HardwareError(f"no hardware profile {spec}: pass a JSON file with "
                                f"{', '.join(_REQUIRED)} and h2d_bps, or one of "
                                f"{', '.join(profiles())}", path=str(spec))
        path = PROFILES_DIR / f"{spec}.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HardwareError(f"cannot read the hardware profile {path}: {e}",
                            path=str(path)) from e
    required = _REQUIRED + (("h2d_bps",) if str(d.get("device", "")).startswith("cuda")
                            else ())
    missing = [k for k in required if k not in d]
    if missing:
        raise HardwareError(f"the hardware profile {path} lacks {', '.join(missing)} (bytes "
                            "per second for the bandwidths; device cpu or cuda)", path=str(path))
    bad = [k for k in ("disk_read_bps", "compute_bps") if not _positive(d[k])]
    if bad:
        raise HardwareError(f"the hardware profile {path}: {', '.join(bad)} must be a positive "
                            "number of bytes per second", path=str(path))
    return HardwareProfile(str(d["device"]), float(d["disk_read_bps"]),
                           float(d.get("h2d_bps", 0.0)), float(d["compute_bps"]),
                           str(d.get("dtype", "float32")),
                           {k: float(v) for k, v in d.get("decode_bps", {}).items()},
                           {k: (float(v[0]), float(v[1])) for k, v in d.get("layer_s", {}).items()},
                           {k: float(v) for k, v in d.get("batch_compute_bps", {}).items()},
                           stream_reads={k: (float(v[0]), float(v[1]))
                                         for k, v in d.get("stream_reads", {}).items()},
                           read_alone_bps=float(d.get("read_alone_bps", 0.0)),
                           source=f"described in {path}"
                           + (f": {d['description']}" if d.get("description") else ""))


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def measurable(encoding: str) -> bool:
    """Decode keys (``planner.profile.decode_key``) whose speed can be measured on samples:
    the GGUF block types, and bitmaps of an element size and density."""
    from .kernels import gguf

    return gguf.type_of(encoding) is not None or _BITMAP_KEY.fullmatch(encoding) is not None


_BITMAP_KEY = re.compile(r"bitmap\.(\d)@(\d+)")


def measure_decode(encoding: str, device: torch.device, max_bytes: int | None = None) -> float:
    """Dense bytes per second one thread (a GPU: one kernel) decodes ``encoding`` (a decode
    key) into a buffer larger than the caches (at most 32 MB out, within ``max_bytes``;
    ``gguf.sample_blocks``, or random values at the bitmap's density)."""
    from .kernels import gguf

    out_bytes = 32 << 20 if max_bytes is None else max(1 << 20, min(32 << 20, max_bytes // 2))
    m = _BITMAP_KEY.fullmatch(encoding)
    if m is not None:   # the sample, its mask and its encoding: ~4x the output, all in bound
        bitmap_out = out_bytes if max_bytes is None else max(1 << 20, min(out_bytes,
                                                                          max_bytes // 8))
        return _measure_bitmap(int(m[1]), int(m[2]) / 100, bitmap_out, device)
    name = gguf.type_of(encoding)
    numel = out_bytes // 4 // 256 * 256
    out = torch.empty(numel * 4, dtype=torch.uint8, device=device)
    src = gguf.sample_blocks(name, numel).to(device)   # a GPU: its kernel (kernels.cuda)
    return numel * 4 / gguf.time_decode(src, out, name, numel, reps=3)


def measure_fused(key: str, max_bytes: int | None = None, reps: int = 5) -> float:
    """Stored bytes per second the fused GGUF matmul multiplies (``key``: ``fused_key``: a
    type at a batch, for weights of ``FUSED_LARGE`` or ``FUSED_SMALL`` stored bytes), with the
    pool of threads a run gets, against random activations: as a decode step meets its weights,
    one call per weight over a working set larger than the caches (64 MB, within
    ``max_bytes``: the probe's buffers are freed before the run takes its budget), each weight
    read from RAM. (Within half of ``max_bytes``, a 108 MB budget's probe held 27 MB: in this
    VM's 32 MB L3 it put Q4_1 at 42 GB/s, Q8_0 at 67, and SmolLM2's fast step 26% faster than
    it ran.)

    Why two sizes: a small weight's call pays a start (its activations quantized, the pool
    woken, the prefetchers' ramp) over fewer bytes. Here (2-core EPYC VM, 32 MB L3) Q4_1 went
    24.7 GB/s for one 8 MB weight timed alone (in the cache: how it was measured before), 23.7
    over 16 MB weights and 14.8 over 1 MB ones; SmolLM2's layers (0.07-0.55 MB weights) ran at
    about 14.7. A narrow key: the large weights' bytes in rows of ``FUSED_NARROW_COLS``
    columns (the planner fits a per-row cost from the two widths)."""
    from .kernels import gguf, qmatmul
    from .kernels.timing import median_seconds

    qtype, batch, small, narrow = parse_fused_key(key)
    _, block, nbytes = gguf.TYPES[qtype]
    working = 64 << 20 if max_bytes is None else max(2 << 20, min(64 << 20, max_bytes))
    each = min(FUSED_SMALL if small else FUSED_LARGE, working // 2)   # two weights at least
    cols = probe_row_bytes(qtype, FUSED_NARROW_COLS if narrow else FUSED_COLS) // nbytes * block
    rows = max(1, each // (cols // block * nbytes))
    weights = [gguf.sample_blocks(qtype, rows * cols, seed=i).view(rows, -1)
               for i in range(max(1, working // each))]
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(0))
    out = torch.empty(x.shape[0], rows)

    with qmatmul.Pool(qmatmul.threads_for()) as pool:
        def step():
            for w in weights:
                qmatmul.matmul(x, w, qtype, out, pool=pool)
        seconds = median_seconds(step, torch.device("cpu"), reps=reps)
    return sum(w.numel() for w in weights) / seconds


def _fused_rounds(keys: list[str], max_bytes: int | None) -> dict[str, float]:
    """``measure_fused`` of each key in ``FUSED_ROUNDS`` rounds over all of them, each key's
    median round: one key measured at a stretch (a fifth of a second here) can fall in a slow
    moment of this VM whole; measured so, one profile put Q4_1 at batch 8 at 3.3 GB/s where
    it runs 5.4-7.0, its small weights faster than its large ones, and SmolLM2's fast rows
    22-66% off."""
    runs: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(FUSED_ROUNDS):
        for k in keys:
            runs[k].append(measure_fused(k, max_bytes, reps=3))
    return {k: statistics.median(v) for k, v in runs.items()}


def _measure_bitmap(itemsize: int, density: float, out_bytes: int,
                    device: torch.device) -> float:
    """Dense bytes per second one thread decodes a bitmap of ``itemsize`` values at
    ``density`` (random positions), as the runtime's decode thread does."""
    from .kernels import bitmap
    from .kernels.timing import median_seconds

    numel = out_bytes // itemsize
    dtype = {2: torch.bfloat16, 4: torch.float32}.get(itemsize, torch.float32)
    g = torch.Generator().manual_seed(0)
    values = torch.empty(numel, dtype=dtype).uniform_(0.5, 1.5, generator=g)
    values.mul_(torch.empty(numel, dtype=torch.uint8).bernoulli_(density, generator=g))
    enc, nnz = bitmap.encode(values)
    del values
    enc = enc.to(device)
    out = torch.empty(numel * itemsize, dtype=torch.uint8, device=device)
    return numel * itemsize / median_seconds(
        lambda: bitmap.decode(enc, out, numel, nnz, itemsize), device, reps=3)


def measure_layer_time(config, dtype: torch.dtype, device: torch.device,
                       depths: tuple[int, int] = (2, 10), steps: int = 12,
                       batches: tuple[int, ...] = (1,), fast: bool = False
                       ) -> dict[int, tuple[float, float]]:
    """Seconds a decode step of ``config``'s family spends beyond its weights, per batch of
    ``batches``: ``(per layer, per step)``, from the fastest decode-step time of miniatures
    (``workspace.miniature``: 64 wide, their weights too small to matter) of two depths: the
    difference per layer, the rest per step. The same two miniatures serve every batch (a
    first run measures inside its budget). ``fast``: the miniatures' layers take the fast
    layer road (``kernels.layer.fuse_miniature``: Q8_0 blocks) over a cache written in place,
    as a fast run's (``adapters/kvbuffer.py``): a step's layers in one kernel call (the model
    road, ``kernels.layer.attach_model``).
    Cost: ~0.5 s a batch here, once per family (cached with the profile)."""
    from .adapters import kvbuffer
    from .adapters.base import cache_keyword
    from .kernels import layer, qmatmul
    from .kernels.workspace import miniature

    spec = config.to_json_string(use_diff=False)
    models = [miniature(spec, dtype, layers).to(device) for layers in depths]
    pool = qmatmul.Pool(qmatmul.threads_for()) if fast else None
    if fast:
        for model in models:
            layer.fuse_miniature(model, pool)
    key = cache_keyword(models[0])
    out = {}
    with torch.no_grad():
        for batch in batches:
            runs = []
            for model in models:
                own = {key: kvbuffer.buffered_cache(model.config, 4 + steps + 2)} if fast else {}
                first = model(torch.tensor([[1, 2, 3, 4]] * batch, device=device),
                              use_cache=True, **own)
                runs.append((model, {key: getattr(first, key, None) or first.past_key_values},
                             []))
                del first
            step = torch.tensor([[5]] * batch, device=device)
            for i in range(steps + 2):   # the depths alternate: a slow moment slows both
                for model, past, samples in runs:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # syncs: a measurement, off the hot path
                    t0 = time.perf_counter()
                    model(step, use_cache=True, logits_to_keep=1, **past)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if i >= 2:   # the first steps warm the caches and the allocator
                        samples.append(time.perf_counter() - t0)
            times = [min(samples) for _, _, samples in runs]   # the least disturbed step
            per_layer = max(0.0, (times[1] - times[0]) / (depths[1] - depths[0]))
            out[batch] = (per_layer, max(0.0, times[0] - depths[0] * per_layer))
            del runs
    if pool is not None:
        pool.close()
    return out


@contextlib.contextmanager
def _readable(data_file: Path | None, cache_dir: Path, nbytes: int = 256 << 20):
    """``data_file``, or where there is none (a plan before anything was downloaded or
    packed) a scratch file of ``nbytes`` written to ``cache_dir``, synced, read, removed."""
    if data_file is not None:
        yield data_file
        return
    path = Path(cache_dir) / f".disk-probe-{os.getpid()}.tmp"
    try:
        with open(path, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(nbytes >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        yield path
    finally:
        path.unlink(missing_ok=True)


def measure_disk(data_file: Path, max_bytes: int = 512 << 20,
                 chunk_bytes: int | None = None, readers: int = 4) -> float:
    """O_DIRECT read bandwidth as a run reads: ``max_bytes`` in reads of the runtime's own
    reads' size (``CHUNK_BYTES``; smaller, and fewer readers, where the readers' buffers and
    the matmul's weight would not fit ``chunk_bytes`` together; at least 1 MiB) spread over
    ``data_file`` (a store's first bytes are its embedding, which a
    run gathers rather than streams), ``readers`` threads at once (the runtime's reads in
    flight), while a matmul holds the cores as a run's compute does. Measured on this
    project's VM: a run streaming TinyLlama read its store at 2.08-2.26 GB/s where one
    sequential reader of the file's head measured 2.52 GB/s, and this figure 2.0-2.3."""
    # the readers' buffers and the matmul's weight: within ``chunk_bytes`` all together
    bound = (readers + 1) * CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    chunk = max(1 << 20, min(CHUNK_BYTES, bound // (readers + 1))) // BLOCK * BLOCK
    size = os.path.getsize(data_file) // BLOCK * BLOCK
    count = min(size, max_bytes) // chunk
    if count < 2:
        return 1.0e9  # too small to time; a nominal NVMe figure
    readers = max(1, min(readers, bound // chunk - 1, count))
    offsets = [(size - chunk) * i // (count - 1) // BLOCK * BLOCK for i in range(count)]
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(data_file, flags)
    except OSError:
        fd = os.open(data_file, os.O_RDONLY)
    done = threading.Event()

    def read(mine: list[int]) -> None:
        buf = aligned_host(chunk).numpy()
        for off in mine:
            os.preadv(fd, [buf], off)

    def compute() -> None:   # a decode step's matmuls: a weight streamed from RAM
        w = torch.empty(chunk // (4 * 4096), 4096, dtype=torch.float32).uniform_()
        x = torch.ones(1, 4096)
        while not done.is_set():
            torch.nn.functional.linear(x, w)

    busy = threading.Thread(target=compute, daemon=True)
    busy.start()
    try:
        threads = [threading.Thread(target=read, args=(offsets[i::readers],))
                   for i in range(readers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        busy.join()
        os.close(fd)
    return count * chunk / max(elapsed, 1e-9)


def measure_stream_reads(data_file: Path, unit_bytes: int, slots: int,
                         max_bytes: int = 64 << 20) -> tuple[float, float]:
    """A pass of the runtime's own streaming over Units of ``unit_bytes`` (synthetic ones
    spread over ``data_file``): the prefetch pipeline over ``slots`` slots, the transport's
    I/O threads (one per slot, at most the runtime's ``MAX_LAYER_READS``), the disk tier's
    O_DIRECT reads, a consumer that acquires and releases each Unit with nothing to compute.
    Returns ``(bytes per second, CPU seconds per Unit)``: the disk's rate at this read size
    and depth, and what one Unit's trip costs the cores (the consumer's hand-over, the I/O
    thread's submit and completion, the read's system time), which a CPU run pays out of its
    compute (measured on this project's VM, from one moment to the next: 512 KiB Units at
    0.55-1.1x the rate of 16 MiB ones, 85-110 us of CPU each; 6.4 MiB ones 290-350 us)."""
    from .prefetch.pipeline import Pipeline
    from .tiers.disk import DiskTier
    from .tiers.slots import SlotRing
    from .tiers.transport import MAX_LAYER_READS, Transport
    from .units import TensorSpec, Unit

    unit_bytes = max(BLOCK, unit_bytes // BLOCK * BLOCK)
    size = os.path.getsize(data_file) // BLOCK * BLOCK
    count = max(2, min(256, max_bytes // unit_bytes))
    if size < 2 * unit_bytes:
        return 0.0, 0.0
    spec = (TensorSpec("w", "uint8", (unit_bytes,), 0, unit_bytes),)
    units = {f"u{i}": Unit(f"u{i}", "layer", "layer", i,
                           (size - unit_bytes) * i // (count - 1) // BLOCK * BLOCK,
                           unit_bytes, 0, spec) for i in range(count)}
    stream = tuple(units)
    ring = SlotRing(slots, unit_bytes, aligned_host)
    buffers = [slot.buffer.numpy() for slot in ring.slots]
    disk, transport = DiskTier(data_file), Transport(min(slots, MAX_LAYER_READS))
    try:
        pipe = Pipeline(stream, units, ring,
                        lambda u, slot: transport.read(disk, u, buffers[slot.index],
                                                       verify=False, consumer="probe"),
                        lambda t: transport.wait(t, "probe"))
        pipe.begin_pass()   # the first fetches: started before the clock, as a step's are
        cpu0, t0 = time.process_time(), time.perf_counter()
        for key in stream:
            pipe.acquire(key)
            pipe.release(key)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        pipe.drain()
    finally:
        transport.close()
        disk.close()
    return count * unit_bytes / max(elapsed, 1e-9), cpu / count


def _stream_reads(data_file: Path, bound: int) -> tuple[dict[str, tuple[float, float]], float]:
    """``HardwareProfile.stream_reads`` and ``read_alone_bps``: the median of
    ``STREAM_PASSES`` passes at each of the small and large Unit sizes, and of the large
    Unit read alone (one slot: each read starts when the one before was taken), the three
    alternating (a slow moment slows all); ({}, 0) where the bound leaves no room for two
    sizes."""
    from .planner.placement import _auto_depth

    large = min(STREAM_LARGE, bound // 8) // BLOCK * BLOCK
    if large < 4 * STREAM_SMALL:
        return {}, 0.0
    ways = {(STREAM_SMALL, _auto_depth(STREAM_SMALL) + 1): [],
            (large, _auto_depth(large) + 1): [], (large, 1): []}
    for _ in range(STREAM_PASSES):
        for (n, slots), runs in ways.items():
            runs.append(measure_stream_reads(data_file, n, slots,
                                             max_bytes=max(64 << 20, 8 * n)))
    if any(bps <= 0 for r in ways.values() for bps, _ in r):
        return {}, 0.0
    alone = ways.pop((large, 1))
    return ({str(n): (statistics.median(b for b, _ in r), statistics.median(c for _, c in r))
             for (n, _), r in ways.items()}, statistics.median(b for b, _ in alone))


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


def measure_kernel_cache(dtype: torch.dtype) -> int:
    """Resident bytes torch's CPU matmul kernel caches grow by in ``dtype`` once full at this
    process's capacity (``memory.cap_kernel_caches``): where the CPU's half-precision path
    compiles a kernel per shape (oneDNN on AVX512-BF16: 0.2-0.6 MiB each, and evicted ones
    leave holes the next do not fill, so about 0.85 MiB per entry when full, measured), about
    0 elsewhere; 0 for float32 (MKL: no per-shape kernels).

    Measured as the caches fill: two weights of shapes no model has, at more row counts than
    the caches keep, after one multiply of another shape (oneDNN's one-time start-up, 11 MiB
    here, is in a run's baseline: it warms its code paths before its meter starts) and a heap
    trim (the new kernels take new pages), with a tenth over for the shapes' spread."""
    if dtype.itemsize > 2:
        return 0
    capacity = min(kernel_cache_capacity(), 256)   # an uncapped process: its first 256 kernels
    torch.nn.functional.linear(torch.zeros(3, 160, dtype=dtype),
                               torch.zeros(96, 160, dtype=dtype))
    weights = [torch.zeros(320, 192, dtype=dtype), torch.zeros(192, 320, dtype=dtype)]
    inputs = [torch.zeros(capacity + 18, w.shape[1], dtype=dtype) for w in weights]
    gc.collect()
    release_free_heap()
    before = rss_bytes()
    for rows in range(2, capacity + 18):
        for w, x in zip(weights, inputs):
            torch.nn.functional.linear(x[:rows], w)
    after = rss_bytes()
    if before is None or after is None:
        return 0
    return max(0, after - before) * 11 // 10


def measure_compute(device: torch.device, dtype: torch.dtype, hidden: int,
                    max_bytes: int | None = None, batch: int = 1) -> float:
    """Weight bytes per second a decode matmul of ``batch`` rows streams through compute, with
    a weight of at most ``max_bytes`` (default 64 MB)."""
    # A weight larger than the caches, as a decoder layer is: batch-1 decode streams it from RAM.
    # At a batch the weight is as large too where ``max_bytes`` leaves room: a batched matmul
    # packs a copy of its weight, which costs more from RAM than from the caches (TinyLlama's
    # float32 at batch 8 ran at 7.4 GB/s where a 16 MB weight measured 12.0).
    target = 64 << 20 if max_bytes is None else max(1 << 20, min(64 << 20, max_bytes))
    if batch > 1 and max_bytes is not None:   # the copy and more: all within max_bytes
        target = max(1 << 20, min(target, max_bytes // 4))   # (measured at batch 8 here)
    rows = max(1, target // (hidden * dtype.itemsize))
    w = torch.randn(rows, hidden, device=device, dtype=dtype)   # one buffer, no fp32 copy
    x = torch.randn(batch, hidden, device=device, dtype=dtype)
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
