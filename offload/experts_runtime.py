"""The MoE part of a Runtime: installs the experts forwards and owns the expert cache.

Two ways to move experts, as the Plan says:

* ``cache``: each experts module's forward is replaced by one that asks the router's choice
  which experts it needs, gets them from the resident set or the device expert cache (reading
  misses from disk at once, all of them in flight together), lets the predictor prefetch the
  next layers' likely experts, and recomputes transformers' experts forward on those buffers
  bit for bit (``adapters/experts_compute.py``). A batch reads each expert once per layer and
  runs all its tokens together.
* ``stream``: a layer's experts are one Unit in the pipeline's stream (layer-only streaming,
  the baseline); the same replay computes the routed experts from the slot holding them all.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .adapters.experts_compute import FORWARDS
from .errors import StoreError
from .hooks import Binding
from .prefetch.experts import ExpertCache, Predictor, check_indices
from .tiers.disk import DiskTier
from .tiers.slots import Slot


log = logging.getLogger(__name__)

HEAT_FILE = "expert_heat.json"


class ExpertsRuntime:
    """The experts of one Runtime ``rt`` (which owns the model, plan, disk and resident set)."""

    def __init__(self, rt):
        self.rt = rt
        self.moe = rt.adapter.moe_shape(rt.model.config)
        self.impl = getattr(rt.model.config, "_experts_implementation", None) or "eager"
        self.cache: ExpertCache | None = None
        self.predictor: Predictor | None = None
        self.disk: DiskTier | None = None
        self.staging = None
        self.decode_forwards = 0
        self.decode_bytes = 0
        self._bytes0 = 0
        if rt.plan.experts == "cache":
            self._build_cache(rt.plan)

    def _build_cache(self, plan) -> None:
        """The expert cache's slots (inside the budget), its disk tier and the predictor."""
        rt = self.rt
        units = {(u.index, u.expert): u for u in rt.manifest.units if u.kind == "expert"}
        resident = {(u.index, u.expert): (rt.resident[k]["gate_up"], rt.resident[k]["down"])
                    for k, u in rt.units.items() if u.kind == "expert" and k in rt.resident}
        slots = [Slot(i, rt.device_tier.alloc(plan.expert_slot_bytes))
                 for i in range(plan.expert_slots)]
        # A layer's on-demand reads go out together; guesses only take an idle thread.
        self.disk_threads = max(1, min(4, self.moe.top_k))
        self.disk = DiskTier(rt.manifest.data_path, threads=self.disk_threads)
        hooks = {}
        if rt.device.type == "cpu":
            buffers = [s.buffer.numpy() for s in slots]

            def submit(unit, slot):
                return self.disk.submit(unit, buffers[slot.index], verify=rt.first_read(unit.key))
        else:   # disk -> pinned bounce buffer -> copy stream -> slot, as for layer Units
            from .tiers.host import PinnedStaging

            self.staging = PinnedStaging(self.disk, len(slots), plan.expert_slot_bytes,
                                         rt.device)

            def submit(unit, slot):
                return self.staging.submit(unit, slot, verify=rt.first_read(unit.key))
            hooks = {"on_ready": self.staging.on_ready, "on_release": self.staging.on_release}

        def views(slot):
            v = slot.views(slot.unit)
            return v["gate_up"], v["down"]

        self.cache = ExpertCache(units, resident, slots, submit, views,
                                 protected=plan.expert_protected,
                                 layers=self.moe.layers,
                                 policy=plan.expert_policy,
                                 on_cancel=lambda u: rt.counters.checksummed.discard(u.key),
                                 **hooks)
        # Guesses only use an idle disk thread: never queued ahead of a read a layer waits on.
        self.cache.idle = lambda: self.disk.pending < self.disk_threads
        if plan.predict_depth > 0:
            routers = {i: rt.resident[f"layer.{i}.router"]["gate.weight"]
                       for i in self.moe.layers}
            self.predictor = Predictor(self.cache, routers, plan.predict_depth,
                                       plan.predict_width)

    # -- installing -------------------------------------------------------------------------
    def attach(self, undo: list) -> None:
        rt = self.rt
        for i, module in rt.adapter.expert_points(rt.model).items():
            binding = Binding(module, ["gate_up_proj", "down_proj"], rt.device)
            undo.append(binding.restore)
            binding.unbind()
            module.forward = (self._stream_forward(i, module) if rt.plan.experts == "stream"
                              else self._forward(i, module))
            undo.append(lambda m=module: m.__dict__.pop("forward", None))

    def _stream_forward(self, layer: int, module):
        """Layer-only streaming: all experts of the layer arrive as one Unit, every pass."""
        rt, key, compute, experts = self.rt, f"experts.{layer}", FORWARDS[self.impl], \
            self.moe.experts

        def forward(hidden_states, top_k_index, top_k_weights):
            needed = torch.unique(top_k_index).tolist()   # syncs: the host walks the experts
            check_indices(layer, needed, experts)
            views = rt._acquire(key)
            try:
                return compute(module, _AllExperts(views), needed, hidden_states, top_k_index,
                               top_k_weights)
            finally:
                rt._release(key)

        return forward

    def _forward(self, layer: int, module):
        cache, predictor, compute = self.cache, self.predictor, FORWARDS[self.impl]
        experts = self.moe.experts

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
                self.rt._failed = e   # only a Unit's first read is verified: refuse from now
                raise
            finally:
                cache.end()

        return forward

    # -- per forward ------------------------------------------------------------------------
    def begin_forward(self, decode: bool) -> None:
        if self.cache is not None:
            self.cache.decoding = decode
            self._bytes0 = self.cache.stats.bytes_read

    def end_forward(self, decode: bool) -> None:
        if self.cache is not None and decode:
            self.decode_forwards += 1
            self.decode_bytes += self.cache.stats.bytes_read - self._bytes0

    # -- reporting and shutdown -------------------------------------------------------------
    def stats(self, decode_tokens: int) -> dict:
        out = {"mode": self.rt.plan.experts, "experts_per_layer": self.moe.experts,
               "top_k": self.moe.top_k, "moe_layers": len(self.moe.layers)}
        if self.cache is None:
            return out
        s = self.cache.stats
        guesses = s.tp + s.fp
        out.update(
            slots=len(self.cache.slots), protected=self.rt.plan.expert_protected,
            policy=self.cache.policy,
            resident=len(self.cache.resident), accesses=s.accesses, hits=s.hits,
            hit_rate=s.hits / s.accesses if s.accesses else None,
            resident_hits=s.resident_hits, on_demand=s.on_demand, refetches=s.refetches,
            prefetched=s.prefetched, cancelled=s.cancelled, bytes_read=s.bytes_read,
            decode_bytes=self.decode_bytes,
            bytes_per_token=self.decode_bytes / decode_tokens if decode_tokens else None,
            wrong_guess_bytes=s.wrong_guess_bytes, tp=s.tp, fp=s.fp, fn=s.fn,
            precision=(s.tp / guesses if guesses else None) if self.predictor else None,
            recall=(s.tp / (s.tp + s.fn) if s.tp + s.fn else None) if self.predictor else None,
            predict_depth=self.rt.plan.predict_depth, predict_width=self.rt.plan.predict_width,
            stall_seconds=s.stall_seconds,
            disk_bytes=self.disk.bytes_read, io_seconds=self.disk.wall_seconds)
        return out

    def save_heat(self) -> None:
        """Keep the measured share of decode steps that used each expert beside the store, so
        the next plan keeps the hottest resident (written to a temporary name, renamed)."""
        if self.cache is None or self.decode_forwards == 0:
            return
        heat = {f"expert.{l}.{e}": n / self.decode_forwards
                for (l, e), n in self.cache.decode_use.items()}
        path = Path(self.rt.manifest.path) / HEAT_FILE
        tmp = path.with_name(f".{HEAT_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"decode_steps": self.decode_forwards, "heat": heat}))
            os.replace(tmp, path)
        except OSError as e:   # a read-only store only loses the hint
            log.info("could not save expert heat in %s: %s", path, e)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.drain()
        if self.disk is not None:
            self.disk.close()


class _AllExperts:
    """An expert source over a layer's experts Unit: every expert is there."""

    def __init__(self, views: dict):
        self.views = views

    def get(self, expert: int, first: bool = True):
        return self.views[f"gate_up.{expert}"], self.views[f"down.{expert}"]

    def done(self, expert: int) -> None:
        pass


def load_heat(store: Path, min_steps: int = 8) -> dict[str, float] | None:
    """A previous run's expert heat for this store, if it saw enough decode steps."""
    try:
        d = json.loads((Path(store) / HEAT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("decode_steps", 0) < min_steps:
        return None
    return {k: float(v) for k, v in d.get("heat", {}).items()}


def check_members(rt, key: str, buffer) -> None:
    """Verify each expert inside a layer's experts Unit (``stream`` mode) by its own checksum.

    ``buffer`` holds the Unit's bytes (uint8 numpy) from its first byte."""
    import zlib

    base = rt.units[key].offset
    for u in member_units(rt, key):
        start = u.offset - base
        if zlib.crc32(buffer[start:start + u.nbytes]) != u.checksum:
            raise rt.disk._corrupt(u)


def member_units(rt, key: str) -> list:
    return [u for u in rt.manifest.units if u.kind == "expert" and f"experts.{u.index}" == key]



