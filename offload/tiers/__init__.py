"""Tiers move bytes; they know addresses and sizes, never models."""
from .base import Ticket
from .device import DeviceTier
from .disk import DiskTier
from .slots import Slot, SlotRing
from .transport import Transport

__all__ = ["Ticket", "DeviceTier", "DiskTier", "Slot", "SlotRing", "Transport"]
