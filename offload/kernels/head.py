"""How the LM head computes a strided half-precision input with torch's own bits on this CPU.

``generate()`` prefills a batch and keeps the last position: the head gets ``h[:, -1:, :]``, a
strided ``[B, 1, H]`` view. For a weight that does not require grad, torch's CPU linear then
runs a batched matmul over the weight broadcast to every batch row, and where oneDNN runs half
types (AVX-512 BF16/FP16 CPUs) that copies the weight once per row: 8 x 88 MB for a TinyLlama
head chunk at batch 8, far over any budget. The head must give the bits of the model it
replaced (that call), so which cheaper path is exact is a property of the CPU and torch build,
checked here on the running machine (``choose``) rather than assumed:

=============  ===============================================  ================================
path           how                                              extra memory per batch row
=============  ===============================================  ================================
``per_row``    ``F.linear`` on each row's contiguous ``[T, H]``  none
``sub_rows``   torch's own strided call on ``SUB``-row blocks     one block (``SUB x H``, at most
                                                                a row of float32 logits)
               of the weight (columns are independent sums)
``direct``     torch's own strided call on the whole chunk       up to a chunk, where torch copies
=============  ===============================================  ================================

``choose`` takes the first path whose output is bitwise the direct call's on a probe weight of
the model's hidden size (three batch rows, one and two positions, a block split that does not
divide the rows); ``direct`` is exact by definition and is the last resort. A float32 input, a
contiguous one, or a weight that required grad (torch then folds the input to 2-D) never
needs a choice.
"""
from __future__ import annotations

import functools
import logging
import mmap

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PATHS = ("per_row", "sub_rows", "direct")
HALF = (torch.bfloat16, torch.float16)


def sub_rows(hidden: int, itemsize: int, vocab: int) -> int:
    """Rows per block on the ``sub_rows`` path: a power of two from 16 to 1024 whose copy
    per batch row is at most one row of float32 logits (or 64 KiB): the reserve, which holds
    the logits, then holds the copy too."""
    limit = max(vocab * 4, 64 << 10)
    rows = 1024
    while rows > 16 and rows * hidden * itemsize > limit:
        rows //= 2
    return rows


def needs_choice(h: torch.Tensor) -> bool:
    """Whether ``h`` is the strided half-precision CPU input the paths differ on."""
    return (h.dtype in HALF and h.dim() > 2 and h.shape[0] > 1 and not h.is_contiguous()
            and h.device.type == "cpu")


def linear(h: torch.Tensor, weight: torch.Tensor, path: str, vocab: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(h, weight)`` for a strided half input, computed by ``path`` into ``out``
    (``[..., weight rows]``, allocated when ``None``); ``vocab``: the whole head's rows."""
    if out is None:
        out = torch.empty(*h.shape[:-1], weight.shape[0], dtype=h.dtype, device=h.device)
    if path == "per_row":   # a strided 3-D slice would still copy: each row as 2-D [T, H]
        for b in range(h.shape[0]):
            out[b] = F.linear(h[b].reshape(-1, h.shape[-1]), weight).view(out.shape[1:])
    elif path == "sub_rows":
        step = sub_rows(h.shape[-1], h.element_size(), vocab)
        for i in range(0, weight.shape[0], step):
            out[..., i:i + step] = F.linear(h, weight[i:i + step])
    else:
        out.copy_(F.linear(h, weight))
    return out


def extra_bytes(path: str | None, batch: int, hidden: int, itemsize: int, vocab: int,
                chunk_rows: int) -> int:
    """What ``path`` may allocate beyond its output for a strided input of ``batch`` rows
    (``None``: a model whose head needs no choice): torch's copy of the weight block for
    every batch row, twice (oneDNN may reorder the broadcast copy into one of its own)."""
    if path is None or batch <= 1 or path == "per_row":
        return 0
    rows = sub_rows(hidden, itemsize, vocab) if path == "sub_rows" else chunk_rows
    return 2 * batch * min(rows, chunk_rows) * hidden * itemsize


@functools.lru_cache(maxsize=None)
def choose(dtype: torch.dtype, hidden: int, vocab: int) -> str | None:
    """The cheapest path that gives torch's own bits for ``dtype`` and ``hidden`` here, or
    ``None`` for a dtype that needs no choice (float32).

    Cached per process: the answer depends on the CPU and the torch build only. The probe
    allocates about ``3 x (2 SUB + 64) x hidden`` elements for a moment (~4 MB at most).
    """
    if dtype not in HALF:
        return None
    g = torch.Generator().manual_seed(0)
    sub = sub_rows(hidden, dtype.itemsize, vocab)
    weight = torch.randn(2 * sub + 64, hidden, generator=g).to(dtype)
    probes = [torch.randn(3, 5, hidden, generator=g).to(dtype)[:, -new:, :] for new in (1, 2)]
    refs = [F.linear(h, weight) for h in probes]
    for path in PATHS[:-1]:
        if all(torch.equal(linear(h, weight, path, vocab), ref) for h, ref in zip(probes, refs)):
            log.debug("half head (%s, hidden %d): %s", dtype, hidden, path)
            return path
    log.warning("no copy-free path gives torch's bits for a strided %s head on this CPU: the "
                "head calls torch directly, which may copy a head chunk per batch row", dtype)
    return "direct"


# Rows of the head's input (batch x kept positions) the chunk probe checks.
PROBE_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32)   # 32 x vocab x 4 bytes of output at most
_SAMPLE_BYTES = 16 << 20   # rows of the probe weight written at most
DECODE_ROWS = 8   # generate() keeps one position per sequence: decode batches are this small


