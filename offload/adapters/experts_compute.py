"""The experts forward of transformers' fused ``*Experts`` modules, recomputed from one expert's
weights at a time, bit for bit.

transformers computes a layer's experts with the whole ``[experts, ...]`` tensors in memory;
offload has only the experts the router picked, each in its own buffer. These functions replay
the same operations in the same order on those buffers, so the float32 result is bitwise the
resident model's (``tests/test_moe.py`` checks it against the real modules):

* ``grouped_mm`` (transformers' default): tokens sorted by expert, one matmul per expert group
  (on the CPU ``F.grouped_mm`` equals ``torch.mm`` per group), the gate applied once to the
  whole ``[S, 2I]`` result (an activation over row slices could take other vector/scalar paths
  than over the whole tensor), then the down projections, the routing weights, and the sum over
  top-k. Each expert is needed twice (up, then down); with enough cache slots the second time
  is a hit.
* ``eager``: transformers' loop over the experts that were hit, in ascending order, each
  ``index_add_``-ed into the output in turn.

``source`` is what hands out expert weights: ``get(e, first, use)`` returns ``(gate_up, down)``
tensors of expert ``e`` (waiting for its read; ``use`` names the one the caller will read, so
an expert cached in its block encoding decodes only that one: the other may be ``None``),
``done(e)`` says the compute is finished with it.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class ExpertSource(Protocol):
    def get(self, expert: int, first: bool = True, use: str = "both"
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def done(self, expert: int) -> None: ...


def grouped_forward(module, source: ExpertSource, needed: list[int], hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm_experts_forward`` on per-expert buffers."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    sample_weights = top_k_weights.reshape(-1)                           # [S]
    expert_ids = top_k_index.reshape(-1)                                 # [S]
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]                          # [S, H]
    sample_weights_g = sample_weights[perm]
    counts = torch.bincount(expert_ids_g, minlength=module.num_experts)
    ends = torch.cumsum(counts, 0).tolist()   # syncs (CPU: free): row ranges of each group
    ranges = {e: (ends[e] - int(counts[e]), ends[e]) for e in needed}

    proj = None
    for e in needed:
        gate_up, _ = source.get(e, first=True, use="gate_up")
        if proj is None:                                                 # [S, 2I]
            proj = torch.empty(selected.shape[0], gate_up.shape[0], dtype=gate_up.dtype,
                               device=selected.device)
        a, b = ranges[e]
        proj[a:b] = torch.mm(selected[a:b].to(gate_up.dtype), gate_up.t())
        source.done(e)
    proj = module._apply_gate(proj)                                      # [S, I]
    out = None
    for e in needed:
        _, down = source.get(e, first=False, use="down")
        if out is None:                                                  # [S, H]
            out = torch.empty(proj.shape[0], down.shape[0], dtype=down.dtype,
                              device=proj.device)
        a, b = ranges[e]
        out[a:b] = torch.mm(proj[a:b].to(down.dtype), down.t())
        source.done(e)
    weighted = out * sample_weights_g.unsqueeze(-1)                      # [S, H]
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted = weighted[inv_perm]
    final = weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final.to(hidden_states.dtype)


def eager_forward(module, source: ExpertSource, needed: list[int], hidden_states: torch.Tensor,
                  top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager ``*Experts.forward`` loop on per-expert buffers."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=module.num_experts + 1).permute(2, 1, 0)
    for e in needed:
        top_k_pos, token_idx = torch.where(mask[e])
        gate_up, down = source.get(e, first=True)
        try:
            gate, up = F.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)
            current = module.act_fn(gate) * up
            current = F.linear(current, down)
        finally:
            source.done(e)
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final


FORWARDS = {"grouped_mm": grouped_forward, "eager": eager_forward}
