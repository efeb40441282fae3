"""A dynamic KV cache written in place: every layer's keys and values in one slab sized once.

transformers' ``DynamicLayer`` grows by ``torch.cat``: every forward copies each layer's whole
cache to append its new positions, a cost that grows with the context (per layer and step,
single-threaded here: 5-8 us at 20-100 positions, 13-32 us at 250, 0.5 ms at 2,000: 30 ms a
step on SmolLM2's 30 layers), and leaves each layer's old copy as a hole in the C heap. A
``buffered_cache`` allocates one ``[layers, 2, batch, heads, capacity, head_dim]`` slab at its
first update (``capacity``: what generate() will reach, or the positions the plan reserved per
sequence; one allocation, mapped and unmapped whole), and each ``BufferLayer`` copies a
forward's new positions into its part and returns views of the positions filled: 9-12 us per
layer and step whatever the context, no copy of the old positions. A forward beyond the
capacity moves the layer to buffers of its own of exactly the positions needed (the cache
then reports no ``capacity``). Anything that replaces the layer's tensors (a beam search's
reordering, a crop) is taken up at the next update, copied back into its buffer.

The budget check still counts a buffered cache as transformers' (its ``torch.cat`` holes, the
``cat`` term of ``activation_bytes``): with that term dropped, SmolLM2 under
``compute="fast"`` at 20% planned 20 MB more weights and measured 100.3-101.2% of its budget
in three of five CLI runs (a 305-token prompt): the term had been covering what a prefill's
other temporaries leave in the heap, which is not modelled yet. What this cache buys is the
step time at long contexts and measured headroom, not reserve.

Used where the plan says so (``KVPlan.buffered``: ``compute="fast"`` plans): the attention
reads a strided view (positions ``capacity`` apart per head), which torch's attention takes
as it is (bitwise the contiguous tensor's result here: ``tests/test_kvbuffer.py``), but
exact plans promise the resident model's bits on every CPU and keep transformers' cache. A
fast decode step of one position writes the buffers itself: ``room`` hands the layer kernel
(``kernels/layer.py``) the buffers and the position, which appends the new keys and values and
attends over them in C, and ``advance`` then counts them as ``update`` would have.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class Slab:
    """The keys and values of ``layers`` layers of ``capacity`` positions, allocated at the
    first layer's first update in that layer's batch, heads, head size and dtype."""

    def __init__(self, layers: int, capacity: int):
        self.layers, self.capacity = layers, int(capacity)
        self.data: torch.Tensor | None = None

    def part(self, index: int, k: torch.Tensor) -> torch.Tensor | None:
        """Layer ``index``'s ``[2, batch, heads, capacity, head_dim]``, or None where ``k``
        is not of the slab's form."""
        if self.data is None:
            self.data = k.new_empty((self.layers, 2, k.shape[0], k.shape[1], self.capacity,
                                     k.shape[3]))
        d = self.data
        if (d.shape[2], d.shape[3], d.shape[5], d.dtype) != (*k.shape[:2], k.shape[3], k.dtype):
            return None
        return d[index]


class BufferLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers of ``capacity``
    positions (part of a ``Slab`` where one is given)."""

    def __init__(self, capacity: int, slab: Slab | None = None, index: int = 0):
        super().__init__()
        self.capacity, self._slab, self._index = int(capacity), slab, index
        self._k = self._v = None   # the buffers, [batch, heads, positions, head_dim]
        self._room = 0             # their positions
        self._filled = 0           # positions written
        self._form = None          # (batch, heads, dtype) they take
        self._view = None          # the keys this layer last returned
        self._own = False          # buffers of its own, besides its part of the slab

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._filled
        end = n + key_states.shape[-2]
        if (self.keys is not self._view or end > self._room
                or (key_states.shape[0], key_states.shape[1], key_states.dtype) != self._form):
            n = self._take_up(key_states, value_states)   # the slow road: (re)place
            end = n + key_states.shape[-2]
        self._k[:, :, n:end] = key_states
        self._v[:, :, n:end] = value_states
        self.advance(end - n)   # _filled is n
        return self.keys, self.values

    def room(self, batch: int, heads: int, positions: int, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The key and value buffers (``[batch, heads, room, head_dim]``, rows contiguous) and
        the position where a forward of ``positions`` new ones writes, for a writer that fills
        them itself (``compute="fast"``'s layer kernel) and then calls ``advance``; None where
        ``update`` must take the forward (nothing held yet, no room, another form, or tensors
        replaced since)."""
        if (self._k is None or self.keys is not self._view
                or self._filled + positions > self._room
                or (batch, heads, dtype) != self._form or self._k.stride(-1) != 1
                or self._k.stride(-2) != self._k.shape[-1]):
            return None
        return self._k, self._v, self._filled

    def advance(self, positions: int) -> None:
        """Count ``positions`` written at ``room``'s position (as ``update`` would have)."""
        end = self._filled + positions
        size = (*self._k.shape[:2], end, self._k.shape[3])
        self.keys = self._k.as_strided(size, self._k.stride())
        self.values = self._v.as_strided(size, self._v.stride())
        self._view, self._filled = self.keys, end

    def _take_up(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Buffers holding the layer's positions so far (its tensors as they are now,
        whoever set them) with room for ``k``: its part of the slab where they fit, else
        its own of exactly the positions needed. Returns the positions held."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        old_k, old_v = (self.keys, self.values) if n else (None, None)
        part = (self._slab.part(self._index, k)
                if self._slab is not None and n + k.shape[-2] <= self._slab.capacity else None)
        if part is not None:
            self._k, self._v = part[0], part[1]
        else:
            size = max(n + k.shape[-2], self.capacity if self._slab is None else 0)
            self._k, self._v = (x.new_empty((*x.shape[:2], size, x.shape[-1]))
                                for x in (k, v))
        self._room, self._own = self._k.shape[-2], part is None
        if n and old_k.data_ptr() != self._k.data_ptr():   # a crop's view is its own prefix
            self._k[:, :, :n] = old_k
            self._v[:, :, :n] = old_v
        self._form, self._filled = (k.shape[0], k.shape[1], k.dtype), n
        return n

    def reset(self) -> None:
        self._k = self._v = self._form = self._view = None
        self._room = self._filled = 0
        self._own = False
        super().reset()


def buffered_cache(config, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are ``BufferLayer`` of
    ``capacity`` positions in one ``Slab`` (sliding-window layers, if any, stay as
    transformers makes them)."""
    cache = DynamicCache(config=config)
    full = [i for i, layer in enumerate(cache.layers) if type(layer) is DynamicLayer]
    slab = Slab(len(full), capacity)
    at = {i: j for j, i in enumerate(full)}
    cache.layers = [BufferLayer(capacity, slab, at[i]) if i in at else layer
                    for i, layer in enumerate(cache.layers)]
    return cache


def capacity(cache) -> int | None:
    """The positions a buffered cache holds per sequence without growing, all of them in its
    slab; None for any other cache, or one with a layer moved to buffers of its own (which
    the budget check then counts as transformers' cache)."""
    layers = getattr(cache, "layers", None)
    if (not layers or not all(isinstance(layer, BufferLayer) and layer._slab is not None
                              and not layer._own for layer in layers)):
        return None
    return layers[0]._slab.capacity
