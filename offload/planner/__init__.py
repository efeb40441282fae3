"""The planner: decides where every Unit lives and how deep to prefetch, and explains why."""
from .placement import make_plan
from .plan import Plan
from .profile import HardwareProfile, load_or_measure

__all__ = ["make_plan", "Plan", "HardwareProfile", "load_or_measure"]
