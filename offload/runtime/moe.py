"""The MoE part of a Runtime: installs the experts forwards and owns the expert cache.

Two ways to move experts, as the Plan says:

* ``cache``: each experts module's forward is replaced by one that asks the router's choice
  which experts it needs, gets them from the resident set or the device expert cache (reading
  misses at once, all of them in flight together), lets the predictor prefetch the next
  layers' likely experts, and recomputes transformers' experts forward on those buffers bit
  for bit (``adapters/experts_compute.py``). A batch reads each expert once per layer and runs
  all its tokens together.
* ``stream``: a layer's experts are one Unit in the pipeline's stream (layer-only streaming,
  the baseline); the same replay computes the routed experts from the slot holding them all.

It works through ``Services``: the runtime's collaborators, named, not the runtime itself.
Every name of a model's pieces comes from the adapter.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..adapters.experts_compute import FORWARDS
from ..errors import StoreError
from ..hooks import replace_forward
from ..kernels import decode
from ..prefetch.experts import ExpertCache, Predictor, check_indices
from ..store.heat import save_heat
from ..tiers.disk import DiskTier
from ..tiers.slots import Slot, tensor_views
from ..tiers.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """What the experts of one runtime use of it.

    Attributes:
        store: the packed store's directory (expert heat is kept there).
        data_path: the store's data file: the experts read it through a Disk tier of their
            own (their bytes and I/O time counted apart), on the runtime's transport.
        units: key -> Unit, the layer-only streaming Units included.
        manifest_units: the store's Units.
        resident: resident Units' tensor views by key.
        alloc: allocates compute-device bytes inside the budget.
        first_read / forget_read: whether a Unit's read is its first (checksummed), and
            "that read never happened" (a cancelled guess).
        acquire / release: a streamed Unit's views from the pipeline, and giving them back.
        fail: remember a store error: every later forward is refused.
    """

    adapter: object
    store: Path
    data_path: Path
    model: torch.nn.Module
    plan: object
    units: dict
    manifest_units: tuple
    resident: dict
    device: torch.device
    transport: Transport
    alloc: Callable[[int], torch.Tensor]
    first_read: Callable[[str], bool]
    forget_read: Callable[[str], None]
    acquire: Callable[[str], dict]
    release: Callable[[str], None]
    fail: Callable[[StoreError], None]


class ExpertsRuntime:
    """The experts of one runtime."""

    def __init__(self, services: Services):
        self.s = services
        adapter, config = services.adapter, services.model.config
        self.moe = adapter.moe_shape(config)
        self.impl = getattr(config, "_experts_implementation", None) or "eager"
        self.mode = services.plan.experts.mode
        self.cache: ExpertCache | None = None
        self.predictor: Predictor | None = None
        self.disk: DiskTier | None = None
        self.staging = None
        self.decode_forwards = 0
        self.decode_sequences = 0   # summed over decode forwards: their mean batch
        self.decode_bytes = 0
        self.decode_seconds = 0.0   # decoding encoded experts out of the cache's slots
        self.decoded_bytes = 0
        self.scratch = None
        self._scratch_views: dict = {}
        self._bytes0 = 0
        self._stall0 = 0.0
        if self.mode == "cache":
            self._build_cache()

    def _build_cache(self) -> None:
        """The expert cache's slots (inside the budget), its movers and the predictor."""
        s, plan = self.s, self.s.plan.experts
        weights = s.adapter.expert_weights
        units = {(u.index, u.expert): u for u in s.manifest_units if u.kind == "expert"}
        resident = {(u.index, u.expert): weights(s.resident[k]) for k, u in s.units.items()
                    if u.kind == "expert" and k in s.resident}
        slots = [Slot(i, s.alloc(plan.slot_bytes)) for i in range(plan.slots)]
        # Encoded experts are cached as stored (slots of their stored size) and decoded into
        # this one dense expert at each use, the part the compute reads only.
        self.scratch = s.alloc(plan.scratch_bytes) if plan.scratch_bytes else None
        self.disk = DiskTier(s.data_path)
        hooks = {}
        if s.device.type != "cpu":   # disk -> pinned bounce buffer -> copy stream -> slot
            from ..tiers.host import PinnedStaging

            self.staging = PinnedStaging(self.disk, len(slots), plan.slot_bytes, s.device,
                                         as_stored=True)
            hooks = {"on_ready": self.staging.on_ready, "on_release": self.staging.on_release}
        # A layer waits for the experts it misses: they go ahead of the window's reads; a
        # guess goes behind everything.
        submit = self._submitter(slots, "now")
        self.cache = ExpertCache(
            units, resident, slots, submit, self._slot_weights,
            submit_guess=self._submitter(slots, "guess"),
            protected=plan.protected, layers=self.moe.layers, policy=plan.policy,
            wait=lambda t: s.transport.wait(t, "experts"), idle=s.transport.idle,
            on_cancel=lambda u: s.forget_read(u.key), **hooks)
        if plan.predict_depth > 0:
            routers = {i: s.adapter.router_weight(s.resident, i) for i in self.moe.layers}
            self.predictor = Predictor(self.cache, routers, plan.predict_depth,
                                       plan.predict_width)

    def _slot_weights(self, slot: Slot, use: str):
        """``(gate_up, down)`` of the expert in ``slot``: views of the slot, or for an encoded
        expert the part ``use`` names decoded into the scratch (the other part ``None``)."""
        unit, weights = slot.unit, self.s.adapter.expert_weights
        if not unit.encoded:
            return weights(slot.views(unit))
        if self.scratch is None:
            raise StoreError(f"expert {unit.key} is stored encoded but the plan gave the expert "
                             "cache no decode buffer: plan the run again", unit=unit.key)
        pair = self.s.adapter.expert_params_of
        names = pair if use == "both" else (pair[0] if use == "gate_up" else pair[1],)
        t0 = time.perf_counter()
        decode.decode_unit(unit, slot.buffer, self.scratch, names=names)
        self.decode_seconds += time.perf_counter() - t0   # GPU: the launch only (asynchronous)
        self.decoded_bytes += sum(t.nbytes for t in unit.tensors if t.name in names)
        views = self._scratch_views.get(unit.layout)
        if views is None:
            views = self._scratch_views[unit.layout] = tensor_views(self.scratch, unit)
        gate_up, down = weights(views)
        return (gate_up if pair[0] in names else None, down if pair[1] in names else None)

    def _submitter(self, slots: list[Slot], priority: str):
        """Reads of expert Units into cache slots, at ``priority``, on the transport."""
        s, staging = self.s, self.staging
        buffers = [slot.buffer.numpy() for slot in slots] if staging is None else []

        def submit(unit, slot):
            verify = s.first_read(unit.key)
            if staging is not None:
                return s.transport.submit(staging.move, unit, slot, verify, key=unit.key,
                                          nbytes=unit.stored_bytes, consumer="experts",
                                          priority=priority)
            return s.transport.read(self.disk, unit, buffers[slot.index], verify=verify,
                                    consumer="experts", priority=priority)
        return submit

    # -- installing -------------------------------------------------------------------------
    def attach(self) -> list:
        """Replace every experts module's forward; returns the undo steps."""
        s, undo = self.s, []
        for i, module in s.adapter.expert_points(s.model).items():
            forward = self._stream_forward(i, module) if self.mode == "stream" else \
                self._forward(i, module)
            undo += replace_forward(module, forward, list(s.adapter.expert_params), s.device)
        return undo

    def _stream_forward(self, layer: int, module):
        """Layer-only streaming: all experts of the layer arrive as one Unit, every pass."""
        s, compute, experts = self.s, FORWARDS[self.impl], self.moe.experts
        key = s.adapter.experts_unit(layer)

        def forward(hidden_states, top_k_index, top_k_weights):
            needed = torch.unique(top_k_index).tolist()   # syncs: the host walks the experts
            check_indices(layer, needed, experts)
            views = s.acquire(key)
            try:
                return compute(module, _AllExperts(views, s.adapter), needed, hidden_states,
                               top_k_index, top_k_weights)
            finally:
                s.release(key)

        return forward

    def _forward(self, layer: int, module):
        cache, predictor, compute = self.cache, self.predictor, FORWARDS[self.impl]
        experts, fail = self.moe.experts, self.s.fail

        def forward(hidden_states, top_k_index, top_k_weights):
            needed = torch.unique(top_k_index).tolist()   # syncs: the host decides the reads
            check_indices(layer, needed, experts)
            try:
                cache.begin(layer, needed)
                if predictor is not None:
                    predictor(layer, hidden_states)
                return compute(module, cache, needed, hidden_states, top_k_index,
                               top_k_weights)
            except StoreError as e:
                fail(e)   # only a Unit's first read is verified: refuse from now on
                raise
            finally:
                cache.end()

        return forward

    # -- per forward ------------------------------------------------------------------------
    def begin_forward(self, decode: bool) -> None:
        if self.cache is not None:
            self.cache.decoding = decode
            self._bytes0 = self.cache.stats.bytes_read
        if self.predictor is not None:
            arbiter = self.predictor.arbiter
            self.predictor.reading = arbiter.arm() if decode else arbiter.reads
            self._stall0 = self._stall()

    def end_forward(self, decode: bool, batch: int = 1) -> None:
        if self.cache is not None and decode:
            self.decode_forwards += 1
            self.decode_sequences += batch
            self.decode_bytes += self.cache.stats.bytes_read - self._bytes0
            if self.predictor is not None:
                self.predictor.arbiter.observe(self._stall() - self._stall0)

    def _stall(self) -> float:
        return sum(self.s.transport.stall.values())

    # -- reporting and shutdown -------------------------------------------------------------
    def stats(self, decode_tokens: int) -> dict:
        plan = self.s.plan.experts
        out = {"mode": self.mode, "experts_per_layer": self.moe.experts,
               "top_k": self.moe.top_k, "moe_layers": len(self.moe.layers)}
        if self.cache is None:
            return out
        st, c = self.cache.stats, self.cache
        guesses = st.tp + st.fp
        out.update(
            slots=len(c.slots), protected=plan.protected, policy=c.policy,
            resident=len(c.resident), accesses=st.accesses, hits=st.hits,
            hit_rate=st.hits / st.accesses if st.accesses else None,
            resident_hits=st.resident_hits, on_demand=st.on_demand, refetches=st.refetches,
            prefetched=st.prefetched, cancelled=st.cancelled, bytes_read=st.bytes_read,
            decode_bytes=self.decode_bytes,
            bytes_per_token=self.decode_bytes / decode_tokens if decode_tokens else None,
            wrong_guess_bytes=st.wrong_guess_bytes, tp=st.tp, fp=st.fp, fn=st.fn,
            precision=(st.tp / guesses if guesses else None) if self.predictor else None,
            recall=(st.tp / (st.tp + st.fn) if st.tp + st.fn else None) if self.predictor
            else None,
            predict_depth=plan.predict_depth, predict_width=plan.predict_width,
            prediction_gate=self.predictor.gate.stats() if self.predictor else None,
            prediction_arbiter=self.predictor.arbiter.stats() if self.predictor else None,
            stall_seconds=self.s.transport.stall["experts"],
            expert_decode_seconds=self.decode_seconds, expert_decoded_bytes=self.decoded_bytes,
            disk_bytes=self.disk.bytes_read, io_seconds=self.disk.wall_seconds)
        return out

    def save_heat(self) -> None:
        """Keep the measured share of decode steps that used each expert beside the store, so
        the next plan keeps the hottest resident."""
        if self.cache is None or self.decode_forwards == 0:
            return
        heat = {self.cache.units[key].key: n / self.decode_forwards
                for key, n in self.cache.decode_use.items()}
        trace = {layer: [list(step) for step in steps]
                 for layer, steps in self.cache.decode_trace.items()}
        save_heat(self.s.store, self.decode_forwards, heat,
                  batch=self.decode_sequences / self.decode_forwards, trace=trace)

    def close(self) -> None:
        self.save_heat()
        if self.cache is not None:
            self.cache.drain()
        if self.disk is not None:
            self.disk.close()


class _AllExperts:
    """An expert source over a layer's experts Unit: every expert is there."""

    def __init__(self, views: dict, adapter):
        self.views, self.adapter = views, adapter

    def get(self, expert: int, first: bool = True, use: str = "both"):
        return self.adapter.stream_expert_weights(self.views, expert)

    def done(self, expert: int) -> None:
        pass
