"""Prefetch: when bytes move. A sliding window of streamed Units over a ring of slots."""
from .pipeline import Pipeline, PipelineStats

__all__ = ["Pipeline", "PipelineStats"]
