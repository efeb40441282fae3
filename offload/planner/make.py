"""Every Plan is made here: ``plan_for(manifest, adapter, config, profile, options)``.

The steps, in order: size the KV part and the reserve (``reserve.py``: the formula the runtime
checks each forward against), check the head's chunks on this machine (``kernels/head.py``),
then place the Units: dense (``placement.py``), MoE with an expert cache (``experts.py``), or
MoE with every expert streamed with its layer.
"""
from __future__ import annotations

import dataclasses
import logging

from ..errors import BudgetError, HardwareError, OffloadError
from ..kernels import head, layer, qmatmul
from ..sizes import format_bytes
from ..units import DTYPES, align
from .compute import fused_count, prefill_scratch_bytes
from .experts import make_moe_plan
from .kv import kv_geometry
from .options import DEFAULT_CHUNK, PlanOptions
from .placement import HeadCheck, make_plan
from .plan import ExpertPlan, KVPlan, Plan
from .profile import HardwareProfile
from .reserve import (TRASH_PAGES, batched_reserve, dynamic_reserve, held_scratch,
                      paged_reserve)

log = logging.getLogger(__name__)

SPILL_MARGIN = 64 << 20   # free space a full KV spill file leaves on its filesystem


def plan_for(manifest, adapter, config, profile: HardwareProfile, options: PlanOptions, *,
             heat: dict[str, float] | None = None, probe_head: bool = True) -> Plan:
    """The Plan for running ``manifest``'s model (``adapter``, ``config``) under ``options``.

    On a CPU the reserve also holds what torch's matmul kernel caches can grow by in the
    model's dtype (``HardwareProfile.kernel_cache``); a budget that cannot hold that beside
    the smallest working set is planned without it, with a warning saying by how much the run
    may go over (``KVPlan.kernels_over_bytes``).

    Args:
        heat: an MoE model's measured expert heat from an earlier run (``store.heat``).
        probe_head: check whether this CPU's matmul rounds the streamed head's chunks as the
            whole matrix (``head_check``: one whole-head matmul per probed row count, 18 s for
            Llama-3-70B's 2 GB head here); False for a plan from a config alone, which runs
            nothing (the run that follows checks it).

    Raises:
        BudgetError: no placement fits the budget (the message states the minimum).
        HardwareError: a paged KV cache asked for on a GPU.
        OffloadError: options that contradict each other or the model.
    """
    options.check()
    shape = adapter.shape(config)
    dtype = DTYPES[manifest.dtype]
    moe = adapter.moe_shape(config) if hasattr(adapter, "moe_shape") else None
    if moe is not None:
        options.experts.check(moe.top_k, moe.experts)
    head_rows = head_chunk_rows(manifest, shape)
    fused = fused_count(manifest.units)   # compute="fast": the fused kernel's prefill scratch
    check = head_check(manifest, shape, dtype, options.device, probe=probe_head)

    def plan_with(kernels: int, options: PlanOptions) -> Plan:
        kv, reserve, tokens = kv_part(config, shape, dtype, options, head_rows=head_rows,
                                      overhead=bookkeeping(len(manifest.units)) + kernels,
                                      buffered=bool(fused),
                                      fused_scratch=prefill_scratch_bytes(manifest.units))
        kv = dataclasses.replace(kv, kernel_bytes=kernels)

        def place(pins: frozenset[str]) -> Plan:
            return dataclasses.replace(
                _place(manifest, adapter, config, moe, profile, options, kv, reserve, tokens,
                       pins, check, heat, fused), compute="fast" if fused else "exact",
                fused_tensors=fused)

        if not probe_head:
            return dataclasses.replace(place(frozenset()), head_probed=False)
        if not any(m <= head.DECODE_ROWS for m in check.inexact_rows):
            return place(frozenset())
        try:   # whole and resident: bitwise at every batch, if the budget holds it
            return place(check.keys)
        except BudgetError:
            units = [manifest.unit(k) for k in sorted(check.keys)]
            log.warning("the LM head streams in %d chunks, and on this machine a chunk's "
                        "logits differ in the last bits from the whole matrix's at batch %s: a "
                        "budget %s larger keeps it resident, bitwise", len(units),
                        ", ".join(str(m) for m in check.inexact_rows if m <= head.DECODE_ROWS),
                        format_bytes(sum(align(u.nbytes, 4096) for u in units)))
            return place(frozenset())

    def plan_at(options: PlanOptions) -> Plan:
        kernels = profile.kernel_cache() if options.device.startswith("cpu") else 0
        try:
            return plan_with(kernels, options)
        except BudgetError as e:
            if not kernels or e.minimum_bytes is None:
                raise
            # a budget too small for the kernel caches: run, and say by how much it may go over
            try:
                plan = plan_with(0, options)
            except BudgetError:
                raise e from None
            log.warning("the budget %s cannot also hold what torch's matmul kernels for this "
                        "dtype keep on this CPU (%s): the run's measured peak may exceed it by "
                        "up to that much; raise the budget to %s, or set "
                        "ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY lower before "
                        "importing offload", format_bytes(options.budget_bytes),
                        format_bytes(kernels), format_bytes(e.minimum_bytes))
            return dataclasses.replace(plan, kv=dataclasses.replace(plan.kv,
                                                                   kernels_over_bytes=kernels))

    if not (fused and options.kv.prefill_chunk is None and options.kv.kv != "batched"
            and options.logits == "last"):
        return plan_at(options)
    return choose_chunk(plan_at, options)


