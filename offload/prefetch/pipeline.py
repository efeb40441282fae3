"""The prefetch pipeline: a sliding window over the cyclic stream of non-resident Units.

One forward pass consumes the Plan's ``stream`` in order, and the next pass starts it again,
so the stream is a cycle: position ``p`` holds ``stream[p % n]`` in slot ``p % S``. Releasing
position ``p`` frees its slot, which immediately starts fetching position ``p + S``: while one
Unit computes, the next ``S - 1`` are in flight, across the boundary between tokens too.

The per-Unit loop reads like FlexGen's: submit next, wait for this one, compute, release.
A consumer may hold up to ``S`` Units at once (acquired in stream order, released in any
order): a decoder layer run as one kernel road binds all of its streamed parts first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ..tiers.base import Ticket
from ..tiers.slots import FILLING, FREE, IN_USE, READY, Slot, SlotRing
from ..units import Unit

log = logging.getLogger(__name__)


@dataclass
class PipelineStats:
    """Counters of one pipeline (its stall is the transport's ``layers`` stall)."""

    fetches: int = 0
    fetched_bytes: int = 0
    io_seconds: float = 0.0
    resyncs: int = 0


class Pipeline:
    """Fetches ``stream`` cyclically into ``slots``.

    Args:
        stream: unit keys in consumption order (one forward pass).
        units: key -> Unit.
        slots: the ring of staging slots.
        submit: starts moving a Unit into a slot and returns its Ticket.
        wait: blocks on a Ticket, recording the stall (the transport's ``wait``); returns
            the transfer's I/O seconds.
    """

    def __init__(self, stream: tuple[str, ...], units: dict[str, Unit], slots: SlotRing,
                 submit: Callable[[Unit, Slot], Ticket],
                 wait: Callable[[Ticket], float] = Ticket.wait, *,
                 on_ready: Callable[[Slot], None] | None = None,
                 on_release: Callable[[Slot], None] | None = None):
        self.stream = stream
        self._on_ready = on_ready
        self._on_release = on_release
        self.units = units
        self.slots = slots
        self._submit = submit
        self._wait = wait
        self.stats = PipelineStats()
        self._next = 0      # stream position the next acquire must match
        self._held: list[int] = []   # positions acquired and not yet released, in order
        self._primed = False

    @property
    def active(self) -> bool:
        return bool(self.stream)

    def begin_pass(self) -> None:
        """Called before each forward pass: the stream must be at its start."""
        if not self._primed:
            self._prime(0)
        elif self._next % len(self.stream) or self._held:
            log.debug("forward pass began mid-stream (an earlier pass failed); resyncing")
            self.resync(0)

    def acquire(self, key: str) -> dict[str, torch.nn.Parameter]:
        """Wait until ``key`` is in its slot and return its tensors (records the stall)."""
        pos = self._next
        if self.stream[pos % len(self.stream)] != key:
            if self._held:   # a resync would refill slots whose tensors are in use
                raise RuntimeError(f"unit {key} is not next in the stream while "
                                   f"{len(self._held)} units are held: acquire in stream order")
            pos = self._find(key)
            self.resync(pos)
        slot = self.slots[pos % len(self.slots)]
        if slot.state != FILLING or slot.unit is None or slot.unit.key != key:
            raise RuntimeError(f"unit {key} cannot be acquired: its slot is still held "
                               f"({len(self._held)} units held; at most {len(self.slots)}, "
                               "the slots, may be held at once)")
        self.stats.io_seconds += self._wait(slot.ticket)
        slot.move(FILLING, READY)
        if self._on_ready is not None:
            self._on_ready(slot)  # GPU: the compute stream waits for the slot's copy event
        slot.move(READY, IN_USE)
        self._next = pos + 1
        self._held.append(pos)
        return slot.views(slot.unit)

    def release(self, key: str) -> None:
        """The consumer of ``key`` is done: free its slot and fetch ``len(slots)`` ahead."""
        for i, pos in enumerate(self._held):
            slot = self.slots[pos % len(self.slots)]
            if slot.unit is not None and slot.unit.key == key and slot.state == IN_USE:
                break
        else:
            return  # acquire never completed (its wait raised); resync handles the rest
        del self._held[i]
        slot.move(IN_USE, FREE)
        if self._on_release is not None:
            self._on_release(slot)  # GPU: the next copy into this slot waits for its consumer
        slot.ticket = None
        self._fill(pos + len(self.slots))

    def resync(self, pos: int) -> None:
        """Drain every fetch in flight and restart the window at stream position ``pos``."""
        self.stats.resyncs += 1
        self.drain()
        for slot in self.slots:
            slot.state, slot.unit, slot.ticket = FREE, None, None
        self._prime(pos)

    def drain(self) -> None:
        """Wait for every fetch in flight, ignoring its errors (used on resync and close)."""
        for slot in self.slots:
            if slot.ticket is not None:
                try:
                    slot.ticket.wait()
                except Exception:  # the error was or will be reported by acquire
                    pass

    def _prime(self, pos: int) -> None:
        self._primed = True
        self._next = pos
        self._held = []
        for p in range(pos, pos + len(self.slots)):
            self._fill(p)

    def _fill(self, pos: int) -> None:
        slot = self.slots[pos % len(self.slots)]
        unit = self.units[self.stream[pos % len(self.stream)]]
        slot.move(FREE, FILLING)
        slot.unit = unit
        slot.ticket = self._submit(unit, slot)
        self.stats.fetches += 1
        self.stats.fetched_bytes += unit.stored_bytes

    def _find(self, key: str) -> int:
        n = len(self.stream)
        for step in range(n):
            if self.stream[(self._next + step) % n] == key:
                return (self._next + step) % n
        raise KeyError(f"unit {key} is not streamed by this plan")
