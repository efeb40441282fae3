"""The public entry points: ``run``, ``plan``, ``pack``, ``stats``, ``close``."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import adapter_for
from .errors import BudgetError, HardwareError, OffloadError, StoreError
from .planner import Plan, load_or_measure, make_plan
from .planner.experts import make_moe_plan
from .runtime import Runtime, scratch_bytes
from .sizes import format_bytes, parse_size
from .store.format import Manifest, read_manifest
from .store.pack import clean_partials, write_store
from .store.sources import Source, build_config, config_dict, open_source
from .tiers.device import release_free_heap
from .units import DTYPE_NAMES, DTYPES, align

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
_ATTR = "_offload_runtime"


def default_offload_dir() -> Path:
    """``$OFFLOAD_CACHE``, else ``~/.cache/offload``."""
    env = os.environ.get("OFFLOAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "offload"


@dataclass(frozen=True)
class Prepared:
    """A source resolved to a valid packed store and its adapter."""

    source: Source
    manifest: Manifest
    adapter: object
    offload_dir: Path


def pack(model, out: str | os.PathLike | None = None, *, offload_dir=None,
         progress: bool = True, force: bool = False, sparse: str | None = None,
         prune: float | None = None, method: str = "magnitude",
         calibration: list[str] | None = None) -> Manifest:
    """Pack ``model`` (a model object, a checkpoint dir or a .gguf file) into a packed store.

    A valid store of the same source and options at ``out`` is reused unless ``force``; a
    store of a changed source, other options, another format version, or a damaged one is
    rebuilt.

    Args:
        sparse: ``"bitmap"``: store each tensor whose zeros make it pay as a bitmap of its
            non-zero positions plus the packed values (lossless); it moves that way and is
            decoded on the compute device. ``None``: dense.
        prune: LOSSY, opt-in: zero this fraction of each decoder projection's weights per
            output row before encoding (``sparse`` defaults to ``"bitmap"`` then).
        method: ``"magnitude"`` (smallest ``|W|``) or ``"wanda"`` (smallest
            ``|W| * ||X||``, with input norms measured by running ``calibration`` texts through
            the dense model, offloaded).

    Returns:
        The store's manifest (``manifest.path`` is the store directory).
    """
    options = PackOptions.make(sparse, prune, method, calibration)
    return _prepare(model, out, offload_dir, progress, force, options).manifest


@dataclass(frozen=True)
class PackOptions:
    """How tensors are stored: ``sparse`` encoding and optional (lossy) pruning."""

    sparse: str | None = None
    prune: float | None = None
    method: str = "magnitude"
    calibration: tuple[str, ...] | None = None

    @classmethod
    def make(cls, sparse=None, prune=None, method="magnitude", calibration=None) -> "PackOptions":
        from .planner.encoding import SPARSE_ENCODINGS
        from .store.prune import check_prune

        if prune is not None:
            check_prune(prune, method)
            sparse = sparse or "bitmap"
        if sparse is not None and sparse not in SPARSE_ENCODINGS:
            raise OffloadError(f"sparse={sparse!r}: use one of {', '.join(SPARSE_ENCODINGS)} "
                               "(or leave it unset for dense)")
        return cls(sparse, float(prune) if prune is not None else None, method,
                   tuple(calibration) if calibration else None)

    def describe(self) -> dict:
        """What the manifest records (a store is reused only with the same options)."""
        d = {"sparse": self.sparse, "prune": self.prune,
             "method": self.method if self.prune else None}
        if self.prune and self.method == "wanda":   # other calibration, other pruning
            import hashlib

            d["calibration"] = hashlib.sha256(
                "\n".join(self.calibration or ("default",)).encode()).hexdigest()[:16]
        return d

    def suffix(self) -> str:
        if self.sparse is None:
            return ""
        prune = f"-{self.method}{round(self.prune * 100)}" if self.prune else ""
        return f".{self.sparse}{prune}"


def _prepare(model, out, offload_dir, progress=True, force=False,
             options: PackOptions = PackOptions()) -> Prepared:
    if isinstance(model, (str, os.PathLike)) and (Path(model) / "manifest.json").is_file() \
            and out is None:
        return _open_store(Path(model))
    source = open_source(model)
    adapter = adapter_for(source.config)
    base = Path(offload_dir).expanduser() if offload_dir else default_offload_dir()
    store_dir = Path(out).expanduser() if out else \
        base / f"{source.name}{options.suffix()}.offload"
    clean_partials(store_dir.parent, store_dir.name)
    manifest = None
    if not force and (store_dir / "manifest.json").exists():
        try:
            manifest = read_manifest(store_dir)
        except StoreError as e:
            log.warning("rebuilding the packed store: %s", e)
        if manifest is not None and manifest.source.get("fingerprint") != source.fingerprint:
            log.info("the source of %s changed; packing it again", store_dir)
            manifest = None
        if manifest is not None and manifest.source.get("pack", PackOptions().describe()) \
                != options.describe():
            log.info("%s was packed with other options; packing it again", store_dir)
            manifest = None
    if manifest is None:
        specs, tied = adapter.unit_specs(source.config, source.shapes())
        dtype = _store_dtype(specs)
        meta = {"model_type": source.config.model_type, "config": config_dict(source.config),
                "dtype": dtype, "tied": tied,
                "source": {"description": source.description, "fingerprint": source.fingerprint,
                           "pack": options.describe()}}
        extras = (lambda tmp: _save_tokenizer(source, tmp)) if source.tokenizer_path else None
        from .store.encode import make_encoder

        encoder = make_encoder(options, adapter, lambda: _calibrate(model, base, options))
        manifest = write_store(store_dir, specs, source.load, meta, progress=progress,
                               extras=extras, encoder=encoder)
        if encoder is not None:   # build the CPU decoder now, not in the first (capped) run
            from .kernels import bitmap

            bitmap.prepare(torch.device("cpu"))
    return Prepared(source, manifest, adapter, store_dir.parent if out else base)


def _calibrate(model, base: Path, options: PackOptions) -> dict[str, torch.Tensor]:
    """Wanda's input norms: the calibration texts run through the dense model, offloaded."""
    from .store.calibrate import input_norms

    dense = _prepare(model, None, base, progress=False)   # pack dense first, once
    return input_norms(_open_store(dense.manifest.path), options.calibration)