AUTO_CHUNKS = (128, 64)   # prefill chunks a fast plan weighs against a one-shot prefill
AUTO_GAIN = 0.02          # ... and takes where its decode step is predicted this much faster


def choose_chunk(plan_at, options: PlanOptions) -> Plan:
    """A compute="fast" plan's prefill chunk, where the caller did not fix one: the reserve
    holds the activations of one forward, and those of a one-shot prefill of every position
    (40 MB of SmolLM2's 108 MB budget at 20%, for 256 positions) are room that a decode step,
    which streams what does not fit, would rather spend on weights. So each chunk of
    ``AUTO_CHUNKS`` below the positions is planned too, and the one whose decode step is
    predicted fastest kept (a chunk only where it gains ``AUTO_GAIN``; the larger chunk on a
    tie): a prompt longer than it is then prefilled in chunks, reading the streamed weights
    once a chunk, which costs a prompt of P positions P/chunk reads of what one step streams.
    Last, where the best so far still streams: chunks of ``qmatmul.INT_ROWS`` positions, whose
    forwards take the integer kernel and hold no prefill scratch (4 MB less reserve), kept only
    where that plan streams nothing (then its prefill reads nothing either, and its chunks
    cost about what larger ones do: SmolLM2 resident, 256 positions in 0.92-0.98 s in chunks
    of 16, 0.94-1.17 s in chunks of 64, 0.71-0.87 s in one forward), or where no other plan
    fits the budget. Exact plans never chunk by choice: a chunked prefill's logits are not
    the one-shot's bits (``prefill_chunk=`` asks for it)."""
    best, error = None, None
    try:
        best = plan_at(options)
    except BudgetError as e:
        error = e
    if best is not None and not best.streamed_bytes:
        return best
    for chunk in AUTO_CHUNKS:
        if chunk >= options.tokens:
            continue
        try:
            plan = plan_at(dataclasses.replace(
                options, kv=dataclasses.replace(options.kv, prefill_chunk=chunk)))
        except BudgetError as e:
            error = e
            continue
        if best is None or plan.predicted_s < best.predicted_s * (1 - AUTO_GAIN):
            best = plan
    if (best is None or best.streamed_bytes) and qmatmul.INT_ROWS < options.tokens:
        try:
            plan = plan_at(dataclasses.replace(
                options, kv=dataclasses.replace(options.kv, prefill_chunk=qmatmul.INT_ROWS)))
        except BudgetError as e:
            error = e
        else:
            if best is None or not plan.streamed_bytes:   # the only fit, or no streaming
                best = plan
    if best is None:
        raise error
    return best


