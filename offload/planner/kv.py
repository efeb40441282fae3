"""The paged KV cache's geometry: pure arithmetic the planner and the cache share."""
from __future__ import annotations

import math

import torch

BLOCK = 4096


def kv_geometry(config, max_context: int, batch: int, dtype, block_tokens: int = 256,
                device_blocks: int = 4) -> dict:
    """The sizes a ``PagedKVCache`` of these parameters takes: ``device_bytes`` on the
    compute device, ``total_bytes`` of the whole KV at ``max_context`` (the rest on disk)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    row = head_dim * torch.empty(0, dtype=dtype).element_size()
    quantum = BLOCK // math.gcd(BLOCK, row)       # positions per 4096-byte-aligned row
    bt = -(-max(block_tokens, 1) // quantum) * quantum
    context = -(-max_context // bt) * bt
    block_bytes = batch * heads * bt * row
    layers = config.num_hidden_layers
    # Each layer keeps its newest device_blocks full blocks and a tail; the layer being updated
    # may hold one more until it spills (a prefill chunk of up to a block crossing a boundary).
    pool = 2 * (layers * (device_blocks + 1) + 1)
    return {"heads": heads, "head_dim": head_dim, "block_tokens": bt, "max_context": context,
            "block_bytes": block_bytes, "pool_blocks": pool,
            "device_bytes": 4 * batch * heads * context * row + pool * block_bytes,
            "total_bytes": 2 * layers * batch * heads * context * row}