def _open_store(path: Path) -> Prepared:
    """A packed store passed directly: no source to parse, the manifest says everything."""
    manifest = read_manifest(path)
    config = build_config(manifest.config)
    source = Source(name=path.name, description=str(path), config=config,
                    fingerprint=manifest.source.get("fingerprint", ""), shapes=dict,
                    load=lambda name: None)
    return Prepared(source, manifest, adapter_for(config), path.parent)


def _store_dtype(specs) -> str:
    dtypes = {p.dtype for s in specs for p in s.parts}
    if len(dtypes) != 1:
        raise OffloadError(f"mixed weight dtypes {sorted(map(str, dtypes))} are not supported; "
                           "convert the checkpoint to one dtype")
    return DTYPE_NAMES[dtypes.pop()]


def _save_tokenizer(source: Source, store_dir: Path) -> None:
    """Keep the tokenizer beside the store so later runs need not parse the source again."""
    try:
        from transformers import AutoTokenizer

        path, gguf = source.tokenizer_path
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else \
            AutoTokenizer.from_pretrained(path)
        tok.save_pretrained(store_dir / "tokenizer")
    except (OSError, ValueError) as e:
        log.info("no tokenizer saved with the store: %s", e)


def _resolve_device(device) -> torch.device:
    device = device or os.environ.get("OFFLOAD_DEVICE") or None
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HardwareError(f"device {device} was asked for but this machine has no CUDA GPU; "
                            "pass device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise HardwareError(f"device {device} is not supported; use 'cpu' or 'cuda'")
    return device


@dataclass(frozen=True)
class ExpertOptions:
    """How an MoE model's experts move (ignored for dense models); see ``run``."""

    experts: str = "cache"
    predict: bool = False
    predict_depth: int = 1
    predict_width: int | None = None
    expert_cache: str = "lru"

    def check(self, top_k: int, n_experts: int) -> None:
        if self.experts not in ("cache", "stream"):
            raise OffloadError(f"experts={self.experts!r}: use 'cache' (expert Units fetched as "
                               "routed) or 'stream' (every expert streamed with its layer)")
        if self.expert_cache not in ("lru", "lfu"):
            raise OffloadError(f"expert_cache={self.expert_cache!r}: use 'lru' or 'lfu'")
        if not isinstance(self.predict_depth, int) or self.predict_depth < 1:
            raise OffloadError(f"predict_depth={self.predict_depth!r}: use an int >= 1 (or "
                               "predict=False to turn prediction off)")
        w = self.predict_width
        if w is not None and (not isinstance(w, int) or not 1 <= w <= n_experts):
            raise OffloadError(f"predict_width={w!r}: use an int from 1 to {n_experts} "
                               f"(default: top-k = {top_k})")


@dataclass(frozen=True)
class KVOptions:
    """Where the KV cache lives; see ``run``."""

    kv: str = "auto"
    max_context: int | None = None
    batch: int = 1
    block_tokens: int = 256
    device_blocks: int = 4
    prefill_chunk: int = 256

    def check(self) -> None:
        if self.kv not in ("auto", "paged", "dynamic"):
            raise OffloadError(f"kv={self.kv!r}: use 'auto', 'paged' (recent blocks in the "
                               "budget, older ones on disk) or 'dynamic' (all in the budget)")
        for name in ("max_context", "batch", "block_tokens", "device_blocks", "prefill_chunk"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise OffloadError(f"{name}={v!r}: use a positive int")
        if self.kv == "paged" and self.max_context is None:
            raise OffloadError("kv='paged' needs max_context= (the longest sequence, in "
                               "positions): it sizes the cache's buffers and its disk part")


def _make_plan(prep: Prepared, budget, device: torch.device, prefetch, max_tokens,
               host_budget=None, experts: ExpertOptions = ExpertOptions(),
               kv: KVOptions = KVOptions()) -> Plan:
    kv.check()
    manifest = prep.manifest
    config = build_config(manifest.config)
    shape = prep.adapter.shape(config)
    dtype = DTYPES[manifest.dtype]
    budget_bytes = parse_size(budget, total_bytes=manifest.weight_bytes)
    if max_tokens is None and kv.max_context is not None:
        max_tokens = kv.batch * kv.max_context
    max_tokens = int(max_tokens or DEFAULT_MAX_TOKENS)
    reserve = (shape.kv_bytes(max_tokens, dtype.itemsize)
               + shape.activation_bytes(1, max_tokens, max_tokens, dtype.itemsize, max_tokens)
               + scratch_bytes(shape, dtype.itemsize))
    paged = kv.kv == "paged" or (kv.kv == "auto" and kv.max_context is not None
                                 and reserve > budget_bytes // 2)
    if not paged:
        return _place(prep, budget_bytes, device, prefetch, max_tokens, reserve, host_budget,
                      experts)
    if device.type != "cpu":
        raise HardwareError("kv='paged' runs on a CPU compute device for now (its GPU path is "
                            "not built): use kv='dynamic' on the GPU, or device='cpu'")
    from .prefetch.kv import kv_geometry

    g = kv_geometry(config, kv.max_context, kv.batch, dtype, kv.block_tokens, kv.device_blocks)
    chunk = min(kv.prefill_chunk, kv.max_context)
    reserve = (g["device_bytes"] + scratch_bytes(shape, dtype.itemsize)
               + shape.activation_bytes(kv.batch, chunk, kv.max_context, dtype.itemsize,
                                        kv.batch * chunk))
    _check_kv_disk(prep.offload_dir, g["total_bytes"], kv)
    plan = _place(prep, budget_bytes, device, prefetch, kv.batch * kv.max_context, reserve,
                  host_budget, experts)
    return dataclasses.replace(
        plan, kv="paged", max_context=kv.max_context, kv_batch=kv.batch,
        kv_block_tokens=g["block_tokens"], kv_device_blocks=kv.device_blocks,
        kv_device_bytes=g["device_bytes"], kv_disk_bytes=g["total_bytes"], prefill_chunk=chunk)


def _check_kv_disk(offload_dir: Path, total: int, kv: KVOptions) -> None:
    import shutil

    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(offload_dir).free
    if free < total + (64 << 20):
        from .sizes import format_bytes

        raise HardwareError(
            f"max_context={kv.max_context} at batch {kv.batch} needs {format_bytes(total)} of KV "
            f"cache, which cannot be served even from disk: {offload_dir} has "
            f"{format_bytes(free)} free; lower max_context or choose another offload_dir",
            needed_bytes=total, free_bytes=free)


def _place(prep: Prepared, budget_bytes: int, device, prefetch, max_tokens: int, reserve: int,
           host_budget, experts: ExpertOptions) -> Plan:
    manifest, adapter = prep.manifest, prep.adapter
    config = build_config(manifest.config)
    shape = adapter.shape(config)
    dtype = DTYPES[manifest.dtype]
    moe = adapter.moe_shape(config) if hasattr(adapter, "moe_shape") else None
    if moe is not None:
        experts.check(moe.top_k, moe.experts)
    stream = moe is not None and experts.experts == "stream"
    order = adapter.execution_order(config, manifest.groups(), stream_experts=stream)
    profile = load_or_measure(manifest.data_path, prep.offload_dir, device, dtype, shape.hidden,
                              max_bytes=budget_bytes // 2)
    host_bytes = 0
    if host_budget is not None:
        if device.type == "cpu":
            raise BudgetError("host_budget applies when the compute device is a GPU; on the CPU "
                              "the budget already is host RAM: drop host_budget or raise budget")
        host_bytes = parse_size(host_budget, total_bytes=manifest.weight_bytes,
                                what="host_budget")
    units = list(manifest.units)
    pinned = frozenset(adapter.always_resident(units))

    def place(pins: frozenset[str]) -> Plan:
        if moe is None:
            return make_plan(units, order, budget_bytes, reserve, max_tokens, profile,
                             prefetch=prefetch, host_budget_bytes=host_bytes, pinned=pins)
        if stream:
            plan = make_plan([u for u in units if u.kind != "expert"]
                             + adapter.stream_units(units), order, budget_bytes, reserve,
                             max_tokens, profile, prefetch=prefetch,
                             host_budget_bytes=host_bytes, pinned=pinned | pins)
            return dataclasses.replace(plan, experts="stream")
        from .experts_runtime import load_heat

        return make_moe_plan(
            units, order, budget_bytes, reserve, max_tokens, profile, top_k=moe.top_k,
            moe_layers=len(moe.layers), experts_per_layer=moe.experts, pinned=pinned | pins,
            prefetch=prefetch, host_budget_bytes=host_bytes, policy=experts.expert_cache,
            predict_depth=experts.predict_depth if experts.predict else 0,
            predict_width=experts.predict_width or moe.top_k, heat=load_heat(manifest.path))

    return _place_head(manifest, shape, dtype, device, place)


def _place_head(manifest: Manifest, shape, dtype, device: torch.device, place) -> Plan:
    """``place(pins)``, with the LM head kept whole and resident where a streamed one would not
    be bitwise on this machine at a decode batch size (``kernels.head.chunking_mismatches``
    at 8 rows or fewer) and the budget holds it. A streamed head records the row counts at
    which its chunks round otherwise in the Plan (``head_inexact_rows``)."""
    from .kernels import head

    keys = manifest.groups()[manifest.tied.get("head", "head")]
    units = [manifest.unit(k) for k in keys]
    inexact = ()
    if len(keys) > 1 and device.type == "cpu":
        inexact = head.chunking_mismatches(shape.vocab, shape.hidden, dtype,
                                           tuple(u.rows for u in units))
        release_free_heap()   # the probe's outputs: back to the OS before the budget is taken
    decode = [m for m in inexact if m <= head.DECODE_ROWS]
    plan = None
    if decode:
        try:
            plan = place(frozenset(keys))
        except BudgetError:
            log.warning("the LM head streams in %d chunks, and on this machine a chunk's logits "
                        "differ in the last bits from the whole matrix's at batch %s: a budget "
                        "%s larger keeps it resident, bitwise", len(keys),
                        ", ".join(map(str, decode)),
                        format_bytes(sum(align(u.nbytes, 4096) for u in units)))
    plan = plan or place(frozenset())
    streamed = any(k in plan.stream for k in keys)
    return dataclasses.replace(plan, head_inexact_rows=inexact if streamed else ())


def plan(model, budget, *, device=None, offload_dir=None, prefetch=None,
         max_tokens=None, experts="cache", predict=False, predict_depth=1, predict_width=None,
         expert_cache="lru", sparse=None, kv="auto", max_context=None, batch=1,
         prefill_chunk=256, kv_block=256, kv_device_blocks=4) -> Plan:
    """The Plan ``run`` would use, without running anything (packs the store if needed)."""
    prep = _prepare(model, None, offload_dir, options=PackOptions.make(sparse))
    return plan_prepared(prep, budget, device=device, prefetch=prefetch, max_tokens=max_tokens,
                         experts=experts, predict=predict, predict_depth=predict_depth,
                         predict_width=predict_width, expert_cache=expert_cache, kv=kv,
                         max_context=max_context, batch=batch, prefill_chunk=prefill_chunk,
                         kv_block=kv_block, kv_device_blocks=kv_device_blocks)


def plan_prepared(prep: Prepared, budget, *, device=None, prefetch=None, max_tokens=None,
                  experts="cache", predict=False, predict_depth=1, predict_width=None,
                  expert_cache="lru", kv="auto", max_context=None, batch=1,
                  prefill_chunk=256, kv_block=256, kv_device_blocks=4) -> Plan:
    """``plan`` for a store already prepared (``_prepare``)."""
    options = ExpertOptions(experts, predict, predict_depth, predict_width, expert_cache)
    return _make_plan(prep, budget, _resolve_device(device), prefetch, max_tokens,
                      experts=options, kv=KVOptions(kv, max_context, batch, kv_block,
                                                    kv_device_blocks, prefill_chunk))


def run(model, budget="25%", *, device=None, offload_dir=None, host_budget=None,
        prefetch=None, max_tokens=None, progress=True, experts="cache", predict=False,
        predict_depth=1, predict_width=None, expert_cache="lru",
        sparse=None, kv="auto", max_context=None, batch=1,
        prefill_chunk=256, kv_block=256, kv_device_blocks=4) -> torch.nn.Module:
    """Run ``model`` within ``budget`` bytes of compute-tier memory.

    Args:
        model: a transformers causal-LM object, a checkpoint directory (config.json +
            *.safetensors) or a .gguf file.
        budget: "512MB", "8GB", "1.5GiB", a byte count, or a percentage of the weights ("25%").
        device: the compute device; default `$OFFLOAD_DEVICE`, else the current CUDA device,
            else the CPU.
        offload_dir: where packed stores live (default ``$OFFLOAD_CACHE`` or ~/.cache/offload).
        host_budget: pinned host RAM on a GPU machine for Units that do not fit the device:
            read from disk once, then moved over the host link each pass. GPU only.
        prefetch: Units fetched ahead of the one computing (default: enough to keep about
            64 MB in flight, 1 to 3 Units).
        max_tokens: the most positions (batch x context) one forward may process and cache;
            the budget reserves their KV cache, activations and logits (default 256).
        experts: MoE models only. ``"cache"`` (default): each expert is its own Unit, read
            when the router picks it into a device expert cache sized by the plan;
            ``"stream"``: every expert streams with its layer each pass (the baseline).
        predict: MoE, ``experts="cache"``: prefetch the experts the next layers' routers pick
            on the current hidden state (pre-gating), while this layer computes. Off by
            default: on the random-weight Mixtral bench its guesses are 64% right and it
            costs ~10% (benches/RESULTS.md); routers of trained models agree more from layer
            to layer, so measure it on yours.
        predict_depth: MoE layers ahead to predict (default 1).
        predict_width: experts per token to prefetch for each predicted layer (default top-k).
        expert_cache: ``"lru"`` (default) or ``"lfu"`` (frequency-aware) eviction.
        kv: where the KV cache lives. ``"dynamic"``: transformers' DynamicCache, all of it in
            the budget (``max_tokens`` positions reserved). ``"paged"``: blocks of positions,
            the newest ``device_blocks`` per layer in the budget and older ones spilled to a
            scratch file in ``offload_dir``, read back a layer ahead (``generate`` gets it
            automatically); needs ``max_context``. ``"auto"`` (default): paged when
            ``max_context`` is given and a dynamic cache for it would take over half the
            budget. Lossless either way.
        max_context: the longest sequence (prompt + new tokens) to serve, in positions.
        batch: sequences per forward the paged cache is sized for.
        prefill_chunk: with a paged cache, the prompt positions per forward the reserve's
            activations are sized for (a longer prompt is fed in chunks of this size).
        kv_block / kv_device_blocks: positions per KV block, and full blocks per layer kept
            in the budget (the newest), for a paged cache.
        sparse: ``"bitmap"``: pack the weights whose zeros pay (an already-pruned model) as
            bitmaps, moved compressed and decoded on the compute device; lossless. Pruning
            is a separate, explicit step: ``offload.pack(..., prune=0.5)``. A packed store
            passed as ``model`` is used as it was packed.

    Returns:
        The model, ready to call and ``.generate()`` as before. A model object passed in is
        modified in place: its weights are released and streamed from the store.

    Raises:
        BudgetError, StoreError, ModelError, HardwareError: bad input, with the fix.
    """
    prep = _prepare(model, None, offload_dir, progress, options=PackOptions.make(sparse))
    return run_prepared(prep, budget, device=device, host_budget=host_budget, prefetch=prefetch,
                        max_tokens=max_tokens, experts=experts, predict=predict,
                        predict_depth=predict_depth, predict_width=predict_width,
                        expert_cache=expert_cache, kv=kv, max_context=max_context, batch=batch,
                        prefill_chunk=prefill_chunk, kv_block=kv_block,
                        kv_device_blocks=kv_device_blocks)


def run_prepared(prep: Prepared, budget="25%", *, device=None, host_budget=None, prefetch=None,
                 max_tokens=None, experts="cache", predict=False, predict_depth=1,
                 predict_width=None, expert_cache="lru", kv="auto", max_context=None,
                 batch=1, prefill_chunk=256, kv_block=256,
                 kv_device_blocks=4) -> torch.nn.Module:
    """``run`` for a store already prepared (``_prepare``): plan, build, attach."""
    device = _resolve_device(device)
    options = ExpertOptions(experts, predict, predict_depth, predict_width, expert_cache)
    the_plan = _make_plan(prep, budget, device, prefetch, max_tokens, host_budget, options,
                          KVOptions(kv, max_context, batch, kv_block, kv_device_blocks,
                                    prefill_chunk))
    skeleton = prep.source.module if prep.source.module is not None else \
        build_skeleton(prep.manifest, device)
    prep.adapter.check_model(skeleton)
    old = getattr(skeleton, _ATTR, None)
    if old is not None:
        old.close()
    runtime = Runtime(skeleton, prep.manifest, the_plan, prep.adapter, device)
    setattr(skeleton, _ATTR, runtime)
    skeleton.eval()
    return skeleton


def build_skeleton(manifest: Manifest, device: torch.device) -> torch.nn.Module:
    """The model's modules with parameters on the meta device and real buffers (rotary
    frequencies): the full model never sits in RAM."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = build_config(manifest.config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[manifest.dtype])
    if device.type != "cpu":   # buffers only: parameters stay on meta until bound
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(device)
    return model


def runtime_of(model) -> Runtime:
    rt = getattr(model, _ATTR, None)
    if rt is None:
        raise OffloadError("this model was not made by offload.run()")
    return rt


def stats(model) -> dict:
    """Where the bytes and milliseconds of a model made by ``run`` went.

    Keys: ``budget_bytes``; ``peak_bytes`` (the compute tier's high-water mark: resident Units,
    staging slots, KV cache, activations and scratch, by the runtime's accounting);
    ``allocated_bytes`` (weights buffers actually allocated); ``resident_bytes``,
    ``staging_bytes``, ``kv_bytes``; ``bytes_read`` per tier (``disk``, ``host_to_device``);
    ``direct_io`` (False where the filesystem refused O_DIRECT); ``fetches``; ``io_seconds``
    (wall time with a disk read in flight); ``stall_seconds`` (compute waiting for a Unit);
    ``overlap`` (1 - stall / io: the share of I/O hidden behind compute); ``forwards``,
    ``forward_seconds``, ``prefill_tokens``, ``decode_tokens``, ``decode_seconds``,
    ``tokens_per_s`` (decode tokens over decode time, all sequences of a batch counted);
    ``resyncs`` (pipeline restarts after a failed forward).

    MoE models add ``experts``: ``mode``, and with the expert cache ``slots``, ``protected``,
    ``policy``, ``resident`` (resident experts), ``accesses`` / ``hits`` / ``hit_rate`` (needed
    non-resident experts found in the cache or already on their way), ``on_demand``
    (unpredicted fetches), ``refetches``, ``prefetched`` (guesses read), ``bytes_read``,
    ``bytes_per_token`` (expert bytes read per decoded token), ``wrong_guess_bytes`` (guesses
    read that their layer did not use), ``precision`` / ``recall`` of the prediction (with
    ``tp``, ``fp``, ``fn``), ``stall_seconds``.
    """
    return runtime_of(model).stats()


def close(model) -> None:
    """Stop the runtime behind ``model`` and remove its hooks."""
    runtime_of(model).close()