def kv_part(config, shape, dtype, options: PlanOptions, *, head_rows: int = 0,
            overhead: int = 0, buffered: bool = False, fused_scratch: int = 0
            ) -> tuple[KVPlan, int, int]:
    """The KV part of the plan, the reserve, and the positions it holds: dynamic (the whole
    KV of ``options.tokens`` positions in the budget) unless ``kv="paged"``, or ``"auto"``
    with a ``max_context`` whose dynamic reserve would take over half the budget.

    The reserve keeps one row of logits per sequence of ``kv.batch`` (``logits="all"``: every
    position's), what the head's half-precision path copies at that batch on this CPU
    (``head_rows``: its largest chunk), and ``overhead``: the runtime's own objects
    (``bookkeeping``). ``buffered``: a dynamic cache the runtime writes in place (a fast
    plan's: ``adapters/kvbuffer.py``; reserved as transformers' cache). ``fused_scratch``: the
    fused kernel's prefill scratch, reserved for forwards of more than ``qmatmul.INT_ROWS``
    rows only (``reserve.forward_bytes``)."""
    kvo, tokens = options.kv, options.tokens
    paths = head.choose(dtype, shape.hidden) if options.device.startswith("cpu") else None
    extra = overhead + head.extra_bytes(paths, kvo.batch, shape.hidden, dtype.itemsize,
                                        head_rows)
    if kvo.kv == "batched":
        return _batched_part(shape, dtype, kvo, extra, overhead, fused_scratch)
    rows = tokens if options.logits == "all" else kvo.batch
    reserve = dynamic_reserve(shape, dtype.itemsize, tokens, logits_rows=min(rows, tokens),
                              head_copy=extra, batch=max(1, kvo.batch),
                              fused_scratch=fused_scratch)
    paged = kvo.kv == "paged" or (kvo.kv == "auto" and kvo.max_context is not None
                                  and reserve > options.budget_bytes // 2)
    if not paged:
        chunk = kvo.prefill_chunk if kvo.prefill_chunk and kvo.prefill_chunk < tokens else 0
        if chunk:   # activations for forwards of ``chunk`` positions (longer: in chunks)
            reserve = dynamic_reserve(shape, dtype.itemsize, tokens, head_copy=extra,
                                      logits_rows=min(rows, tokens), chunk=chunk,
                                      batch=max(1, kvo.batch), fused_scratch=fused_scratch)
        rows = max(chunk or tokens, kvo.batch)   # the largest forward's (the prefill's: batch 1)
        return KVPlan(auto=kvo.kv == "auto", overhead_bytes=overhead, buffered=buffered,
                      prefill_chunk=chunk, fused_scratch_bytes=held_scratch(fused_scratch, rows)
                      ), reserve, tokens
    if not options.device.startswith("cpu"):
        raise HardwareError("kv='paged' runs on a CPU compute device for now (its GPU path is "
                            "not built): use kv='dynamic' on the GPU, or device='cpu'")
    g = kv_geometry(config, kvo.max_context, kvo.batch, dtype, kvo.block_tokens,
                    kvo.device_blocks)
    free = options.spill_free_bytes
    if free is not None and free < g["total_bytes"] + SPILL_MARGIN:
        raise HardwareError(
            f"max_context={kvo.max_context} at batch {kvo.batch} needs "
            f"{format_bytes(g['total_bytes'])} of KV cache, which cannot be served even from "
            f"disk: {options.spill_dir} has {format_bytes(free)} free; lower max_context or "
            "choose another offload_dir", needed_bytes=g["total_bytes"], free_bytes=free)
    chunk = min(kvo.prefill_chunk or DEFAULT_CHUNK, kvo.max_context)
    objects = paged_bookkeeping(config.num_hidden_layers, g["pool_blocks"])
    overhead += objects
    extra += objects
    reserve = paged_reserve(shape, dtype.itemsize, batch=kvo.batch, chunk=chunk,
                            max_context=kvo.max_context, kv_device_bytes=g["device_bytes"],
                            logits_rows=kvo.batch * (chunk if options.logits == "all" else 1),
                            head_copy=extra, fused_scratch=fused_scratch)
    plan = KVPlan("paged", auto=kvo.kv == "auto", overhead_bytes=overhead, max_context=kvo.max_context, batch=kvo.batch,
                  block_tokens=g["block_tokens"], device_blocks=kvo.device_blocks,
                  device_bytes=g["device_bytes"], disk_bytes=g["total_bytes"],
                  prefill_chunk=chunk,
                  fused_scratch_bytes=held_scratch(fused_scratch, kvo.batch * chunk))
    return plan, reserve, kvo.batch * kvo.max_context


def _batched_part(shape, dtype, kvo, extra: int, overhead: int, fused_scratch: int = 0
                  ) -> tuple[KVPlan, int, int]:
    """``kv="batched"``: a continuous-batching manager keeps ``batch`` sequences of up to
    ``max_context`` positions in its own paged cache (pages of ``block_tokens``), allocated
    once, and runs forwards of at most ``prefill_chunk`` tokens drawn from all of them."""
    positions = kvo.batch * align(kvo.max_context, kvo.block_tokens)
    chunk = min(kvo.prefill_chunk or DEFAULT_CHUNK, positions)
    if chunk < kvo.batch:
        raise OffloadError(f"prefill_chunk={chunk} is below batch={kvo.batch}: a decode step "
                           "of every sequence is one token each; raise prefill_chunk")
    reserve = batched_reserve(shape, dtype.itemsize, positions=positions, chunk=chunk,
                              logits_rows=kvo.batch, head_copy=extra, page=kvo.block_tokens,
                              fused_scratch=fused_scratch)
    plan = KVPlan("batched", overhead_bytes=overhead, max_context=kvo.max_context,
                  batch=kvo.batch, block_tokens=kvo.block_tokens, prefill_chunk=chunk,
                  fused_scratch_bytes=held_scratch(fused_scratch, chunk),
                  device_bytes=shape.kv_bytes(positions + TRASH_PAGES * kvo.block_tokens,
                                              dtype.itemsize))
    return plan, reserve, positions


def head_chunk_rows(manifest, shape) -> int:
    """Rows of the LM head's largest Unit (the whole vocab when it is one Unit)."""
    keys = manifest.groups()[manifest.tied.get("head", "head")]
    return max((r[1] - r[0] if r else shape.vocab
                for r in (manifest.unit(k).rows for k in keys)), default=shape.vocab)


def bookkeeping(units: int) -> int:
    """The process memory a runtime holds besides its buffers: hooks, Tickets, I/O thread
    stacks, generate()'s state. Measured in warm fresh processes as RSS growth over the
    buffers allocated (the kernels' workspaces already in the baseline: ``api.run_prepared``):
    72-376 KB for test models of 65-187 Units; this allows 256 KiB plus 4 KiB per Unit."""
    return (256 << 10) + (4 << 10) * units


def paged_bookkeeping(layers: int, pool_blocks: int) -> int:
    """What a PagedKVCache holds besides its buffers (its layers' block lists, a tensor
    object per pool block, the spill file): measured as RSS growth over ``device_bytes``,
    82-270 KB for 8-32 layers and 34-322 blocks; this allows 16 KiB per layer plus 2 KiB per
    block."""
    return (16 << 10) * layers + (2 << 10) * pool_blocks


def head_check(manifest, shape, dtype, device: str, *, probe: bool = True) -> HeadCheck:
    """The head's Units and, on a CPU (``probe``), the row counts at which its chunks are not
    bitwise the whole matrix here (a zero-page probe: ``kernels.head.chunking_mismatches``)."""
    keys = manifest.groups()[manifest.tied.get("head", "head")]
    if not probe or len(keys) < 2 or not device.startswith("cpu"):
        return HeadCheck(frozenset(keys))
    rows = tuple(manifest.unit(k).rows for k in keys)
    return HeadCheck(frozenset(keys),
                     head.chunking_mismatches(shape.vocab, shape.hidden, dtype, rows))


def step_overhead(profile, model_type: str | None, layers: int, batch: int,
                  fused: int) -> float:
    """The framework's seconds per decode step: the fast layer road's figure where every
    layer's seven linears are fused (``fused``: the fused tensors) and the profile has it,
    else the layers' own."""
    key = layer.family_key(model_type, fused >= 7 * layers > 0)
    if key != model_type and key not in profile.layer_s:
        key = model_type
    return profile.step_overhead(key, layers, batch)


def _place(manifest, adapter, config, moe, profile, options: PlanOptions, kv: KVPlan,
           reserve: int, tokens: int, pins: frozenset[str], check: HeadCheck, heat,
           fused: int = 0) -> Plan:
    units = list(manifest.units)
    layers = int(getattr(config, "num_hidden_layers", 0))
    ex = options.experts
    stream = moe is not None and ex.experts == "stream"
    order = adapter.execution_order(config, manifest.groups(), stream_experts=stream)
    batch = options.kv.batch
    common = dict(prefetch=options.prefetch, host_budget_bytes=options.host_budget_bytes,
                  pinned=frozenset(adapter.always_resident(units)) | pins, kv=kv, head=check,
                  overhead_s=step_overhead(profile, getattr(config, "model_type", None),
                                           layers, batch, fused), batch=batch)
    if moe is None:
        return make_plan(units, order, options.budget_bytes, reserve, tokens, profile, **common)
    if stream:
        units = [u for u in units if u.kind != "expert"] + adapter.stream_units(units)
        return make_plan(units, order, options.budget_bytes, reserve, tokens, profile,
                         experts=ExpertPlan("stream"), **common)
    return make_moe_plan(
        units, order, options.budget_bytes, reserve, tokens, profile, top_k=moe.top_k,
        moe_layers=len(moe.layers), experts_per_layer=moe.experts, policy=ex.expert_cache,
        predict_depth=ex.predict_depth if ex.predict else 0,
        predict_width=ex.predict_width or moe.top_k, heat=heat, **common)
