"""The device expert cache: which experts sit in which slot, what to evict, what to fetch.

A fixed set of slots (allocated once, inside the budget) holds experts read from disk.
``protected`` of them are spread over the MoE layers as a quota per layer: each layer keeps
that many of its experts protected (the most recently used, or with the ``lfu`` policy the
most used). The rest of the slots are shared: on-demand misses and guesses land there, and
whatever was used stays until evicted. Eviction never touches an expert a running layer holds
(pinned) or still needs, nor one whose read is in flight, nor (while a guess stands) one
guessed for a coming layer; a guess never evicts another layer's protected experts, an
on-demand miss may (least valuable first).

The compute thread alone calls the cache; I/O threads only fill slot buffers. A layer's use of
the cache is one *session*: ``begin`` names the experts it needs and starts reading the
missing ones at once (so their reads overlap each other and the compute), ``get`` pins one and
waits for it, ``done`` unpins it, ``end`` unpins whatever an exception left pinned.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ModelError
from ..tiers.base import Ticket
from ..tiers.slots import FILLING, FREE, READY, Slot
from ..units import Unit, align

POLICIES = ("lru", "lfu")
TRACE_STEPS = 128   # decode steps per layer kept for the next plan (``ExpertCache.decode_trace``)


@dataclass
class ExpertStats:
    """Cumulative counters (per decode or prefill step alike)."""

    accesses: int = 0        # needed (layer, expert) pairs that are not resident
    hits: int = 0            # ... found in the cache or already on their way (prefetched)
    resident_hits: int = 0   # needed experts that are resident
    on_demand: int = 0       # reads started because a layer needed an expert nobody predicted
    refetches: int = 0       # reads of an expert evicted between a layer's two passes
    prefetched: int = 0      # reads started by the predictor
    cancelled: int = 0       # guesses dropped before their read started (found wrong)
    bytes_read: int = 0
    wrong_guess_bytes: int = 0   # prefetched bytes its layer then did not use
    tp: int = 0              # predicted and used
    fp: int = 0              # predicted, not used
    fn: int = 0              # used, not predicted


@dataclass
class _Entry:
    key: tuple[int, int]
    unit: Unit
    last_use: int = 0
    uses: int = 0
    pins: int = 0
    predicted: bool = False   # read by the predictor and not used since


class ExpertCache:
    """Slots of experts, their owners and the policy that evicts them.

    Args:
        units: ``(layer, expert) -> Unit`` for every expert of the store.
        resident: ``(layer, expert) -> (gate_up, down)`` of experts the plan keeps resident.
        slots: the cache's slots (one expert each).
        submit: starts reading a Unit into a slot and returns its Ticket.
        submit_guess: the same for the predictor's guesses (default ``submit``): the runtime
            queues them behind every other read.
        views: the ``(gate_up, down)`` tensors of the Unit in a slot, given which of them the
            caller reads (``use``: ``gate_up``, ``down`` or ``both``; an expert cached in its
            block encoding is decoded then, that part only).
        protected: slots whose experts are protected, spread evenly over ``layers``.
        layers: the MoE layers.
        policy: ``lru`` or ``lfu``.
        wait: blocks on a Ticket, recording the stall (the transport's ``wait``).
        idle: whether a read submitted now would start at once (the transport's ``idle``):
            guesses are read only then.
        on_ready / on_release: GPU stream events around a slot's use.
        on_cancel: a guess's read was dropped before it started.
    """

    def __init__(self, units: dict[tuple[int, int], Unit],
                 resident: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
                 slots: list[Slot], submit: Callable[[Unit, Slot], Ticket],
                 views: Callable[[Slot, str], tuple[torch.Tensor | None, torch.Tensor | None]],
                 *,
                 protected: int = 0, layers: tuple[int, ...] = (), policy: str = "lru",
                 submit_guess: Callable[[Unit, Slot], Ticket] | None = None,
                 wait: Callable[[Ticket], float] = Ticket.wait,
                 idle: Callable[[], bool] | None = None,
                 on_ready: Callable[[Slot], None] | None = None,
                 on_release: Callable[[Slot], None] | None = None,
                 on_cancel: Callable[[Unit], None] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: use one of {POLICIES}")
        self.units, self.resident, self.slots = units, resident, slots
        self._submit, self._views, self._wait = submit, views, wait
        self._submit_guess = submit_guess or submit
        self._on_ready, self._on_release = on_ready, on_release   # GPU: stream events
        self._on_cancel = on_cancel   # a read that never happened: its first read is still due
        self.decoding = False     # the runtime says whether this forward is a decode step
        self.idle = idle
        self.decode_use: dict[tuple[int, int], int] = {}   # decode steps that used an expert
        # layer -> the experts each of its last TRACE_STEPS decode steps used (the order of
        # reuse an LRU cache hits on: ``store.heat``)
        self.decode_trace: dict[int, collections.deque] = {}
        self.policy = policy
        n = max(len(layers), 1)
        self.quota = {layer: protected // n + (1 if i < protected % n else 0)
                      for i, layer in enumerate(layers)}   # layer -> experts it keeps
        self.stats = ExpertStats()
        self._where: dict[tuple[int, int], Slot] = {}
        self._entry: dict[int, _Entry] = {}       # slot index -> entry
        self._tick = 0
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for it
        self._layer = -1
        self._held: list[Slot] = []          # slots pinned by ``get`` of the running layer
        self._wanted: set[tuple[int, int]] = set()   # what the running layer needs

    # -- a layer's session ------------------------------------------------------------------
    def begin(self, layer: int, needed: list[int]) -> None:
        """Note that ``layer`` needs ``needed`` (ascending) and start reading the missing ones."""
        self._tick += 1
        self._layer = layer
        self._score_prediction(layer, needed)
        self._wanted = {(layer, e) for e in needed}
        misses = []
        if self.decoding:
            self.decode_trace.setdefault(
                layer, collections.deque(maxlen=TRACE_STEPS)).append(tuple(needed))
        for e in needed:
            key = (layer, e)
            if self.decoding:
                self.decode_use[key] = self.decode_use.get(key, 0) + 1
            if key in self.resident:
                self.stats.resident_hits += 1
                continue
            self.stats.accesses += 1
            if key in self._where:
                self.stats.hits += 1
            else:
                misses.append(key)
        self.stats.on_demand += len(misses)
        for key in misses:
            if self._fetch(key, evict_protected=True) is None:
                break   # more misses than room: ``get`` reads the rest as experts finish

    @property
    def needed(self) -> tuple[int, frozenset]:
        """The running layer and the experts it needs (between ``begin`` and ``end``)."""
        return self._layer, frozenset(e for _, e in self._wanted)

    def get(self, expert: int, first: bool = True, use: str = "both"
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The weights of ``expert`` of the current layer, waiting for its read if needed
        (``use``: which of them the caller reads, see ``views``)."""
        key = (self._layer, expert)
        views = self.resident.get(key)
        if views is not None:
            return views
        slot = self._where.get(key)
        if slot is None:
            # Not started by ``begin`` (too little room), or evicted between the up and down
            # passes of a large batch: read it now.
            if not first:
                self.stats.refetches += 1
            slot = self._fetch(key, evict_protected=True, force=True)
        self._entry[slot.index].pins += 1
        self._held.append(slot)
        self._ready(slot)
        if self._on_ready is not None:
            self._on_ready(slot)   # GPU: the compute stream waits for the slot's copy
        self._entry[slot.index].predicted = False
        return self._views(slot, use)

    def done(self, expert: int) -> None:
        """The compute is finished with ``expert`` (it stays cached)."""
        slot = self._where.get((self._layer, expert))
        if slot is None or slot not in self._held:
            return
        self._held.remove(slot)
        if self._on_release is not None:
            self._on_release(slot)   # GPU: a later read into this slot waits for this compute
        entry = self._entry[slot.index]
        entry.pins -= 1
        entry.last_use = self._tick
        entry.uses += 1

    def end(self) -> None:
        """The layer is finished: unpin what an exception left pinned."""
        for slot in self._held:
            if self._on_release is not None:
                self._on_release(slot)
            entry = self._entry.get(slot.index)
            if entry is not None:
                entry.pins -= 1
        self._held.clear()
        self._wanted = set()

    # -- prediction -------------------------------------------------------------------------
    def prefetch(self, layer: int, experts: list[int], guessed: list[int] | None = None) -> None:
        """Start reading ``experts`` of ``layer`` (best guess first) into free or unprotected
        slots while the disk has an idle thread; stops at the first that finds no room or a
        busy disk (a guess never delays a read a layer waits on; queueing the rest for later
        was measured: more wrong reads, no faster). ``guessed`` (default ``experts``) is the
        whole guess: cached experts in it are kept until ``layer`` runs, and it is scored."""
        self._predicted.setdefault(layer, set()).update(guessed if guessed is not None
                                                        else experts)
        for e in experts:
            key = (layer, e)
            if key in self.resident or key in self._where:
                continue
            if self.idle is not None and not self.idle():
                return
            slot = self._fetch(key, evict_protected=False, guess_for=(layer, set(experts)))
            if slot is None:
                return
            self.stats.prefetched += 1
            entry = self._entry[slot.index]
            entry.predicted = True
            entry.last_use = self._tick   # a fresh guess is not the first thing to evict

    def _score_prediction(self, layer: int, needed: list[int]) -> None:
        guessed = self._predicted.pop(layer, None)
        if guessed is None:
            return
        used = set(needed)
        s = self.stats
        s.tp += len(guessed & used)
        s.fp += len(guessed - used)
        s.fn += len(used - guessed)
        for e in guessed - used:
            slot = self._where.get((layer, e))
            if slot is None or not self._entry[slot.index].predicted:
                continue
            if slot.state == FILLING and slot.ticket.cancel():
                if self._on_cancel is not None:
                    self._on_cancel(slot.unit)
                s.bytes_read -= align(slot.unit.stored_bytes, 4096)
                s.prefetched -= 1
                s.cancelled += 1
                self._forget(slot)   # a wrong guess still queued: never read
                continue
            s.wrong_guess_bytes += align(slot.unit.stored_bytes, 4096)
            self._entry[slot.index].predicted = False

    # -- slots ------------------------------------------------------------------------------
    def _ready(self, slot: Slot) -> None:
        if slot.state == FILLING:
            try:
                self._wait(slot.ticket)
            except BaseException:
                self._forget(slot)
                raise
            slot.move(FILLING, READY)
            slot.ticket = None

    def _fetch(self, key: tuple[int, int], *, evict_protected: bool, force: bool = False,
               guess_for: tuple[int, set] | None = None) -> Slot | None:
        """Start reading ``key`` into a slot; None when there is no room (unless ``force``:
        then wait for a read in flight, or evict an expert this layer still wants)."""
        slot = self._victim(evict_protected, guess_for=guess_for)
        while slot is None and force:
            slot = self._victim(evict_protected, wanted_too=True)
            if slot is None:
                filling = [s for s in self.slots if s.state == FILLING
                           and self._entry[s.index].pins == 0]
                if not filling:
                    raise RuntimeError("expert cache: every slot is pinned; the plan gave "
                                       "fewer slots than one layer holds at once")
                self._ready(filling[0])   # a guess still in flight: wait, then evict it
                slot = self._victim(evict_protected)
        if slot is None:
            return None
        if slot.index in self._entry:
            self._forget(slot)
        unit = self.units[key]
        slot.move(FREE, FILLING)
        slot.unit = unit
        slot.ticket = (self._submit_guess if guess_for is not None else self._submit)(unit, slot)
        self._where[key] = slot
        self._entry[slot.index] = _Entry(key, unit, last_use=self._tick)
        self.stats.bytes_read += align(unit.stored_bytes, 4096)
        return slot

    def _forget(self, slot: Slot) -> None:
        entry = self._entry.pop(slot.index, None)
        if entry is not None:
            self._where.pop(entry.key, None)
        if slot.ticket is not None:
            try:
                slot.ticket.wait()   # never reuse a buffer a read is still writing
            except Exception:
                pass
        slot.state, slot.unit, slot.ticket = FREE, None, None

    def _victim(self, evict_protected: bool, wanted_too: bool = False,
                guess_for: tuple[int, set] | None = None) -> Slot | None:
        """A free slot, else the least valuable evictable entry (never one pinned or still
        being read; one the running layer wants only with ``wanted_too``: the latest of them).

        A guess for layer ``j`` (``guess_for = (j, guessed experts)``) may also take the place
        of one of layer ``j``'s own protected experts that it did not guess: the predictor's
        pick for ``j`` is likelier to be used there than what ``j`` used last time, and the
        other layers keep their protected experts."""
        for slot in self.slots:
            if slot.state == FILLING and slot.ticket.done():
                self._ready(slot)   # a finished read nobody waited for (a guess): evictable
            if slot.state == FREE:
                return slot
        candidates = [self._entry[s.index] for s in self.slots
                      if s.state == READY and self._entry[s.index].pins == 0]
        if wanted_too:
            wanted = [c for c in candidates if c.key in self._wanted]
            return self._where[max(wanted, key=lambda c: c.key).key] if wanted else None
        candidates = [c for c in candidates if c.key not in self._wanted]
        if self._predicted:   # a predicted layer's guessed experts stay until it runs
            kept = [c for c in candidates
                    if c.key[1] not in self._predicted.get(c.key[0], ())]
            candidates = kept or (candidates if evict_protected else [])
        if not candidates:
            return None
        protected = self._protected()
        pool = [c for c in candidates if c.key not in protected]
        if not pool and evict_protected:
            pool = candidates
        if not pool and guess_for is not None:
            layer, guessed = guess_for
            pool = [c for c in candidates if c.key[0] == layer and c.key[1] not in guessed]
        if not pool:
            return None
        return self._where[min(pool, key=self._rank).key]

    def _rank(self, entry: _Entry) -> tuple:
        return (entry.uses, entry.last_use) if self.policy == "lfu" else (entry.last_use,
                                                                          entry.uses)

    def _protected(self) -> set[tuple[int, int]]:
        if not any(self.quota.values()):
            return set()
        by_layer: dict[int, list[_Entry]] = {}
        for entry in self._entry.values():
            if not entry.predicted:
                by_layer.setdefault(entry.key[0], []).append(entry)
        keep = set()
        for layer, entries in by_layer.items():
            entries.sort(key=self._rank, reverse=True)
            keep.update(e.key for e in entries[:self.quota.get(layer, 0)])
        return keep

    def clear(self) -> None:
        """Forget every cached expert (waits for reads in flight)."""
        for slot in self.slots:
            self._forget(slot)
        self._predicted.clear()

    def drain(self) -> None:
        for slot in self.slots:
            if slot.ticket is not None:
                try:
                    slot.ticket.wait()
                except Exception:
                    pass


def check_indices(layer: int, needed: list[int], experts: int) -> None:
    """A router that names an expert the layer does not have is a model error, raised on the
    compute thread before anything is fetched."""
    bad = [e for e in needed if not 0 <= e < experts]
    if bad:
        raise ModelError(f"the router of layer {layer} selected expert {bad[0]}, but the layer "
                         f"has experts 0..{experts - 1}: the router's weights or the config's "
                         "expert count are wrong")


class ReadGate:
    """Whether guesses of a given confidence rank pay for their reads, measured while running.

    A guess is ranked by how sure the predictor is of it (0: the expert it scores highest for
    a layer). For each rank (ranks past ``buckets - 1`` share the last), the gate keeps an
    exponentially weighted share of guesses its layer then used (weight ``alpha`` on the
    newest), starting at ``min_precision``. Guesses of a rank are read (and kept from eviction)
    while that share is at least ``min_precision``; every guess is scored whether it was read or
    not (a layer's routing does not depend on what was read), so a rank that stopped paying is
    read again as soon as its guesses turn right again.

    ``min_precision`` 0.5: a rank that guesses wrong more often than right is never read (a
    wrong read costs a read and an eviction and saves nothing). Whether the reads that pass
    pay in time is the ``ReadArbiter``'s measurement."""

    def __init__(self, min_precision: float = 0.5, alpha: float = 1 / 16, buckets: int = 16):
        self.min_precision, self.alpha = min_precision, alpha
        self.share = [min_precision] * buckets
        self.scored = [0] * buckets
        self.withheld = 0   # guesses not acted on: their rank did not pay, or reads were off

    def open(self, rank: int) -> bool:
        return self.share[min(rank, len(self.share) - 1)] >= self.min_precision

    def learn(self, rank: int, used: bool) -> None:
        b = min(rank, len(self.share) - 1)
        self.share[b] += self.alpha * (float(used) - self.share[b])
        self.scored[b] += 1

    def stats(self) -> dict:
        seen = [i for i, n in enumerate(self.scored) if n]
        return {"min_precision": self.min_precision, "withheld": self.withheld,
                "open_ranks": [i for i in seen if self.open(i)],
                "precision_by_rank": {i: round(self.share[i], 3) for i in seen}}


class ReadArbiter:
    """Whether reading guesses pays at all, measured on the decode steps themselves.

    Precision alone does not say it: a right guess read early saves only the part of its read
    that overlaps compute, while every read, right or wrong, takes disk time and evicts a cached
    expert that the next tokens may need (on a model whose tokens reuse their experts, guesses
    right 68% of the time made decoding 23% slower), and a read that starts while another
    waits may use disk parallelism nobody else would have. So decode steps run in cycles of
    ``explore`` steps that alternate reads on and off in pairs (a step's reads also change what
    the next step finds cached), then ``exploit`` steps with the chosen arm: reads stay on
    unless the measured stall per step (time the compute waited for reads; each arm's running
    mean, weight ``alpha`` on the newest step) with them exceeds that without by more than
    ``margin`` (the steps' noise: what the next token routes to varies). Reads start on;
    prefill follows the choice. With reads off the predictor neither reads nor protects: the
    cache alone."""

    def __init__(self, explore: int = 8, exploit: int = 56, alpha: float = 0.3,
                 margin: float = 0.1):
        self.explore, self.exploit, self.alpha = explore, exploit, alpha
        self.margin = margin
        self.reads = True           # the choice outside exploration
        self.steps = 0
        self.mean: dict[bool, float | None] = {True: None, False: None}
        self.switches = 0

    def arm(self) -> bool:
        """Reads on or off for the coming decode step."""
        pos = self.steps % (self.explore + self.exploit)
        return (pos % 4 < 2) if pos < self.explore else self.reads

    def observe(self, stall_s: float) -> None:
        """The stall of the decode step that ran with ``arm()``."""
        arm = self.arm()
        m = self.mean[arm]
        self.mean[arm] = stall_s if m is None else m + self.alpha * (stall_s - m)
        self.steps += 1
        if self.steps % (self.explore + self.exploit) == self.explore \
                and None not in self.mean.values():
            choice = self.mean[True] <= self.mean[False] * (1 + self.margin)
            self.switches += choice != self.reads
            self.reads = choice

    def stats(self) -> dict:
        return {"reads": self.reads, "decode_steps": self.steps, "switches": self.switches,
                "stall_per_step_reads_on": self.mean[True],
                "stall_per_step_reads_off": self.mean[False]}


class Predictor:
    """Pre-gating: while layer ``i`` computes, the routers of the next ``depth`` MoE layers are
    applied to layer ``i``'s hidden state (no training: the residual stream changes little from
    one layer to the next). For each, the experts are ranked by the highest probability any
    token gives them among its ``width`` best; the guesses whose rank has paid so far (the
    ``ReadGate``: measured share of right guesses of that rank >= its minimum) are kept in the
    cache until that layer runs and read while the disk has a free thread, surest first. The
    others are only scored, so prediction stops costing reads where it guesses badly and
    starts again where it guesses well. Whether reads pay at all, right or wrong, is the
    ``ReadArbiter``'s measurement of the decode steps' stall with reads on and off; the
    runtime sets ``reading`` from it before each forward.

    Args:
        cache: where guesses are read into.
        routers: MoE layer -> its router weight ``[experts, H]`` (resident).
        depth: MoE layers ahead to predict.
        width: experts per token in the guess for each.
        gate: when guesses are acted on (default ``ReadGate()``).
    """

    def __init__(self, cache: ExpertCache, routers: dict[int, torch.Tensor], depth: int,
                 width: int, gate: ReadGate | None = None):
        self.cache, self.routers, self.depth, self.width = cache, routers, depth, width
        self.layers = sorted(routers)
        self.gate = gate or ReadGate()
        self.arbiter = ReadArbiter()
        self.reading = True      # this forward's arm (the runtime sets it per forward)
        self._pending: dict[int, list[int]] = {}   # layer -> its guesses, surest first

    def __call__(self, layer: int, hidden_states: torch.Tensor) -> None:
        self._learn(layer)
        pos = self.layers.index(layer)
        for ahead in self.layers[pos + 1:pos + 1 + self.depth]:
            weight = self.routers[ahead]
            logits = torch.nn.functional.linear(hidden_states.to(weight.dtype), weight)  # [T, E]
            probs = torch.softmax(logits.float(), dim=-1)
            top = probs.topk(min(self.width, probs.shape[-1]), dim=-1)                  # [T, w]
            best = torch.zeros(probs.shape[-1], device=probs.device)
            best.scatter_reduce_(0, top.indices.reshape(-1), top.values.reshape(-1), "amax")
            order = torch.argsort(best, descending=True).tolist()   # syncs (CPU: free)
            score = best.tolist()
            guessed = [e for e in order if score[e] > 0]
            self._pending[ahead] = guessed      # a nearer layer's guess replaces a farther one's
            acted = [e for r, e in enumerate(guessed) if self.gate.open(r)] \
                if self.reading else []
            self.gate.withheld += len(guessed) - len(acted)
            if acted:
                self.cache.prefetch(ahead, acted)

    def _learn(self, layer: int) -> None:
        """Score the guesses for ``layer`` against what it needs (known: ``begin`` ran)."""
        guessed = self._pending.pop(layer, None)
        if guessed is None or self.cache.needed[0] != layer:
            return
        used = self.cache.needed[1]
        for rank, e in enumerate(guessed):
            self.gate.learn(rank, e in used)