@functools.lru_cache(maxsize=None)
def _chunking_mismatches(vocab: int, hidden: int, dtype: torch.dtype,
                         bounds: tuple[tuple[int, int], ...], threads: int) -> tuple[int, ...]:
    weight, sampled = _virtual_weight(vocab, hidden, dtype, bounds)
    g = torch.Generator().manual_seed(1)
    bad = []
    for m in PROBE_ROWS:
        h = torch.randn(m, hidden, generator=g).to(dtype)
        whole = F.linear(h, weight)
        if not all(torch.equal(whole[:, a:b], F.linear(h, weight[a:b])) for a, b in sampled):
            bad.append(m)
    return tuple(bad)


def chunking_mismatches(vocab: int, hidden: int, dtype: torch.dtype,
                        bounds: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """The input row counts (of ``PROBE_ROWS``) at which this machine's matmul computes a row
    block ``[a, b)`` of a ``[vocab, hidden]`` weight with other bits than the whole matrix.

    A streamed head multiplies one chunk at a time while the model it replaced multiplied the
    whole weight, and BLAS libraries choose kernels and thread splits by the whole problem's
    size (MKL on 2 threads, measured: vocab 151936 x hidden 896 differs from its 1024-row
    blocks at 4 to 64 rows; 49152 x 576 does not). Only the shapes decide those choices, so the
    probe multiplies a weight of the real shape whose pages are never written (the kernel's
    zero page: no memory) except rows sampled where kernels change (``_virtual_weight``):
    a detector, checked against real weights in the tests, not a proof. Costs one whole-head
    matmul per probed row count (about 70 ms for a 1 GB head), once per process and shape.
    """
    return _chunking_mismatches(vocab, hidden, dtype, tuple(bounds), torch.get_num_threads())


def _virtual_weight(vocab: int, hidden: int, dtype: torch.dtype, bounds):
    """A ``[vocab, hidden]`` tensor backed by untouched private pages (reads map the zero page,
    not counted in RSS), with random values in the rows where kernels change: 8 on each side
    of every chunk edge and of every 256-row boundary inside a chunk (BLAS kernels compute the
    last columns of a block with another kernel: seen at 504-511 of 512). At most
    ``_SAMPLE_BYTES`` are written: past that, evenly spread chunks (first and last included)
    are sampled. Returns the tensor and the sampled chunks."""
    nbytes = vocab * hidden * dtype.itemsize
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):   # a huge page would be allocated, not shared
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    weight = torch.frombuffer(buf, dtype=dtype, count=vocab * hidden).view(vocab, hidden)
    rows = [sorted({r for p in range(a, b + 1, 256) for r in range(p - 8, p + 8) if a <= r < b}
                   | set(range(max(a, b - 8), b))) for a, b in bounds]
    per_chunk = max(len(r) for r in rows) * hidden * dtype.itemsize
    keep = max(2, _SAMPLE_BYTES // max(per_chunk, 1))
    picked = sorted({round(i * (len(bounds) - 1) / max(keep - 1, 1))
                     for i in range(min(keep, len(bounds)))})
    g = torch.Generator().manual_seed(2)
    for i in picked:
        index = torch.tensor(rows[i])
        weight[index] = torch.randn(len(index), hidden, generator=g).to(dtype)
    return weight, [bounds[i] for i in picked]
