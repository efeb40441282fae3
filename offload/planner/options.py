"""What a user asks of a plan, as frozen data: parsed and checked at the edge (``api.py``),
then read by the planner and nobody else."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OffloadError

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ExpertOptions:
    """How an MoE model's experts move (ignored for dense models); see ``offload.run``."""

    experts: str = "cache"
    predict: bool = False
    predict_depth: int = 1
    predict_width: int | None = None
    expert_cache: str = "lru"

    def check(self, top_k: int, n_experts: int) -> None:
        if self.experts not in ("cache", "stream"):
            raise OffloadError(f"experts={self.experts!r}: use 'cache' (expert Units fetched as "
                               "routed) or 'stream' (every expert streamed with its layer)")
        if self.expert_cache not in ("lru", "lfu"):
            raise OffloadError(f"expert_cache={self.expert_cache!r}: use 'lru' or 'lfu'")
        if not isinstance(self.predict_depth, int) or self.predict_depth < 1:
            raise OffloadError(f"predict_depth={self.predict_depth!r}: use an int >= 1 (or "
                               "predict=False to turn prediction off)")
        w = self.predict_width
        if w is not None and (not isinstance(w, int) or not 1 <= w <= n_experts):
            raise OffloadError(f"predict_width={w!r}: use an int from 1 to {n_experts} "
                               f"(default: top-k = {top_k})")


DEFAULT_CHUNK = 256   # prompt positions per forward of a paged or batched plan, unless asked


@dataclass(frozen=True)
class KVOptions:
    """Where the KV cache lives; see ``offload.run``."""

    kv: str = "auto"
    max_context: int | None = None
    batch: int = 1
    block_tokens: int = 256
    device_blocks: int = 4
    prefill_chunk: int | None = None   # None: DEFAULT_CHUNK (paged, batched); one-shot or
    #                                    the planner's choice (dynamic: ``make.plan_for``)

    def check(self) -> None:
        if self.kv not in ("auto", "paged", "dynamic", "batched"):
            raise OffloadError(f"kv={self.kv!r}: use 'auto', 'paged' (recent blocks in the "
                               "budget, older ones on disk), 'dynamic' (all in the budget) or "
                               "'batched' (a continuous-batching manager's own paged cache)")
        for name in ("max_context", "batch", "block_tokens", "device_blocks", "prefill_chunk"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise OffloadError(f"{name}={v!r}: use a positive int")
        if self.kv in ("paged", "batched") and self.max_context is None:
            raise OffloadError(f"kv={self.kv!r} needs max_context= (the longest sequence, in "
                               "positions): it sizes the cache's buffers"
                               + (" and its disk part" if self.kv == "paged" else ""))


@dataclass(frozen=True)
class PlanOptions:
    """Everything a plan depends on besides the store, the adapter and the hardware profile.

    Attributes:
        budget_bytes: the compute tier's budget.
        device: the compute device (``cpu``, ``cuda:0``).
        max_tokens: batch x context the reserve holds (default: from ``kv.max_context``
            x ``kv.batch``, else ``DEFAULT_MAX_TOKENS``).
        prefetch: Units fetched ahead of the one computing (``None``: the planner's depth).
        host_budget_bytes: pinned host RAM for streamed Units (GPU machines).
        spill_dir / spill_free_bytes: where a paged KV cache spills, and the bytes free there
            (a fact of the machine, measured by the caller; ``None``: not checked).
        logits: the logits rows the reserve holds: ``"last"`` (one per sequence: what
            ``generate()`` computes) or ``"all"`` (every reserved position: forwards that return
            the whole sequence's logits, e.g. perplexity).
    """

    budget_bytes: int
    device: str = "cpu"
    max_tokens: int | None = None
    prefetch: int | None = None
    host_budget_bytes: int = 0
    spill_dir: str = ""
    spill_free_bytes: int | None = None
    logits: str = "last"
    experts: ExpertOptions = field(default_factory=ExpertOptions)
    kv: KVOptions = field(default_factory=KVOptions)

    def check(self) -> None:
        if self.logits not in ("last", "all"):
            raise OffloadError(f"logits={self.logits!r}: use 'last' (the reserve holds one row "
                               "of logits per sequence, as generate() computes) or 'all' (every "
                               "position's, for forwards that return them)")
        self.kv.check()

    @property
    def tokens(self) -> int:
        """The positions the reserve is sized for."""
        if self.max_tokens:
            return int(self.max_tokens)
        if self.kv.max_context is not None:
            return self.kv.batch * self.kv.max_context
        return DEFAULT_MAX_TOKENS
