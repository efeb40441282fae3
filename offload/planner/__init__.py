"""The planner: decides where every Unit lives and how deep to prefetch, and explains why.

``plan_for`` is the one entry point; ``PlanOptions`` is what it is asked.
"""
from .make import plan_for
from .options import DEFAULT_MAX_TOKENS, ExpertOptions, KVOptions, PlanOptions
from .placement import make_plan
from .plan import ExpertPlan, KVPlan, Plan
from .profile import HardwareProfile

__all__ = ["plan_for", "PlanOptions", "ExpertOptions", "KVOptions", "DEFAULT_MAX_TOKENS",
           "make_plan", "Plan", "ExpertPlan", "KVPlan", "HardwareProfile"]
