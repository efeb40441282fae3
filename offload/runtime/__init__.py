"""The runtime: what runs one offloaded model. ``core`` (the Runtime: transport, tiers, slots,
pipeline, hooks, stats), ``startup`` (resident Units and start-up checksums), ``moe`` (the
experts of an MoE model, through named collaborators)."""
from .core import Runtime

__all__ = ["Runtime"]
