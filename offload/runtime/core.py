"""The Runtime: owns the transport, tiers, buffers, pipeline and hooks that run one offloaded
model, and reports where the bytes and the milliseconds went."""
from __future__ import annotations

import logging
import shutil
import time

import torch

from ..adapters import kvbuffer
from ..adapters.base import cache_keyword
from ..errors import BudgetError, HardwareError, StoreError
from ..hooks import (SIBLINGS, attach_unit, detach, embedding_forward, fused_group,
                     linear_forward, replace_forward, wrap_forward, wrap_generate, wrap_model)
from ..kernels import decode, gguf, head, layer, qmatmul
from ..kernels.layer import fused_linear
from ..planner.compute import fused_count, prefill_scratch_bytes
from ..planner.plan import Plan
from ..planner.kv import kv_geometry
from ..planner.reserve import batched_reserve, forward_bytes, largest_chunk, scratch_bytes
from ..prefetch.pipeline import Pipeline
from ..sizes import format_bytes
from ..store import lock
from ..store.format import Manifest
from ..memory import PeakMeter, release_free_heap
from ..tiers.device import DeviceTier, aligned_host
from ..tiers.disk import DiskTier
from ..tiers.slots import FREE, Slot, SlotRing
from ..tiers.transport import MAX_LAYER_READS, Transport
from ..units import DTYPES, Unit
from .startup import load_held, load_resident
from .stats import Counters, SparseStats, cache_bytes, report

log = logging.getLogger(__name__)


