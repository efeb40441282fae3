"""The Runtime: owns the tiers, buffers, pipeline and hooks that run one offloaded model."""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch

from .errors import BudgetError, StoreError
from .hooks import Binding, StreamedBindHook, embedding_forward, linear_forward
from .planner.plan import Plan
from .kernels import bitmap, head
from .prefetch.pipeline import Pipeline
from .prefetch.sparse import HostDecoder, SparseStats, decode_unit, validate_unit
from .sizes import format_bytes
from .experts_runtime import check_members, member_units
from .store.format import Manifest
from .tiers.device import DeviceTier, aligned_host, release_free_heap
from .tiers.disk import DiskTier
from .tiers.slots import FREE, Slot, SlotRing, tensor_views
from .units import DTYPES, Unit, align

log = logging.getLogger(__name__)


def scratch_bytes(shape, itemsize: int) -> int:
    """Host scratch for gathering embedding rows (one row plus two O_DIRECT blocks)."""
    return align(shape.hidden * itemsize + 2 * 4096, 4096)


@dataclass
class Counters:
    forwards: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    forward_seconds: float = 0.0
    peak_bytes: int = 0
    kv_bytes: int = 0
    checksummed: set = field(default_factory=set)


class Runtime:
    """Runs ``model`` with the weights of ``manifest`` placed by ``plan``.

    Use ``close()`` (or ``offload.close(model)``) to give the model back with its hooks removed.
    """

    def __init__(self, model: torch.nn.Module, manifest: Manifest, plan: Plan, adapter,
                 device: torch.device):
        self.model, self.manifest, self.plan, self.adapter = model, manifest, plan, adapter
        self.device = device
        self.shape = adapter.shape(model.config)
        self.itemsize = DTYPES[manifest.dtype].itemsize
        self.units = {u.key: u for u in manifest.units}
        if plan.experts == "stream":   # a layer's experts streamed as one Unit
            self.units.update({u.key: u for u in adapter.stream_units(manifest.units)})
        self.counters = Counters()
        self.device_tier = DeviceTier(device)
        # More than a few concurrent reads lose bandwidth on this class of disk (measured).
        self.disk = DiskTier(manifest.data_path, threads=max(1, min(plan.slots, 4)))
        self._undo: list = []
        # Host scratch for row gathers and start-up checks; the plan's reserve counts it.
        self._scratch = aligned_host(scratch_bytes(self.shape, self.itemsize)).numpy()
        self._forward_t0 = 0.0
        self._forward_shape = (0, 0)
        self._head_rows = 0
        self._closed = False
        self._failed: StoreError | None = None
        self.experts = None
        self._paged_kv = None
        self._owned_kv = None   # the PagedKVCache kv="paged" hands to generate()
        # transformers >= 5.2x names the forward's cache argument ``cache``
        self._cache_kw = "cache" if "cache" in inspect.signature(
            type(model).forward).parameters else "past_key_values"
        try:
            if any(u.encoded for u in manifest.units):
                bitmap.prepare(device)   # any kernel build happens before the budget is taken
            # Checked on this CPU before the budget is taken too (a probe of a few MB).
            self.half_path = head.choose(DTYPES[manifest.dtype], self.shape.hidden,
                                         self.shape.vocab) if device.type == "cpu" else None
            self.slots = SlotRing(plan.slots, plan.slot_bytes, self.device_tier.alloc)
            # One landing buffer per slot for encoded Units' stored bytes (plan.landing_bytes).
            self.landings = [self.device_tier.alloc(plan.landing_bytes)
                             for _ in range(plan.slots if plan.landing_bytes else 0)]
            self.sparse = SparseStats()
            self.decoder = None
            self.staging = None
            hooks = {}
            if device.type == "cpu":   # disk reads land straight in the slots
                self._slot_np = [s.buffer.numpy() for s in self.slots.slots]
                if self.landings:
                    self.decoder = HostDecoder(self.disk, self.landings, self.sparse)
            else:                      # disk -> pinned bounce buffer -> copy stream -> slot
                from .tiers.host import PinnedStaging
                self.staging = PinnedStaging(self.disk, plan.slots, plan.slot_bytes, device,
                                             landings=self.landings, stats=self.sparse)
                self.staging.load_homed([u for u in manifest.units
                                         if plan.home.get(u.key) == "host"])
                self.counters.checksummed.update(self.staging.homed)
                hooks = {"on_ready": self.staging.on_ready, "on_release": self.staging.on_release}
            self.resident = self._load_resident()
            self.pipeline = Pipeline(plan.stream, self.units, self.slots, self._submit, **hooks)
            if hasattr(adapter, "moe_shape"):
                from .experts_runtime import ExpertsRuntime
                self.experts = ExpertsRuntime(self)
            self._attach()
        except BaseException:
            self.close()
            raise

    # -- start-up -------------------------------------------------------------------------
    def _load_resident(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        keys = [k for k, tier, _ in self.plan.homes if tier == "device"]
        total = sum(align(self.units[k].nbytes, 4096) for k in keys)
        arena = self.device_tier.alloc(total) if total else None
        host_arena = arena if self.device.type == "cpu" else None
        bounce = None
        views, off = {}, 0
        for k in keys:
            unit = self.units[k]
            n, stored = align(unit.nbytes, 4096), align(unit.stored_bytes, 4096)
            whole = unit.group != "experts"   # a layer's experts Unit: check each expert
            if host_arena is not None and unit.encoded:
                landing = self._landing(stored)
                self.disk.read(unit, landing.numpy(), verify=True)
                decode_unit(unit, landing, host_arena[off:off + n])
            elif host_arena is not None:
                self.disk.read(unit, host_arena[off:off + n].numpy(), verify=whole)
                if not whole:
                    check_members(self, k, host_arena[off:off + n].numpy())
            else:  # GPU: through one pinned bounce buffer, once, at start-up
                if bounce is None:
                    bounce = aligned_host(
                        max(align(self.units[x].stored_bytes, 4096) for x in keys), pin=True)
                self.disk.read(unit, bounce[:stored].numpy(), verify=whole)
                if not whole:
                    check_members(self, k, bounce[:n].numpy())
                if unit.encoded:
                    validate_unit(unit, bounce)
                    landing = self._landing(stored)
                    landing[:stored].copy_(bounce[:stored])
                    decode_unit(unit, landing, arena[off:off + n])
                    torch.cuda.synchronize(self.device)   # syncs (start-up): bounce is reused
                else:
                    arena[off:off + n].copy_(bounce[:n])
            self.counters.checksummed.add(k)
            views[k] = tensor_views(arena[off:off + n], unit)
            off += n
        return views

    def _landing(self, nbytes: int) -> torch.Tensor:
        """A buffer on the compute device for decoding a resident Unit at start-up: a landing
        buffer or a staging slot (free until the first fetch), else a transient one whose
        bytes count in the peak."""
        for buf in [*self.landings, *(s.buffer for s in self.slots.slots)]:
            if buf.numel() >= nbytes:
                return buf
        c = self.counters
        c.peak_bytes = max(c.peak_bytes, self.device_tier.allocated_bytes + nbytes)
        return (aligned_host(nbytes) if self.device.type == "cpu" else
                torch.empty(nbytes, dtype=torch.uint8, device=self.device))

    def first_read(self, key: str) -> bool:
        """True the first time a Unit is read in this run: that read is checksummed."""
        if key in self.counters.checksummed:
            return False
        self.counters.checksummed.add(key)
        return True

    def _submit(self, unit: Unit, slot: Slot):
        verify = self.first_read(unit.key)
        if self.staging is not None:
            return self.staging.submit(unit, slot, verify=verify)
        if unit.encoded:   # stored bytes into a landing buffer, decoded into the slot
            return self.decoder.submit(unit, slot, verify=verify)
        return self.disk.submit(unit, self._slot_np[slot.index], verify=verify)

    def _attach(self) -> None:
        model, adapter = self.model, self.adapter
        groups = self.manifest.groups()
        for key, module in adapter.bind_points(model).items():
            unit = self.units[key]
            binding = Binding(module, [t.name for t in unit.tensors], self.device)
            self._undo.append(binding.restore)
            if key in self.resident:
                binding.bind(self.resident[key])
                continue
            binding.unbind()
            hook = StreamedBindHook(key, binding, self._acquire, self._release)
            self._undo.append(module.register_forward_pre_hook(hook.pre_forward).remove)
            self._undo.append(
                module.register_forward_hook(hook.post_forward, always_call=True).remove)
        tied = self.manifest.tied
        for group, (module, op) in adapter.row_points(model).items():
            keys = groups[tied.get(group, group)]
            chunks = [(k, self.units[k].rows) for k in keys]
            # torch's linear takes another kernel for a strided input when the weight requires
            # grad (even under no_grad): the head mirrors what the model's own weight did.
            fold = bool(getattr(getattr(module, "weight", None), "requires_grad", False))
            binding = Binding(module, ["weight"], self.device)
            binding.unbind()
            self._undo.append(binding.restore)
            if op == "embedding":
                fwd = embedding_forward(chunks, self.shape.hidden, DTYPES[self.manifest.dtype],
                                        self.device, self.resident, self._gather)
                for k in keys:   # gathered rows are checked by checksumming their Unit once
                    if k not in self.resident and k not in self.counters.checksummed:
                        self.disk.verify(self.units[k], self._verify_buffer())
                        self.counters.checksummed.add(k)
            else:
                fwd = linear_forward(chunks, self.shape.vocab, self._acquire, self._release,
                                     fold=fold, half_path=self.half_path,
                                     whole=self._whole_weight(chunks))
                self._head_rows = max(stop - start for _, (start, stop) in chunks)
            module.forward = fwd
            self._undo.append(lambda m=module: m.__dict__.pop("forward", None))
        if self.experts is not None:
            self.experts.attach(self._undo)
            for key in self.plan.stream:   # layer-only streaming: check each expert once now
                if self.units[key].group == "experts":
                    for unit in member_units(self, key):
                        self.disk.verify(unit, self._verify_buffer())
                    self.counters.checksummed.add(key)
        self._undo.append(model.register_forward_pre_hook(self._begin, with_kwargs=True).remove)
        self._undo.append(model.register_forward_hook(self._end, always_call=True).remove)

    def _whole_weight(self, chunks: list[tuple[str, tuple[int, int]]]) -> torch.Tensor | None:
        """A row-chunked weight as one ``[rows, H]`` view, when every chunk is resident and the
        arena holds them back to back (store order, 4 KiB-aligned multiples of 1024 rows)."""
        if not all(k in self.resident for k, _ in chunks):
            return None
        first = self.resident[chunks[0][0]]["weight"]
        row_bytes = first.shape[1] * first.element_size()
        if any(self.resident[k]["weight"].data_ptr() != first.data_ptr() + start * row_bytes
               for k, (start, _) in chunks):
            return None
        return first.as_strided((chunks[-1][1][1], first.shape[1]), (first.shape[1], 1))

    def _verify_buffer(self):
        """The largest free host buffer for start-up checksums: a staging slot (or the GPU's
        pinned bounce buffer) before the pipeline first fills it, else the small scratch. A
        slot-sized buffer checks a Unit in a few reads instead of thousands (0.12 s vs 0.96 s
        for TinyLlama's embedding)."""
        if self.staging is not None and self.staging.bounce_np:
            return self.staging.bounce_np[0]
        if len(self.slots):
            assert self.slots[0].state == FREE, "start-up checks run before the first fetch"
            return self._slot_np[0]
        return self._scratch

    # -- the hot path -----------------------------------------------------------------------
    def _acquire(self, key: str) -> dict[str, torch.nn.Parameter]:
        views = self.resident.get(key)
        if views is not None:
            return views
        try:
            return self.pipeline.acquire(key)
        except StoreError as e:
            # A Unit failed its checksum (or the file ended): every later forward must fail
            # too, since only the first read of a Unit is verified.
            self._failed = e
            raise

    def _gather(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of a non-resident embedding chunk, read from disk: ``[len(rows), H]``."""
        unit = self.units[key]
        spec = unit.tensors[0]
        row_bytes = spec.nbytes // spec.shape[0]
        out = torch.empty(len(rows), row_bytes, dtype=torch.uint8)
        self.disk.read_rows(unit, spec.offset, row_bytes, rows.tolist(),  # syncs: ids to host
                            out.numpy(), self._scratch)
        return out.view(spec.torch_dtype).to(self.device)

    def _release(self, key: str) -> None:
        if key not in self.resident:
            self.pipeline.release(key)

    def _begin(self, module, args, kwargs):
        if self._closed:
            raise RuntimeError("this offloaded model was closed; run offload.run() again")
        if self._failed is not None:
            raise self._failed
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        batch, new = int(ids.shape[0]), int(ids.shape[1])
        key = "cache" if "cache" in kwargs else "past_key_values" if \
            "past_key_values" in kwargs else self._cache_kw
        cache = kwargs.get(key)
        swapped = False
        if self.plan.kv == "paged":
            paged = self._paged_cache(cache, batch, kwargs.get("use_cache"))
            if paged is not cache:
                kwargs[key] = cache = paged
                swapped = True
        past = int(cache.get_seq_length()) if cache is not None and hasattr(
            cache, "get_seq_length") else 0
        keep = kwargs.get("logits_to_keep", 0)
        rows = batch * (keep if isinstance(keep, int) and 0 < keep < new else new)
        # A paged KV cache holds its device part, whatever the context; others hold it all.
        kv = getattr(cache, "device_bytes", None)
        if kv is None:
            kv = self.shape.kv_bytes(batch * (past + new), self.itemsize)
        head_copy = head.extra_bytes(self.half_path, batch, self.shape.hidden, self.itemsize,
                                     self.shape.vocab, self._head_rows)
        need = (kv + self.shape.activation_bytes(batch, new, past + new, self.itemsize, rows)
                + self._scratch.nbytes + head_copy)
        if need > self.plan.reserve_bytes:
            fix = (f"feed the prompt in chunks of at most {self.plan.prefill_chunk} positions"
                   if self.plan.kv == "paged" and new > self.plan.prefill_chunk else
                   f"pass max_tokens >= {batch * (past + new)} (the budget must hold it too)")
            raise BudgetError(
                f"this forward (batch {batch}, {past + new} positions) needs "
                f"{format_bytes(need)} for KV cache and activations, but the plan reserved "
                f"{format_bytes(self.plan.reserve_bytes)} for max_tokens={self.plan.max_tokens};"
                f" {fix}", budget_bytes=self.plan.budget_bytes)
        c = self.counters
        c.peak_bytes = max(c.peak_bytes, self.device_tier.allocated_bytes + need)
        if self.pipeline.active:
            self.pipeline.begin_pass()
        self._forward_shape = (batch, new)
        if self.experts is not None:
            self.experts.begin_forward(new == 1)
        self._forward_t0 = time.perf_counter()
        return (args, kwargs) if swapped else None

    def _paged_cache(self, cache, batch: int, use_cache):
        """With ``kv="paged"``: the runtime's PagedKVCache in place of an empty (or no) cache,
        so ``generate`` pages its KV without being told; a cache already holding positions,
        or ``use_cache=False``, is left alone."""
        from .prefetch.kv import PagedKVCache

        if isinstance(cache, PagedKVCache) or use_cache is False:
            return cache
        if cache is not None and (not hasattr(cache, "get_seq_length")
                                  or cache.get_seq_length() > 0):
            return cache
        if batch > self.plan.kv_batch:
            raise BudgetError(f"a batch of {batch} sequences, but the paged KV cache was "
                              f"planned for {self.plan.kv_batch}: pass batch={batch} to run()",
                              budget_bytes=self.plan.budget_bytes)
        owned = self._owned_kv
        if owned is None or owned.shape[0] != batch:
            if owned is not None:
                owned.close()
            self._owned_kv = owned = PagedKVCache(
                self.model.config, max_context=self.plan.max_context, batch=batch,
                dtype=DTYPES[self.manifest.dtype], block_tokens=self.plan.kv_block_tokens,
                device_blocks=self.plan.kv_device_blocks, spill_dir=self.manifest.path.parent)
        else:
            owned.reset()
        return owned

    def _end(self, module, args, output):
        elapsed = time.perf_counter() - self._forward_t0
        batch, new = self._forward_shape
        c = self.counters
        c.forwards += 1
        c.forward_seconds += elapsed
        if self.experts is not None:
            self.experts.end_forward(new == 1)
        if new == 1:
            c.decode_tokens += batch
            c.decode_seconds += elapsed
        else:
            c.prefill_tokens += batch * new
            release_free_heap()   # the prefill's freed activations: back to the OS
        keys = output.keys() if hasattr(output, "keys") else ()
        cache = output["cache"] if "cache" in keys else (
            output["past_key_values"] if "past_key_values" in keys else None)
        c.kv_bytes = max(c.kv_bytes, _cache_bytes(cache))
        if getattr(cache, "device_bytes", None) is not None:
            self._paged_kv = cache   # reported by stats()

    # -- reporting and shutdown -----------------------------------------------------------
    def stats(self) -> dict:
        """Where the bytes and the milliseconds went."""
        if self._closed:
            return dict(getattr(self, "_final_stats", {}))
        c, p = self.counters, self.pipeline.stats
        io = self.disk.wall_seconds
        ex = self.experts.stats(c.decode_tokens) if self.experts is not None else None
        stall = p.stall_seconds + ((ex or {}).get("stall_seconds") or 0.0)
        io += (ex or {}).get("io_seconds") or 0.0
        out = {
            "budget_bytes": self.plan.budget_bytes,
            "peak_bytes": c.peak_bytes,
            "allocated_bytes": self.device_tier.allocated_bytes,
            "resident_bytes": self.plan.resident_bytes,
            "staging_bytes": self.plan.slots * self.plan.slot_bytes,
            "kv_bytes": c.kv_bytes,
            "host_bytes": self.staging.host_bytes if self.staging else 0,
            "bytes_read": {"disk": self.disk.bytes_read + ((ex or {}).get("disk_bytes") or 0),
                           "host_to_device": self.staging.h2d_bytes if self.staging else 0},
            "direct_io": self.disk.direct,
            "fetches": p.fetches,
            "io_seconds": io,
            "stall_seconds": stall,
            "overlap": (max(0.0, 1.0 - stall / io) if io > 0 else 1.0),
            "forwards": c.forwards,
            "forward_seconds": c.forward_seconds,
            "prefill_tokens": c.prefill_tokens,
            "decode_tokens": c.decode_tokens,
            "decode_seconds": c.decode_seconds,
            "tokens_per_s": c.decode_tokens / c.decode_seconds if c.decode_seconds else 0.0,
            "resyncs": p.resyncs,
        }
        if self.plan.stored_bytes != self.plan.weight_bytes:
            out["sparse"] = self.sparse.as_dict()
        if self._paged_kv is not None:
            out["kv"] = self._paged_kv.report()
        if ex is not None:
            out["experts"] = ex
        return out

    def close(self) -> None:
        """Detach every hook, restore the model's parameters, stop I/O, free buffers."""
        if self._closed:
            return
        if getattr(self, "pipeline", None) is not None:
            self._final_stats = self.stats()
        self._closed = True
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.drain()
        if self.experts is not None:
            self.experts.save_heat()
            self.experts.close()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()
        if getattr(self, "_owned_kv", None) is not None:
            self._owned_kv.close()   # a cache kept past close() says so when used
        self.disk.close()
        self.resident, self.slots, self.pipeline = {}, None, None


def _cache_bytes(cache) -> int:
    if getattr(cache, "device_bytes", None) is not None:   # a PagedKVCache
        return cache.device_bytes
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
