"""The reserve: what a forward holds in the compute tier besides the weights.

One formula, ``forward_bytes``, sizes the Plan's reserve (for the largest forward the options
allow) and checks every forward the runtime runs against it (``Runtime._check_budget``): KV
cache (all of it, or a paged cache's device part), activations and the logits the forward
keeps, the scratch for embedding gathers, and what the head's path copies
(``kernels/head.py``). ``generate()`` keeps one row of logits per sequence, so the reserve holds
that many unless a plan asks for every position's (``logits="all"``); a prompt whose one-shot
prefill would not fit is prefilled in the largest chunks that do (``largest_chunk``).
"""
from __future__ import annotations

from ..kernels.qmatmul import INT_ROWS
from ..units import align


def scratch_bytes(shape, itemsize: int) -> int:
    """Host scratch for gathering embedding rows (one row plus two O_DIRECT blocks)."""
    return align(shape.hidden * itemsize + 2 * 4096, 4096)


def forward_bytes(shape, itemsize: int, *, batch: int, new: int, total: int, logits_rows: int,
                  kv_bytes: int, head_copy: int = 0, in_place: bool = False,
                  fused_scratch: int = 0) -> int:
    """Bytes one forward of ``batch`` x ``new`` positions (``total`` per sequence with the
    cached ones, ``logits_rows`` rows of logits kept) holds besides weights; ``kv_bytes`` is
    the cache it runs with, ``in_place`` where that cache writes new positions into buffers
    it holds (a paged cache), not by ``torch.cat``. ``fused_scratch``: the fused kernel's
    prefill scratch (``planner.compute.prefill_scratch_bytes``), held only by a forward of
    more than ``qmatmul.INT_ROWS`` rows (fewer take the integer kernel, which needs none)."""
    return (kv_bytes + shape.activation_bytes(batch, new, total, itemsize, logits_rows,
                                              cat=not in_place)
            + scratch_bytes(shape, itemsize) + head_copy
            + held_scratch(fused_scratch, batch * new))


def held_scratch(fused_scratch: int, rows: int) -> int:
    """The fused kernel's prefill scratch where a forward of ``rows`` rows (all sequences'
    positions) holds it: above ``qmatmul.INT_ROWS``; 0 at or below (the integer kernel)."""
    return fused_scratch if rows > INT_ROWS else 0


def dynamic_reserve(shape, itemsize: int, tokens: int, *, logits_rows: int = 1,
                    head_copy: int = 0, chunk: int | None = None, batch: int = 1,
                    fused_scratch: int = 0) -> int:
    """A DynamicCache of ``tokens`` positions and the prefill of all of them in one forward
    (``chunk``: in forwards of that many positions, the last attending to all ``tokens``),
    keeping ``logits_rows`` rows of logits (``generate()`` keeps the last position of each
    sequence: one row per sequence), with what the head's path copies for them; and at least
    every decode step of ``batch`` sequences sharing those positions (``decode_reserve``). A
    cache written in place (``adapters/kvbuffer.py``) is reserved the same: see there.
    ``fused_scratch``: see ``forward_bytes``."""
    kv = shape.kv_bytes(tokens, itemsize)
    prefill = forward_bytes(shape, itemsize, batch=1, new=min(chunk or tokens, tokens),
                            total=tokens, logits_rows=logits_rows, kv_bytes=kv,
                            head_copy=head_copy, fused_scratch=fused_scratch)
    return max(prefill, decode_reserve(shape, itemsize, tokens, batch=batch, kv_bytes=kv,
                                       head_copy=head_copy, fused_scratch=fused_scratch))


def decode_reserve(shape, itemsize: int, tokens: int, *, batch: int, kv_bytes: int,
                   head_copy: int = 0, fused_scratch: int = 0) -> int:
    """The most a decode step (one position for each of ``batch`` sequences, one row of
    logits each) holds on the way to ``tokens`` positions in all, with a cache of
    ``kv_bytes``: at the last position, or at the last one where a layer's cache is still
    below the C heap's mmap threshold (``activation_bytes``: every layer's old copy is then
    left as heap). A prefill in chunks holds less than that: SmolLM2 at 256 positions, chunks
    of 128, reserved 19.0 MB where its decode step at position 170 is checked at 20.7."""
    last = max(1, tokens // max(1, batch))
    below = shape.positions_below_mmap(batch, itemsize)
    return max(forward_bytes(shape, itemsize, batch=batch, new=1, total=t, logits_rows=batch,
                             kv_bytes=kv_bytes, head_copy=head_copy,
                             fused_scratch=fused_scratch)
               for t in {last, min(last, max(1, below))})


def paged_reserve(shape, itemsize: int, *, batch: int, chunk: int, max_context: int,
                  kv_device_bytes: int, logits_rows: int, head_copy: int = 0,
                  fused_scratch: int = 0) -> int:
    """A paged cache's device part and a prefill of ``chunk`` positions per sequence."""
    return forward_bytes(shape, itemsize, batch=batch, new=chunk, total=max_context,
                         logits_rows=logits_rows, kv_bytes=kv_device_bytes,
                         head_copy=head_copy, in_place=True, fused_scratch=fused_scratch)


TRASH_PAGES = 2       # pages transformers' paged cache allocates beyond the requests' own
SAMPLING_BYTES = 32   # per logits row and vocab entry: the sampler's copies (scaled and sorted
#                       float32 logits, int64 sort indices, cumulative sums, probabilities)


def batched_reserve(shape, itemsize: int, *, positions: int, chunk: int, logits_rows: int,
                    head_copy: int = 0, page: int = 0, fused_scratch: int = 0) -> int:
    """A continuous-batching manager's forward (transformers' ``init_continuous_batching``,
    what ``offload serve`` runs): its paged cache of ``positions`` (every sequence's pages,
    allocated once, and ``TRASH_PAGES`` pages of ``page`` positions it never hands out), and
    one forward of ``chunk`` tokens from any of its sequences flattened into one row,
    attending to at most every cached position, keeping ``logits_rows`` rows of logits (one
    per sequence: the manager passes their indices as ``logits_to_keep``) and sampling each
    with per-request temperature and top-p (``SAMPLING_BYTES``). Beside attention's own: the
    cache's update gathers one layer's keys and values for the forward's sequences into new
    tensors, and the manager keeps a float mask of ``chunk`` x (``positions`` + ``chunk``)."""
    gathered = 2 * positions * shape.kv_heads * shape.head_dim * itemsize
    mask = chunk * (positions + chunk) * itemsize
    sampling = logits_rows * shape.vocab * SAMPLING_BYTES
    kv = shape.kv_bytes(positions + TRASH_PAGES * page, itemsize)
    return forward_bytes(shape, itemsize, batch=1, new=chunk, total=positions,
                         logits_rows=logits_rows, kv_bytes=kv, head_copy=head_copy,
                         in_place=True, fused_scratch=fused_scratch) + gathered + mask + sampling


def largest_chunk(need, prompt: int, reserve: int) -> int:
    """The most prompt positions per forward, up to ``prompt``, whose ``need(positions)`` fits
    ``reserve`` (0: not even one). ``need`` grows with the positions: a bisection."""
    lo, hi = 0, prompt
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= reserve:
            lo = mid
        else:
            hi = mid - 1
    return lo
