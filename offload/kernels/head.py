"""How the LM head gives torch's own bits on this CPU: two properties of torch's kernels that
the head relies on, checked on the running machine rather than assumed.

1. An unfolded half-precision input. ``generate()`` prefills a prompt and keeps the last
position: the head gets ``h[:, -1:, :]``, a strided ``[B, 1, H]`` view that torch does not
fold into a matrix (``folds``), batch 1 included. For a weight that does not require grad,
torch's CPU linear then runs a batched matmul over the weight broadcast to every batch row,
and where oneDNN runs half types (AVX-512 BF16/FP16 CPUs) that copies the weight once per
row: 8 x 88 MB for a TinyLlama head chunk at batch 8, 131 MB for its whole head at batch 1,
far over any budget. The head must give the bits of that call, so ``choose`` finds which
cheaper path does, for one batch row and for several (torch's kernels differ between them):

==============  ==============================================  ===============================
path            how                                             extra memory per batch row
==============  ==============================================  ===============================
``per_row``     ``F.linear`` on each row's contiguous ``[T, H]``  none
``sub_rows``    torch's own call on ``SUB_ROWS``-row blocks       one block (``SUB_ROWS x H``)
                of the weight (columns are independent sums)
``contiguous``  ``F.linear`` on a contiguous copy of ``h``        up to a chunk, where torch's
                                                                folded matmul reorders it
``direct``      torch's own call on the whole chunk               up to a chunk, where torch copies
==============  ==============================================  ===============================

It takes the first, in that order, whose output is bitwise the direct call's on a probe weight
of the model's hidden size (one and two positions, a block split that does not divide the
rows); ``direct`` is exact by definition and is the last resort. Measured here: bfloat16
``per_row``; float16 neither ``per_row`` nor 16-row blocks at batch 1. A float32 input, a
folded one, or a weight that required grad (torch then folds every input) needs no choice.

2. A streamed head's row chunks: ``chunking_mismatches``, below.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..memory import zero_page_tensor

log = logging.getLogger(__name__)

PATHS = ("per_row", "sub_rows", "contiguous", "direct")   # cheapest first
HALF = (torch.bfloat16, torch.float16)
SUB_ROWS = 256        # rows per block on the sub_rows path (fewer take other kernels: fp16)
PROBE_ROWS_WEIGHT = 4 * SUB_ROWS + 64   # the probe weight: blocks of a larger matrix


@dataclass(frozen=True)
class HalfPaths:
    """The path for an unfolded half-precision input, by batch: one row, or several (torch
    takes other kernels for a broadcast batch of one)."""

    single: str
    batched: str

    def for_batch(self, batch: int) -> str:
        return self.single if batch == 1 else self.batched


def folds(h: torch.Tensor) -> bool:
    """Whether torch's linear (for a weight that does not require grad) folds the 3-D input
    ``h`` into one 2-D matrix, which it does only when that needs no copy: every leading
    stride is the next one times its size, size-1 dimensions included. ``h[:, -1:, :]`` of a
    prompt of several positions does not fold, even at batch 1; then torch runs a batched
    matmul over the weight broadcast to each batch row."""
    shape, strides = h.shape, h.stride()
    return all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(h.dim() - 2))


def needs_choice(h: torch.Tensor) -> bool:
    """Whether ``h`` is the unfolded half-precision CPU input the paths differ on."""
    return (h.dtype in HALF and h.dim() > 2 and h.device.type == "cpu" and h.numel() > 0
            and not folds(h))


def linear(h: torch.Tensor, weight: torch.Tensor, path: str,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(h, weight)`` for an unfolded half input, computed by ``path`` into ``out``
    (``[..., weight rows]``, allocated when ``None``)."""
    if out is None:
        out = torch.empty(*h.shape[:-1], weight.shape[0], dtype=h.dtype, device=h.device)
    if path == "per_row":   # a strided 3-D slice would still copy: each row as 2-D [T, H]
        for b in range(h.shape[0]):
            out[b] = F.linear(h[b].reshape(-1, h.shape[-1]), weight).view(out.shape[1:])
    elif path == "contiguous":   # a copy of h (a few KB), which torch then folds
        out.copy_(F.linear(h.contiguous(), weight))
    elif path == "sub_rows":
        for i in range(0, weight.shape[0], SUB_ROWS):
            out[..., i:i + SUB_ROWS] = F.linear(h, weight[i:i + SUB_ROWS])
    else:
        out.copy_(F.linear(h, weight))
    return out


def extra_bytes(paths: HalfPaths | None, batch: int, hidden: int, itemsize: int,
                chunk_rows: int) -> int:
    """What the path for ``batch`` rows may allocate beyond its output (``None``: a model
    whose head needs no choice). Torch broadcasts the weight block to every batch row and
    copies it (``itemsize`` per element); oneDNN may reorder that copy into one of its own
    (``itemsize`` again), and a CPU without native half-precision matmuls converts it to
    float32 (4 more). Measured for a float16 batch of 8 on the 256-row path at hidden 2048
    (``tests/test_exactness.py``): usually 7 MB, up to 24-27 MB in some runs (one copy
    counts 8 MB, this bound 34 MB)."""
    path = paths.for_batch(batch) if paths is not None else None
    if path in (None, "per_row"):
        return 0
    rows = SUB_ROWS if path == "sub_rows" else chunk_rows
    return batch * min(rows, chunk_rows) * hidden * (2 * itemsize + 4)


@functools.lru_cache(maxsize=None)
def choose(dtype: torch.dtype, hidden: int) -> HalfPaths | None:
    """The cheapest paths that give torch's own bits for ``dtype`` and ``hidden`` here, one
    batch row and several, or ``None`` for a dtype that needs no choice (float32).

    Cached per process: the answer depends on the CPU and the torch build only. The probe
    allocates about ``3 x 1088 x hidden`` elements for a moment (~14 MB at hidden 2048).
    """
    if dtype not in HALF:
        return None
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(PROBE_ROWS_WEIGHT, hidden, generator=g).to(dtype)
    return HalfPaths(*(_cheapest_exact(weight, batch, g) for batch in (1, 3)))


def _cheapest_exact(weight: torch.Tensor, batch: int, g: torch.Generator) -> str:
    probes = [torch.randn(batch, 5, weight.shape[1], generator=g).to(weight.dtype)[:, -new:, :]
              for new in (1, 2)]
    refs = [F.linear(h, weight) for h in probes]
    for path in PATHS[:-1]:
        if all(torch.equal(linear(h, weight, path), ref) for h, ref in zip(probes, refs)):
            log.debug("half head (%s, batch %s): %s", weight.dtype, batch, path)
            return path
    log.warning("no copy-free path gives torch's bits for an unfolded %s head input at "
                "batch %s on this CPU: the head calls torch directly, which may copy a head "
                "chunk per batch row", weight.dtype, "1" if batch == 1 else "> 1")
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
    weight = zero_page_tensor((vocab, hidden), dtype)
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