class Runtime:
    """Runs ``model`` with the weights of ``manifest`` placed by ``plan``.

    Use ``close()`` (or ``offload.close(model)``) to give the model back with its hooks removed.
    """

    def __init__(self, model: torch.nn.Module, manifest: Manifest, plan: Plan, adapter,
                 device: torch.device, shape=None, meter: PeakMeter | None = None):
        if meter is None:
            meter = PeakMeter(device)
            meter.start()
        self.meter = meter   # the measured peak, from before the budget is taken
        self.model, self.manifest, self.plan, self.adapter = model, manifest, plan, adapter
        self.device = device
        self.shape = shape if shape is not None else adapter.shape(model.config)
        self.itemsize = DTYPES[manifest.dtype].itemsize
        self.units = {u.key: u for u in manifest.units}
        if plan.experts is not None and plan.experts.mode == "stream":
            self.units.update({u.key: u for u in adapter.stream_units(manifest.units)})
        self.counters = Counters()
        self.device_tier = DeviceTier(device)
        self.disk = DiskTier(manifest.data_path)
        # Held while this runtime reads the offload dir: no other process profiles it meanwhile.
        self._disk_users = lock.DiskUsers(manifest.path.parent)
        self.transport = Transport(_io_threads(plan, adapter, model.config))
        self._undo: list = []
        # Host scratch for row gathers and start-up checks; the plan's reserve counts it.
        self._scratch = aligned_host(scratch_bytes(self.shape, self.itemsize)).numpy()
        self._forward_t0 = 0.0
        self._forward_shape = (0, 0)
        self._head_rows = 0
        self._closed = False
        self._failed: StoreError | None = None
        self.experts = None
        self.staging = None
        self.pipeline = None
        self._paged_kv = None
        self._owned_kv = None   # the PagedKVCache kv="paged" hands to generate()
        self._chunk_next = None   # a direct forward _begin found too large: chunked (_forward)
        self._skip_end = False    # the chunked call's own end: its chunks were counted
        self._cache_kw = cache_keyword(model)
        self._pool = None
        self._threads = None   # torch's thread count while held at one (_hold_torch_threads)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @property
    def cache_argument(self) -> str:
        """The name this transformers gives the cache in ``forward`` and ``generate``
        (``cache`` from 5.2x, ``past_key_values`` before)."""
        return self._cache_kw

    # -- start-up -------------------------------------------------------------------------
    def _start(self) -> None:
        """Builds and probes first (before the budget is taken), then allocates the slots and
        landing buffers, loads the resident Units, and attaches."""
        plan, device = self.plan, self.device
        decode.prepare(self.manifest.units, device)   # a first kernel build: before the budget
        # Checked on this CPU before the budget is taken too (a probe of a few MB).
        self.half_paths = head.choose(DTYPES[self.manifest.dtype], self.shape.hidden) \
            if device.type == "cpu" else None
        release_free_heap()   # the probes' temporaries: back to the OS before the budget
        self.meter.rebase()
        self._pool, self._fused_scratch = self._fused_kernel()
        self.slots = SlotRing(plan.slots, plan.slot_bytes, self.device_tier.alloc)
        # One landing buffer per slot for encoded Units' stored bytes (plan.landing_bytes).
        self.landings = [self.device_tier.alloc(plan.landing_bytes)
                         for _ in range(plan.slots if plan.landing_bytes else 0)]
        self.sparse = SparseStats()
        hooks = {}
        if device.type == "cpu":   # disk reads land straight in the slots
            self._slot_np = [s.buffer.numpy() for s in self.slots.slots]
            self._landing_np = [b.numpy() for b in self.landings]
        else:                      # disk -> pinned bounce buffer -> copy stream -> slot
            from ..tiers.host import PinnedStaging

            self.staging = PinnedStaging(self.disk, plan.slots, plan.slot_bytes, device,
                                         landings=self.landings, stats=self.sparse)
            self.staging.load_homed([u for u in self.manifest.units
                                     if plan.home.get(u.key) == "host"])
            self.counters.checksummed.update(self.staging.homed)
            hooks = {"on_ready": self.staging.on_ready, "on_release": self.staging.on_release}
        held = set(plan.held)
        keys = [k for k, tier, _ in plan.homes if tier == "device" and k not in held]
        self.resident = load_resident(keys, self.units, self.disk, device,
                                      self.device_tier.alloc, self._landing, self._members)
        self.held = load_held([k for k, _, _ in plan.homes if k in held], self.units,
                              self.disk, self.device_tier.alloc, self._members)
        self.counters.checksummed.update(keys, held)
        self.pipeline = Pipeline(plan.stream, self.units, self.slots, self._submit,
                                 lambda t: self.transport.wait(t, "layers"), **hooks)
        if hasattr(self.adapter, "moe_shape"):
            from .moe import ExpertsRuntime

            self.experts = ExpertsRuntime(self._moe_services())
        self._attach()

    def _fused_kernel(self):
        """``compute="fast"``: the fused kernel's thread pool (every core, at most torch's
        threads) and its prefill scratch, held through forwards of more than
        ``qmatmul.INT_ROWS`` rows only (``_begin``; the reserve counts it for them)."""
        if not fused_count(self.units.values()):
            return None, None
        threads = min(torch.get_num_threads(), qmatmul.threads_for())
        return (qmatmul.Pool(threads),
                qmatmul.Scratch(prefill_scratch_bytes(self.units.values())))

    def _fused_matmul(self, qtype: str) -> qmatmul.Fused:
        return qmatmul.Fused(qtype, self._pool, self._fused_scratch)

    def _members(self, unit: Unit) -> list[Unit]:
        return self.adapter.members(self.manifest.units, unit)

    def _landing(self, nbytes: int) -> torch.Tensor:
        """A buffer on the compute device for decoding a resident Unit at start-up: a landing
        buffer or a staging slot (free until the first fetch), else a transient one whose
        bytes count in the peak."""
        for buf in [*self.landings, *(s.buffer for s in self.slots.slots)]:
            if buf.numel() >= nbytes:
                return buf
        c = self.counters
        c.accounted_peak_bytes = max(c.accounted_peak_bytes,
                                     self.device_tier.allocated_bytes + nbytes)
        return (aligned_host(nbytes) if self.device.type == "cpu" else
                torch.empty(nbytes, dtype=torch.uint8, device=self.device))

    def _moe_services(self):
        from .moe import Services

        return Services(adapter=self.adapter, store=self.manifest.path,
                        data_path=self.manifest.data_path, model=self.model, plan=self.plan,
                        units=self.units, manifest_units=self.manifest.units,
                        resident=self.resident, device=self.device, transport=self.transport,
                        alloc=self.device_tier.alloc, first_read=self.first_read,
                        forget_read=self.counters.checksummed.discard,
                        acquire=self._acquire, release=self._release, fail=self._fail)

    def first_read(self, key: str) -> bool:
        """True the first time a Unit is read in this run: that read is checksummed."""
        if key in self.counters.checksummed:
            return False
        self.counters.checksummed.add(key)
        return True

    def _submit(self, unit: Unit, slot: Slot):
        """Start moving a streamed Unit into its slot (the pipeline calls this)."""
        t = self.transport
        stored = self.held.get(unit.key)
        if stored is not None:   # held as stored: decoded from memory into the slot
            return t.decode(self._decode, unit, stored, slot.buffer, key=unit.key,
                            nbytes=unit.stored_bytes)
        verify = self.first_read(unit.key)
        if self.staging is not None:
            return t.submit(self.staging.move, unit, slot, verify, key=unit.key,
                            nbytes=unit.stored_bytes, consumer="layers")
        if not unit.encoded:
            return t.read(self.disk, unit, self._slot_np[slot.index], verify=verify,
                          consumer="layers")
        # Stored bytes into the slot's landing buffer (landing i belongs to slot i: free again
        # once slot i's previous decode finished, before that slot was consumed and refilled),
        # then decoded into the slot on the decode thread.
        read = t.read(self.disk, unit, self._landing_np[slot.index], verify=verify,
                      consumer="layers")
        return t.then(read, self._decode, unit, self.landings[slot.index], slot.buffer)

    def _decode(self, unit: Unit, landing: torch.Tensor, dest: torch.Tensor) -> None:
        t0 = time.perf_counter()
        decode.decode_unit(unit, landing, dest)
        self.sparse.add(unit, time.perf_counter() - t0)

    def _attach(self) -> None:
        model, adapter, undo = self.model, self.adapter, self._undo
        for key, module in adapter.bind_points(model).items():
            undo += attach_unit(module, [t.name for t in self.units[key].tensors], self.device,
                                resident=self.resident.get(key), key=key,
                                acquire=self._acquire, release=self._release)
        undo += self._attach_fused(adapter.bind_points(model))
        groups, tied = self.manifest.groups(), self.manifest.tied
        for group, (module, op) in adapter.row_points(model).items():
            keys = groups[tied.get(group, group)]
            chunks = [(k, self.units[k].rows) for k in keys]
            forward = self._embedding(chunks) if op == "embedding" else \
                self._head(chunks, module)
            undo += replace_forward(module, forward, ["weight"], self.device)
        if self.experts is not None:
            undo += self.experts.attach()
            self._check_aggregates()
        undo += wrap_model(model, self._begin, self._end)
        undo += wrap_forward(model, self._forward)
        if hasattr(model, "generate"):
            undo += wrap_generate(model, self._generate)

    def _attach_fused(self, points: dict[str, torch.nn.Module]) -> list:
        """``compute="fast"``: each linear kept in GGUF blocks runs the fused kernel; siblings
        (``hooks.SIBLINGS``: q, k and v; gate and up) of one type and width run as one call
        (``hooks.fused_group``) where their weights are all there when the first is called:
        in one Unit, or resident."""
        names = {id(m): n for n, m in self.model.named_modules()}
        fused = {}   # linear's path in the model -> (module, type, rows, cols, Unit key)
        for key, module in points.items():
            for t in self.units[key].tensors:
                qtype = qmatmul.type_of(t.encoding)
                if qtype is not None:
                    sub = t.name.rpartition(".")[0]
                    path = ".".join(p for p in (names.get(id(module), ""), sub) if p)
                    fused[path] = (module.get_submodule(sub), qtype, t.shape[0],
                                   qmatmul.cols_of(qtype, t.shape[1]), key)
        undo, grouped = [], set()
        for path, (_, qtype, _, cols, _) in fused.items():
            parent, _, name = path.rpartition(".")
            for sibling in (s for s in SIBLINGS if s[0] == name):
                paths = [f"{parent}.{n}" if parent else n for n in sibling]
                members = [p for p in paths if p in fused and fused[p][1] == qtype
                           and fused[p][3] == cols]
                keys = {fused[p][4] for p in members}
                if len(members) > 1 and (len(keys) == 1 or keys <= self.resident.keys()):
                    matmul = self._fused_matmul(qtype)
                    group = qmatmul.FusedGroup(matmul, [fused[p][2] for p in members], cols)
                    undo += fused_group([fused[p][0] for p in members], group, matmul)
                    grouped.update(members)
        for path, (module, qtype, *_) in fused.items():
            if path not in grouped:
                undo += fused_linear(module, self._fused_matmul(qtype))
        return undo + self._attach_layers(fused)

    def _attach_layers(self, fused: dict) -> list:
        """``compute="fast"``: each Llama decoder layer whose seven linears are all fused runs
        a decode step in two kernel calls around the attention (one, the attention in it, over
        the runtime's own cache), its streamed parts bound first (up to the slots), or part by
        part; over the runtime's own cache, a Llama model whose layers all have that road runs
        a decode step's resident layers in one call (``kernels.layer.attach_model``)."""
        types = {id(module): qtype for module, qtype, *_ in fused.values()}
        undo, roads = [], {}
        for module in self.model.modules():
            if layer.eligible(module) and all(id(m) in types for m in layer.linears(module)):
                undo += layer.attach(module, layer.DecoderKernels(module, self._pool, types),
                                     hold=self.plan.slots, roads=roads)
        self.fast_layers = len(undo)
        for module in self.model.modules():
            undo += layer.attach_model(module, roads)
        return undo

    def _embedding(self, chunks):
        """The embedding's forward: resident chunks indexed in memory, the others' rows
        gathered from disk. Gathered rows are checked by checksumming their Unit once now."""
        for k, _ in chunks:
            if k not in self.resident and k not in self.counters.checksummed:
                self.disk.verify(self.units[k], self._verify_buffer())
                self.counters.checksummed.add(k)
        return embedding_forward(chunks, self.shape.hidden, DTYPES[self.manifest.dtype],
                                 self.device, self.resident, self._gather,
                                 decode_rows=self._rows_decoder(chunks))

    def _rows_decoder(self, chunks):
        """For a row-chunked weight kept in GGUF blocks: rows of blocks -> float32 rows."""
        qtype = qmatmul.type_of(self.units[chunks[0][0]].tensors[0].encoding)
        if qtype is None:
            return None

        def decode_rows(blocks: torch.Tensor) -> torch.Tensor:   # [n, row_bytes] -> [n, H]
            cols = qmatmul.cols_of(qtype, blocks.shape[1])
            out = torch.empty(blocks.shape[0], cols, dtype=torch.float32)
            gguf.dequantize(blocks.contiguous().view(-1), out.view(-1).view(torch.uint8), qtype,
                            out.numel())
            return out

        return decode_rows

    def _head(self, chunks, module):
        # torch's linear takes another kernel for a strided input when the weight requires
        # grad (even under no_grad): the head mirrors what the model's own weight did.
        fold = bool(getattr(getattr(module, "weight", None), "requires_grad", False))
        self._head_rows = max(stop - start for _, (start, stop) in chunks)
        qtype = qmatmul.type_of(self.units[chunks[0][0]].tensors[0].encoding)
        return linear_forward(chunks, self.shape.vocab, self._acquire, self._release,
                              fold=fold, half_paths=self.half_paths,
                              whole=self._whole_weight(chunks),
                              matmul=self._fused_matmul(qtype) if qtype else None)

    def _check_aggregates(self) -> None:
        """Layer-only streaming: the pipeline reads a layer's experts as one Unit and never
        checks it whole, so each expert inside it is checked once now."""
        for key in self.plan.stream:
            members = self._members(self.units[key])
            if members and key not in self.counters.checksummed:
                for unit in members:
                    self.disk.verify(unit, self._verify_buffer())
                self.counters.checksummed.add(key)

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
            self._fail(e)
            raise

    def _fail(self, error: StoreError) -> None:
        self._failed = error

    def _gather(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of a non-resident embedding chunk, read from disk: ``[len(rows), H]``. A
        GGUF-quantized one is read as its rows of blocks and dequantized (a few KB)."""
        unit = self.units[key]
        spec = unit.tensors[0]
        at, stored = spec.source
        row_bytes = stored // spec.shape[0]
        raw = torch.empty(len(rows), row_bytes, dtype=torch.uint8)
        self.disk.read_rows(unit, at, row_bytes, rows.tolist(),  # syncs: ids to host
                            raw.numpy(), self._scratch)
        qtype = gguf.type_of(spec.encoding) or qmatmul.type_of(spec.encoding)
        if qtype is None:
            return raw.view(spec.torch_dtype).to(self.device)
        out = torch.empty(len(rows), qmatmul.cols_of(qtype, row_bytes), dtype=torch.float32)
        gguf.dequantize(raw.view(-1), out.view(-1).view(torch.uint8), qtype, out.numel())
        return out.to(self.device)

    def _release(self, key: str) -> None:
        if key not in self.resident:
            self.pipeline.release(key)

    def _begin(self, module, args, kwargs):
        """Before each forward: refuse a closed or failed runtime, hand a paged cache to
        ``generate``, check the forward against the reserve, start the pass."""
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
        cache, swapped = kwargs.get(key), False
        if self.plan.kv.paged:
            paged = self._paged_cache(cache, batch, kwargs.get("use_cache"))
            if paged is not cache:
                kwargs[key] = cache = paged
                swapped = True
        elif self.plan.kv.buffered and cache is None and (
                kwargs.get("use_cache") if kwargs.get("use_cache") is not None
                else getattr(self.model.config, "use_cache", True)):
            # the cache the model would make for itself, written in place: room for the
            # positions the reserve holds per sequence
            kwargs[key] = cache = kvbuffer.buffered_cache(
                self.model.config, max(self.plan.max_tokens // batch, new))
            swapped = True
        try:
            self._check_budget(batch, new, cache, kwargs.get("logits_to_keep", 0))
        except BudgetError:
            chunk = (None if self.plan.kv.mode == "batched"   # the manager's own batches
                     else self._chunkable(args, kwargs, batch, new, cache))
            if chunk is None:
                raise
            self._chunk_next = chunk   # _forward runs it as chunks that each fit
            return (args, kwargs) if swapped else None
        if self.pipeline.active:
            self.pipeline.begin_pass()
        self._forward_shape = (batch, new)
        if self.experts is not None:
            self.experts.begin_forward(new == 1)
        self._forward_t0 = time.perf_counter()
        if self._pool is not None:
            # A decode step's matmuls run on the fused kernel's pool; torch's own threads,
            # left on, spin between its small ops on the cores the pool and the I/O threads
            # need. One torch thread for every such step, whatever the pool's size, so the
            # logits do not depend on the budget (torch's kernels round by their threads); and
            # one between such steps too, given back only by a large forward or close(): an
            # OpenMP worker woken by the caller's own op on the logits (generate()'s argmax
            # over a batch of 8 rows) spins for milliseconds after it, on a core the next
            # step's kernel needs.
            small = batch * new <= qmatmul.INT_ROWS
            self._hold_torch_threads(small)
            # the prefill road's scratch, held only through forwards the reserve counts it
            # for (kept from one such forward to the next: a prefill's chunks)
            if small:
                self._fused_scratch.release()
            else:
                self._fused_scratch.hold()
        return (args, kwargs) if swapped else None

    def _forward_need(self, batch: int, new: int, total: int, logits_rows: int, kv: int,
                      in_place: bool = False) -> int:
        """``forward_bytes`` of a forward on this runtime (its head path's copy and the
        kernels' workspace included); ``in_place``: its cache writes into buffers it holds
        (a paged cache: ``_cache_form``)."""
        return forward_bytes(self.shape, self.itemsize, batch=batch, new=new, total=total,
                             logits_rows=logits_rows, kv_bytes=kv,
                             head_copy=self._head_copy(batch), in_place=in_place,
                             fused_scratch=self._scratch_nbytes())

    def _scratch_nbytes(self) -> int:
        """The fused kernel's prefill scratch (0 without fused weights)."""
        return self._fused_scratch.nbytes if self._fused_scratch is not None else 0

    def _head_copy(self, rows: int) -> int:
        """What the head's path copies for ``rows`` rows, and the runtime's own objects."""
        return head.extra_bytes(self.half_paths, rows, self.shape.hidden, self.itemsize,
                                self._head_rows) + self.plan.kv.overhead_bytes

    def _chunked_need(self, batch: int, chunk: int, past: int, total: int, rows: int,
                      kv: int, in_place: bool) -> int:
        """The most any forward of ``chunk`` positions needs on the way from ``past`` to
        ``total`` positions. Not simply the last one's: a DynamicCache's layer below the C
        heap's mmap threshold leaves every layer's old copy as a hole (``activation_bytes``),
        so the forward just before a layer crosses the threshold can need more than later,
        larger ones. ``kv`` is the cache at ``total`` (a DynamicCache's is smaller before;
        ``in_place``: a paged cache's, the same throughout)."""
        ends = {total}
        if not in_place:
            below = self.shape.positions_below_mmap(batch, self.itemsize)
            if past + chunk <= below < total:
                ends.add(past + (below - past) // chunk * chunk)
        return max(self._forward_need(batch, min(chunk, end - past), end, rows,
                                      kv if in_place or end == total else
                                      self.shape.kv_bytes(batch * end, self.itemsize),
                                      in_place)
                   for end in ends)

    def _cache_form(self, cache, batch: int, total: int) -> tuple[int, bool]:
        """The KV bytes a forward reaching ``total`` positions runs with, and whether its
        cache writes them in place: a paged cache holds its device part, whatever the
        context; any other the whole context (a buffered one its buffers, where they are
        larger), checked as if grown by ``torch.cat`` (``adapters/kvbuffer.py`` says why)."""
        kv = getattr(cache, "device_bytes", None)
        if kv is not None:
            return kv, True
        positions = max(total, kvbuffer.capacity(cache) or 0)
        return self.shape.kv_bytes(batch * positions, self.itemsize), False

    def _check_budget(self, batch: int, new: int, cache, keep) -> None:
        """Refuse a forward whose KV, activations and head copy exceed the plan's reserve
        (the same ``forward_bytes`` the planner sized it with)."""
        if self.plan.kv.mode == "batched":
            return self._check_batched(batch * new, keep)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(
            cache, "get_seq_length") else 0
        rows = batch * (keep if isinstance(keep, int) and 0 < keep < new else new)
        kv, in_place = self._cache_form(cache, batch, past + new)
        need = self._forward_need(batch, new, past + new, rows, kv, in_place)
        plan = self.plan
        if need > plan.reserve_bytes:
            fits = largest_chunk(lambda c: self._forward_need(
                batch, c, past + new, batch * min(c, rows // batch), kv, in_place), new,
                plan.reserve_bytes)
            fix = (f"call generate(), which prefills in chunks that fit, or feed at most "
                   f"{fits} positions per forward" if fits else
                   f"pass max_tokens >= {batch * (past + new)} (the budget must hold it too)")
            if fits and rows > batch:
                fix += (" (with logits_to_keep=1, or logits='all' to run() for a reserve "
                        "that holds every position's logits)")
            raise BudgetError(
                f"this forward (batch {batch}, {past + new} positions) needs "
                f"{format_bytes(need)} for KV cache and activations, but the plan reserved "
                f"{format_bytes(plan.reserve_bytes)} for max_tokens={plan.max_tokens}; {fix}",
                budget_bytes=plan.budget_bytes)
        self._account(need)

    def _account(self, need: int) -> None:
        """A forward that fits: its need on top of the buffers, in the accounted peak."""
        c = self.counters
        c.accounted_peak_bytes = max(c.accounted_peak_bytes,
                                     self.device_tier.allocated_bytes + need)

    def _check_batched(self, tokens: int, keep) -> None:
        """``kv="batched"``: a continuous-batching manager's forward of ``tokens`` (all its
        sequences' in one row) against the reserve planned for its cache and largest
        forward; ``keep`` is the manager's logits indices (one row per sequence)."""
        plan = self.plan
        rows = (int(keep.numel()) if isinstance(keep, torch.Tensor) else
                keep if isinstance(keep, int) and 0 < keep < tokens else tokens)
        need = batched_reserve(self.shape, self.itemsize, positions=plan.max_tokens,
                               chunk=tokens, logits_rows=rows, head_copy=self._head_copy(rows),
                               page=plan.kv.block_tokens, fused_scratch=self._scratch_nbytes())
        if need > plan.reserve_bytes:
            raise BudgetError(
                f"this batched forward ({tokens} tokens, {rows} rows of logits) needs "
                f"{format_bytes(need)} for KV cache and activations, but the plan reserved "
                f"{format_bytes(plan.reserve_bytes)} for forwards of {plan.kv.prefill_chunk} "
                f"tokens: give the batching manager max_batch_tokens <= "
                f"{plan.kv.prefill_chunk}", budget_bytes=plan.budget_bytes)
        self._account(need)

    # -- a direct forward beyond the reserve -------------------------------------------------
    def _chunkable(self, args, kwargs, batch: int, new: int, cache) -> tuple | None:
        """For a direct forward whose one-shot need exceeds the reserve: ``(cache, chunk,
        keep)`` to run it as chunks of ``chunk`` positions that each fit, or ``None`` (then
        it is refused with the numbers): a forward asking for hidden states, attentions or a
        loss, or one whose kept logits alone do not fit. ``cache`` is the caller's, else one
        made for the call (dynamic, or paged as ``generate`` would get)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if (len(args) > 1 or (ids is None) == (embeds is None)
                or any(kwargs.get(k) for k in ("labels", "output_hidden_states",
                                                 "output_attentions"))
                or (ids if ids is not None else embeds).dim() < 2 or new < 2):
            return None
        keep = kwargs.get("logits_to_keep", 0)
        if not isinstance(keep, int) or keep < 0:
            return None
        keep = new if keep == 0 or keep > new else keep
        past = int(cache.get_seq_length()) if cache is not None and hasattr(
            cache, "get_seq_length") else 0
        held = batch * keep * self.shape.vocab * max(self.itemsize, 4)
        try:
            layout, chunk = self._prefill_layout(batch, new + past, new + past, cache,
                                                 held=held, all_rows=keep > 1)
        except BudgetError:
            return None
        if chunk >= new or chunk < 1:
            return None
        return layout, chunk, keep

    def _forward(self, orig, args, kwargs):
        """``model.forward``: as it is, unless ``_begin`` found it too large for the reserve;
        then as chunks of positions that each fit, each one a forward of its own through
        ``model`` (hooks, budget check and counters per chunk), the caller's cache (or one
        made for the call) carrying the context, the kept logits joined. Tokens are the
        one-shot forward's; logits are bitwise the resident model's fed the same chunks."""
        plan = self._chunk_next
        if plan is None:
            return orig(*args, **kwargs)
        self._chunk_next = None
        cache, chunk, keep = plan
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        x = kwargs.pop(name)
        key = "cache" if "cache" in kwargs else "past_key_values" if \
            "past_key_values" in kwargs else self._cache_kw
        use_cache = kwargs.pop("use_cache", None)
        kwargs.pop(key, None)
        mask, positions = kwargs.pop("attention_mask", None), kwargs.pop("position_ids", None)
        kwargs.pop("cache_position", None)   # derived from the cache, chunk by chunk
        kwargs.pop("logits_to_keep", None)
        new = x.shape[1]
        past = int(cache.get_seq_length()) if cache is not None else 0
        if cache is None and self.plan.kv.buffered:
            cache = kvbuffer.buffered_cache(self.model.config, past + new)
        elif cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        logits, at, out = None, 0, None
        self.counters.prefill_chunk = chunk
        try:
            for s in range(0, new, chunk):
                e = min(s + chunk, new)
                want = max(0, e - max(s, new - keep))   # kept positions in this chunk
                step = dict(kwargs, use_cache=True, logits_to_keep=max(want, 1))
                step[name], step[key] = x[:, s:e], cache
                if mask is not None:
                    step["attention_mask"] = mask[:, :past + e]
                if positions is not None:
                    step["position_ids"] = positions[:, s:e]
                out = self.model(**step)
                cache = out[key] if key in out.keys() else out.get("past_key_values", cache)
                if want:   # into the call's logits, held once (the reserve counted them)
                    if logits is None:
                        logits = out.logits.new_empty((x.shape[0], keep, out.logits.shape[-1]))
                    logits[:, at:at + want].copy_(out.logits[:, -want:])
                    at += want
                out["logits"] = None
        finally:
            self._skip_end = True   # the whole call's _end: its chunks were counted
        out["logits"] = logits
        if use_cache is False:
            for k in ("cache", "past_key_values"):
                if k in out.keys():
                    out[k] = None
        return out

    # -- generate ---------------------------------------------------------------------------
    def _generate(self, orig, args, kwargs):
        """``model.generate``, with the prefill and the cache sized to the reserve: a prompt
        whose one-shot prefill does not fit is prefilled in the largest chunks that do
        (transformers' ``prefill_chunk_size``), and a context whose dynamic cache does not fit
        gets a paged one (``kv="auto"``, CPU). A cache or a chunk size the caller passed is
        theirs."""
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if (not isinstance(ids, torch.Tensor) or ids.dim() < 2 or self._closed
                or kwargs.get("prefill_chunk_size") is not None):
            return orig(*args, **kwargs)
        given = next((kwargs[k] for k in ("cache", "past_key_values")
                      if kwargs.get(k) is not None), None)
        config = kwargs.get("generation_config") or self.model.generation_config
        batch, prompt = int(ids.shape[0]), int(ids.shape[1])
        for name in ("num_beams", "num_return_sequences"):
            batch *= max(1, int(kwargs.get(name, getattr(config, name, 1)) or 1))
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        total = prompt + int(new) if new is not None else int(
            kwargs.get("max_length", config.max_length) or 0)
        cache, chunk = self._prefill_layout(batch, prompt, max(total, prompt + 1), given)
        if cache is not None and cache is not given:
            kwargs[self._cache_kw] = cache
        if chunk < prompt:
            kwargs["prefill_chunk_size"] = chunk
        self.counters.prefill_chunk = chunk
        return orig(*args, **kwargs)

    def _prefill_layout(self, batch: int, prompt: int, total: int, given=None, *,
                        held: int = 0, all_rows: bool = False):
        """The cache ``generate`` should use (``None``: its own) and the prompt positions per
        prefill forward, for ``batch`` sequences of ``prompt`` positions growing to ``total``
        (``given``: the caller's cache, kept; the positions it already holds are not
        prefilled; ``held``: bytes the caller keeps besides, logits of earlier chunks;
        ``all_rows``: every position's logits computed, not the last)."""
        plan, reserve = self.plan, self.plan.reserve_bytes - held
        past = 0
        if given is not None:
            cache = given
            past = int(given.get_seq_length()) if hasattr(given, "get_seq_length") else 0
        elif plan.kv.paged:
            if total > plan.kv.max_context:
                raise BudgetError(
                    f"generating up to {total} positions, but the paged KV cache was planned "
                    f"for max_context={plan.kv.max_context}: pass max_context={total} to run()",
                    budget_bytes=plan.budget_bytes)
            cache = self._paged_cache(None, batch, True)
        else:
            bare = self._forward_need(batch, 1, 1, batch, 0)
            if bare > reserve:   # not even without KV
                raise BudgetError(
                    f"a batch of {batch} sequences needs {format_bytes(bare)} per forward "
                    "for its logits and the head's copies, more than the "
                    f"{format_bytes(reserve)} reserve sized for batch {plan.kv.batch or 1}: "
                    f"pass batch={batch} to run()", budget_bytes=plan.budget_bytes)
            dynamic = self.shape.kv_bytes(batch * total, self.itemsize)
            if self._forward_need(batch, 1, total, batch, dynamic) > reserve:
                cache = self._auto_paged(batch, total)
            else:   # generate's own cache, or one written in place (a fast plan)
                cache = (kvbuffer.buffered_cache(self.model.config, total) if self.plan.kv.buffered
                         else None)
        paged = getattr(cache, "device_bytes", None) is not None
        kv, in_place = self._cache_form(cache, batch, total)
        new = max(1, prompt - past)
        need = lambda c: self._chunked_need(   # noqa: E731
            batch, c, past, total, batch * (c if all_rows else 1), kv, in_place)
        chunk = largest_chunk(lambda c: self._forward_need(
            batch, c, total, batch * (c if all_rows else 1), kv, in_place), new, reserve)
        while chunk > 0 and need(chunk) > reserve:   # not monotonic: step down to one that fits
            chunk -= max(1, chunk // 32)
        if paged and (chunk < new or past or -(-new // cache.block_tokens)
                      > cache.device_blocks + 2):
            # a paged cache's pool holds a layer's blocks and one spare: a first forward may
            # start device_blocks + 2 blocks, a later one only one more (a block's positions)
            chunk = min(chunk, cache.block_tokens)
        if chunk < 1:
            if given is not None:   # the forward itself refuses it, with the numbers
                return given, 1 if new > 1 else prompt
            raise BudgetError(   # a paged cache's device part alone fills the reserve
                f"generating {total} positions at batch {batch}: not even one position per "
                f"forward fits the {format_bytes(reserve)} reserve; raise the budget, or lower "
                "max_new_tokens or the batch", budget_bytes=plan.budget_bytes)
        return cache, (chunk if chunk < new else prompt)

    def _auto_paged(self, batch: int, total: int):
        """A paged cache (spilled to disk) for a context whose dynamic cache outgrows the
        reserve: the most blocks kept in the budget that still leave room for a forward."""
        plan, reserve = self.plan, self.plan.reserve_bytes
        dyn = self.shape.kv_bytes(batch * total, self.itemsize)
        fix = (f"pass max_tokens >= {batch * total} (the budget must hold its KV cache too"
               + ("), or kv='auto' with max_context= for a cache paged to disk)"
                  if not plan.kv.auto else ")"))
        if not plan.kv.auto or self.device.type != "cpu":
            raise BudgetError(
                f"generating up to {total} positions at batch {batch} needs "
                f"{format_bytes(dyn)} of KV cache, more than the {format_bytes(reserve)} "
                f"reserved for max_tokens={plan.max_tokens}; {fix}",
                budget_bytes=plan.budget_bytes)
        from ..prefetch.kv import PagedKVCache

        config, dtype = self.model.config, DTYPES[self.manifest.dtype]
        spill = self.manifest.path.parent
        for block_tokens, device_blocks in ((256, 4), (256, 2), (128, 2), (128, 1), (64, 1),
                                            (32, 1), (16, 1)):
            g = kv_geometry(config, total, batch, dtype, block_tokens, device_blocks)
            if self._forward_need(batch, 1, total, batch, g["device_bytes"], True) <= reserve:
                break
        else:
            raise BudgetError(
                f"generating up to {total} positions at batch {batch}: even a paged KV cache "
                f"does not fit the {format_bytes(reserve)} reserve; {fix}",
                budget_bytes=plan.budget_bytes)
        free = shutil.disk_usage(spill).free
        if free < g["total_bytes"] + (64 << 20):
            raise HardwareError(
                f"generating up to {total} positions at batch {batch} needs "
                f"{format_bytes(g['total_bytes'])} of KV cache spilled to {spill}, which has "
                f"{format_bytes(free)} free; lower max_new_tokens or the batch")
        if self._owned_kv is not None:
            self._owned_kv.close()
        log.info("context of %d positions: KV cache paged to disk (%d-position blocks, %d in "
                 "the budget per layer)", total, g["block_tokens"], device_blocks)
        self._owned_kv = PagedKVCache(config, max_context=total, batch=batch, dtype=dtype,
                                      block_tokens=block_tokens, device_blocks=device_blocks,
                                      spill_dir=spill, transport=self.transport)
        return self._owned_kv

    def _paged_cache(self, cache, batch: int, use_cache):
        """With ``kv="paged"``: the runtime's PagedKVCache in place of an empty (or no) cache,
        so ``generate`` pages its KV without being told; a cache already holding positions,
        or ``use_cache=False``, is left alone."""
        from ..prefetch.kv import PagedKVCache

        if isinstance(cache, PagedKVCache) or use_cache is False:
            return cache
        if cache is not None and (not hasattr(cache, "get_seq_length")
                                  or cache.get_seq_length() > 0):
            return cache
        kv = self.plan.kv
        if batch > kv.batch:
            raise BudgetError(f"a batch of {batch} sequences, but the paged KV cache was "
                              f"planned for {kv.batch}: pass batch={batch} to run()",
                              budget_bytes=self.plan.budget_bytes)
        owned = self._owned_kv
        if owned is None or owned.shape[0] != batch:
            if owned is not None:
                owned.close()
            self._owned_kv = owned = PagedKVCache(
                self.model.config, max_context=kv.max_context, batch=batch,
                dtype=DTYPES[self.manifest.dtype], block_tokens=kv.block_tokens,
                device_blocks=kv.device_blocks, spill_dir=self.manifest.path.parent,
                transport=self.transport)
        else:
            owned.reset()
        return owned

    def _hold_torch_threads(self, hold: bool) -> None:
        """Hold torch to one intra-op thread (``compute="fast"``'s decode steps and the time
        between them), or give back the count it had before: the one it had when held, or
        one the caller set between steps (kept, and given back in turn)."""
        now = torch.get_num_threads()
        if hold:
            if now != 1:
                self._threads = now
                torch.set_num_threads(1)
        elif self._threads is not None:
            if now == 1:
                torch.set_num_threads(self._threads)
            self._threads = None

    def _end(self, module, args, output):
        if self._skip_end or self._chunk_next is not None:
            self._skip_end, self._chunk_next = False, None   # counted chunk by chunk
            return
        elapsed = time.perf_counter() - self._forward_t0
        batch, new = self._forward_shape
        c = self.counters
        c.forwards += 1
        c.forward_seconds += elapsed
        if self.experts is not None:
            self.experts.end_forward(new == 1, batch)
        if new == 1:
            c.decode_tokens += batch
            c.decode_steps += 1
            c.decode_seconds += elapsed
        else:
            c.prefill_tokens += batch * new
            release_free_heap()   # the prefill's freed activations: back to the OS
        keys = output.keys() if hasattr(output, "keys") else ()
        cache = output["cache"] if "cache" in keys else (
            output["past_key_values"] if "past_key_values" in keys else None)
        c.kv_bytes = max(c.kv_bytes, cache_bytes(cache))
        if getattr(cache, "device_bytes", None) is not None:
            self._paged_kv = cache   # reported by stats()

    # -- reporting and shutdown -----------------------------------------------------------
    def stats(self) -> dict:
        """Where the bytes and the milliseconds went (``runtime.stats.report``)."""
        if self._closed:
            return dict(getattr(self, "_final_stats", {}))
        return report(self)

    def close(self) -> None:
        """Detach every hook, restore the model's parameters, stop I/O, free buffers."""
        if self._closed:
            return
        if self.pipeline is not None:
            self._final_stats = self.stats()
        self._closed = True
        if self.pipeline is not None:
            self.pipeline.drain()
        if self.experts is not None:
            self.experts.close()
        detach(self._undo)
        if self._owned_kv is not None:
            self._owned_kv.close()   # a cache kept past close() says so when used
        self.transport.close()
        if self._pool is not None:
            self._pool.close()
            self._hold_torch_threads(False)
        self.disk.close()
        self._disk_users.close()
        self.resident, self.held, self.slots, self.pipeline = {}, {}, None, None


def _io_threads(plan: Plan, adapter, config) -> int:
    """Reads in flight at once: up to ``MAX_LAYER_READS`` for the pipeline's window, plus the
    expert cache's (one per expert a token routes to, at most 4)."""
    threads = max(1, min(plan.slots, MAX_LAYER_READS))
    if plan.experts is not None and plan.experts.mode == "cache":
        threads += max(1, min(4, adapter.moe_shape(config).top_k))
    return threads
