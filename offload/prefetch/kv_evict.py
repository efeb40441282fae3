"""LOSSY, opt-in: a KV cache of a fixed size that evicts positions (H2O / Scissorhands style).

Each layer keeps at most ``keep`` positions: the newest ``recent`` and, among the older ones,
the heavy hitters, those with the largest attention they received so far (summed over heads
and queries). Attention weights come from the model's attention modules (a forward hook), so
the model runs its ``eager`` attention while the cache is attached. Evicting changes the
model's outputs: ``benches/bench_kv.py`` measures the perplexity it costs.

Positions keep their rotary angles: ``get_seq_length`` counts every position seen (so new
tokens get the right position ids) while attention masks cover only the kept ones.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class HeavyHitterCache(Cache):
    """A ``Cache`` keeping ``keep`` positions per layer (``recent`` newest + heavy hitters).

    Use ``with HeavyHitterCache(model, keep=...) as cache: model.generate(..., cache=cache)``;
    leaving the block restores the model's attention implementation and removes the hooks.
    """

    def __init__(self, model, *, keep: int, recent: int | None = None):
        if keep < 2:
            raise ValueError("keep must be at least 2 positions")
        self.keep, self.recent = keep, recent if recent is not None else keep // 2
        if not 0 < self.recent < keep:
            raise ValueError("recent must be between 1 and keep - 1")
        self.model = model
        self._attn = model.config._attn_implementation
        model.set_attn_implementation("eager")
        attn = [m for name, m in model.named_modules() if name.endswith("self_attn")]
        self._hooks = [m.register_forward_hook(self._observe) for m in attn]
        self.evicted = 0
        super().__init__(layers=[HeavyHitterLayer(self) for _ in attn])

    def _observe(self, module, args, output) -> None:
        weights = output[1]   # [B, heads, q, k]: eager attention's probabilities
        self.layers[module.layer_idx].observe(weights)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.model.set_attn_implementation(self._attn)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HeavyHitterLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, cache: HeavyHitterCache):
        super().__init__()
        self.cache = cache
        self.seen = 0
        self.score: torch.Tensor | None = None   # [B, kept]: attention received so far

    def lazy_initialization(self, key_states, value_states) -> None:
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.score = torch.zeros(key_states.shape[0], 0, dtype=torch.float32,
                                 device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new = key_states.shape[-2]
        self.score = torch.cat([self.score, self.score.new_zeros(self.score.shape[0], new)], 1)
        self.seen += new
        return self.keys, self.values

    def observe(self, weights: torch.Tensor) -> None:
        """Add the attention each kept position received, then evict down to ``keep``."""
        self.score += weights.float().sum(dim=(1, 2))
        kept = self.keys.shape[-2]
        keep, recent = self.cache.keep, self.cache.recent
        if kept <= keep:
            return
        old = kept - recent
        heavy = keep - recent
        # the heavy hitters among the old positions, in their original order
        top = self.score[:, :old].topk(heavy, dim=1).indices.sort(dim=1).values   # [B, heavy]
        idx = torch.cat([top, torch.arange(old, kept, device=top.device)
                         .expand(top.shape[0], -1)], dim=1)                          # [B, keep]
        gather = idx[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.score = self.score.gather(1, idx)
        self.cache.evicted += kept - keep

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if self.keys is None else self.keys.shape[-2]
        return kept + query_length, 0
