"""The error hierarchy: every failure a user can cause says what, how much, and what to do.

Errors carry their numbers as attributes so tests (and callers) can check them without parsing
messages. The CLI prints ``str(err)`` and exits non-zero, without a traceback.
"""
from __future__ import annotations


class OffloadError(Exception):
    """Base class of every error offload raises on purpose."""


class BudgetError(OffloadError):
    """A memory budget that is malformed or cannot hold the minimum working set."""

    def __init__(self, message: str, *, budget_bytes: int | None = None,
                 minimum_bytes: int | None = None):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes


class StoreError(OffloadError):
    """A checkpoint or packed store that is missing, truncated, corrupt or of another version."""

    def __init__(self, message: str, *, path: str | None = None, unit: str | None = None):
        super().__init__(message)
        self.path = path
        self.unit = unit


class ModelError(OffloadError):
    """A model this runtime cannot run (unsupported architecture, unexpected weights)."""

    def __init__(self, message: str, *, supported: tuple[str, ...] = ()):
        super().__init__(message)
        self.supported = supported


class HardwareError(OffloadError):
    """The machine refuses: an offload dir that is not writable or is full, a missing device."""

    def __init__(self, message: str, *, path: str | None = None,
                 needed_bytes: int | None = None, free_bytes: int | None = None):
        super().__init__(message)
        self.path = path
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
