"""Take over models loaded with Hugging Face Accelerate, by changing one line.

``from_accelerate(model)`` takes a model Accelerate already dispatched (``from_pretrained(...,
device_map=..., offload_folder=...)``, ``dispatch_model``, ``disk_offload``, ``cpu_offload``):
it reads each weight from wherever Accelerate keeps it (the module, its offload folder's
``.dat`` files, or the checkpoint's safetensors that Accelerate's index points at: nothing is
saved again by the user), removes every Accelerate hook, packs offload's store once (reused
by later runs while the weights are unchanged) and installs offload's pipeline.

``dispatch_model`` accepts Accelerate's ``dispatch_model`` arguments and does the same for a
model not yet dispatched. ``infer_device_map`` states an offload Plan in Accelerate's
``device_map`` format.
"""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import torch

from ..errors import HardwareError, ModelError, StoreError
from ..store.sources import Source, _config_json

__all__ = ["dispatch_model", "from_accelerate", "infer_device_map"]


def from_accelerate(model: torch.nn.Module, budget=None, *, offload_dir=None,
                    **run_kwargs) -> torch.nn.Module:
    """Replace Accelerate's per-module hooks on ``model`` with offload's pipeline.

    Args:
        model: a transformers model dispatched by Accelerate (it has ``_hf_hook`` modules).
        budget: offload's compute-tier budget; default: the bytes Accelerate kept on the
            execution device (its ``"cpu"`` entries on a CPU machine, its GPU entries on a GPU).
        offload_dir: where offload's packed store goes (default: ``offload-store`` inside
            Accelerate's offload folder when it has one, else offload's default).
        run_kwargs: passed to ``offload.run`` (``max_tokens``, ``prefetch``, ``device`` ...).

    Returns:
        The same model object, now run by offload (``offload.stats(model)`` works).

    Raises:
        ModelError: the model has no Accelerate hooks, or a weight is on the meta device with
            no Accelerate weights map holding it (named).
        StoreError: a weight missing from Accelerate's offload folder (the module is named).
    """
    hooked = [name for name, m in model.named_modules() if hasattr(m, "_hf_hook")]
    if not hooked:
        raise ModelError("from_accelerate: this model has no Accelerate hooks; pass a model "
                         "loaded with device_map=... (or use offload.run(model) directly)")
    source, placed, weights = _accelerate_source(model)
    if budget is None:
        budget = _bytes_on_execution_device(model, placed)
    run_kwargs.setdefault("device", _hook_device(model))
    if offload_dir is None:
        folder = _offload_folder(model)
        offload_dir = os.path.join(folder, "offload-store") if folder else None
    return _run(source, model, budget, offload_dir, run_kwargs, weights,
                before=lambda: remove_hooks(model))


def dispatch_model(model: torch.nn.Module, device_map: dict, main_device=None, state_dict=None,
                   offload_dir=None, offload_index=None, offload_buffers: bool = False,
                   skip_keys=None, preload_module_classes=None, force_hooks: bool = False, *,
                   offload_folder=None, budget=None, **run_kwargs) -> torch.nn.Module:
    """Accelerate's ``dispatch_model`` signature, run by offload instead of per-module hooks.

    The ``device_map`` is checked (every device exists, every module with weights is
    covered, every ``"disk"`` weight is in ``offload_dir`` / ``offload_folder`` or
    ``state_dict``); the weights are then read from where the map says they are. ``budget``
    defaults to the bytes the map puts on the execution device. ``offload_buffers``,
    ``skip_keys``, ``preload_module_classes`` and ``force_hooks`` concern Accelerate's hooks
    and are accepted for compatibility; offload installs none of them.

    Raises:
        HardwareError: a device in the map does not exist on this machine (module named).
        ModelError: a module with weights is missing from the map (module named).
        StoreError: a ``"disk"`` weight is missing from the offload folder (module named).
    """
    folder = offload_folder or offload_dir
    check_device_map(model, device_map)
    weights = _weights_from_map(model, device_map, folder, offload_index, state_dict)
    if budget is None:
        budget = _map_bytes(model, device_map, _execution_device(device_map, main_device))
    run_kwargs.setdefault("device", _execution_device(device_map, main_device))
    source = _source(model, weights, _fingerprint(model, weights), "Accelerate-mapped")
    store_dir = os.path.join(folder, "offload-store") if folder else None
    return _run(source, model, budget, store_dir, run_kwargs, weights)


def infer_device_map(model, budget, *, offload_dir=None, **plan_kwargs) -> dict[str, str | int]:
    """offload's Plan for ``model`` at ``budget`` in Accelerate's ``device_map`` format.

    Each module that holds weights maps to the compute device (``"cpu"`` or a GPU index) when
    its Units are resident, ``"cpu"`` when they live in pinned host RAM, ``"disk"`` when they
    stream from the store; a module split over several Units (a row-chunked head) is
    ``"disk"`` if any part streams. Packs the store if needed (like ``offload.plan``).
    """
    from .. import api

    prep = api.prepare(model, offload_dir=offload_dir)
    plan = api.make_plan(prep, budget, api.Request.of(plan_kwargs))
    device = "cpu" if plan.device == "cpu" else (torch.device(plan.device).index or 0)
    tier = {"device": device, "host": "cpu", "disk": "disk"}
    home = plan.home
    skeleton = prep.source.module if prep.source.module is not None else \
        api.build_skeleton(prep.manifest, torch.device("cpu"))
    names = {id(m): n for n, m in skeleton.named_modules()}
    groups = prep.manifest.groups()
    out: dict[str, str | int] = {}
    for key, module in prep.adapter.bind_points(skeleton).items():
        if key in home:
            _merge(out, names[id(module)], tier[home[key]])
    for group, (module, _) in prep.adapter.row_points(skeleton).items():
        for k in groups.get(prep.manifest.tied.get(group, group), []):
            _merge(out, names[id(module)], tier[home[k]])
    if hasattr(prep.adapter, "expert_points"):
        for i, module in prep.adapter.expert_points(skeleton).items():
            for u in prep.manifest.units:
                if u.kind == "expert" and u.index == i:
                    _merge(out, names[id(module)], tier[home.get(u.key, "disk")])
    return out


def _merge(out: dict, name: str, where) -> None:
    if out.get(name) == "disk" or where == "disk":
        out[name] = "disk"
    elif name not in out or out[name] == "cpu":
        out[name] = where


# -- reading weights where Accelerate keeps them ----------------------------------------------
def _accelerate_source(model) -> tuple[Source, dict[str, str], dict]:
    """A Source over the weights of an Accelerate-dispatched model, where each one is
    (``module`` or ``folder``), and the loaders the Source reads through."""
    loaders = {}
    for name, module in model.named_modules():
        for hook in _hooks(module):
            wm = getattr(hook, "weights_map", None)
            if wm is not None:
                loaders[id(getattr(wm, "dataset", wm))] = getattr(wm, "dataset", wm)
    weights, placed = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_meta:
            weights[name] = (lambda t=t: t.detach().to("cpu"))
            placed[name] = "module"
            continue
        loader = next((ld for ld in loaders.values() if _holds(ld, name)), None)
        if loader is None:
            raise ModelError(f"{_module_of(name)}: weight {name} is on the meta device and no "
                             "Accelerate weights map holds it; load the model again with its "
                             "offload_folder")
        weights[name] = (lambda ld=loader, name=name: _load_offloaded(ld, name))
        placed[name] = "folder"
    source = _source(model, weights, _fingerprint(model, weights, loaders),
                     "Accelerate-dispatched")
    return source, placed, weights


def _source(model, weights: dict, fp: str, how: str) -> Source:
    """A Source reading each weight through ``weights[name]()``."""
    return Source(name=f"{model.config.model_type}-accelerate-{fp[:12]}",
                  description=f"{how} {type(model).__name__}", config=model.config,
                  fingerprint=fp, shapes=lambda: _shapes(model),
                  load=lambda name: weights[name](), module=model)


def _hooks(module):
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _holds(loader, name: str) -> bool:
    try:
        return name in loader.state_dict or name in loader.index
    except AttributeError:
        return name in loader


def _load_offloaded(loader, name: str) -> torch.Tensor:
    """``name`` from an Accelerate weights map: an ``OffloadedWeightsLoader`` (a state dict in
    memory, an index of ``.dat`` or safetensors files) or ``cpu_offload``'s plain state dict."""
    if not hasattr(loader, "index") and not hasattr(loader, "state_dict"):
        return loader[name].detach().to("cpu")   # cpu_offload: the weights in a dict
    info = getattr(loader, "index", {}).get(name, {})
    path = info.get("safetensors_file") or os.path.join(getattr(loader, "save_folder", "") or "",
                                                         f"{name}.dat")
    if name not in getattr(loader, "state_dict", {}) and not os.path.isfile(path):
        raise StoreError(f"{_module_of(name)}: weight {name} is missing from Accelerate's "
                         f"offload folder ({path} does not exist); load the model again so "
                         "Accelerate writes it", path=path)
    return loader[name].detach().to("cpu")


def _module_of(name: str) -> str:
    return f"module {name.rsplit('.', 1)[0]}"


def _fingerprint(model, weights: dict, loaders: dict | None = None) -> str:
    """Config, names, shapes and dtypes, the CRC of weights in memory and the size and mtime
    of files Accelerate reads (a full pass over offloaded weights would cost a pack)."""
    h = hashlib.sha256(_config_json(model.config).encode())
    state = model.state_dict(keep_vars=True)
    for name in sorted(weights):
        t = state[name]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if not t.is_meta:
            h.update(zlib.crc32(t.detach().cpu().contiguous().reshape(-1)
                                .view(torch.uint8).numpy()).to_bytes(4, "little"))
    for loader in (loaders or {}).values():
        files = {v.get("safetensors_file") for v in getattr(loader, "index", {}).values()}
        folder = getattr(loader, "save_folder", None)
        if folder and os.path.isdir(folder):
            files |= {str(p) for p in Path(folder).glob("*.dat")}
        for f in sorted(x for x in files if x):
            st = os.stat(f)
            h.update(f"{f}{st.st_size}{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _hook_device(model) -> torch.device:
    """Where Accelerate ran the model: its hooks' execution device."""
    for _, module in model.named_modules():
        for hook in _hooks(module):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu")


def _offload_folder(model) -> str | None:
    for _, module in model.named_modules():
        for hook in _hooks(module):
            wm = getattr(hook, "weights_map", None)
            folder = getattr(getattr(wm, "dataset", wm), "save_folder", None)
            if folder:
                return str(folder)
    return None


def _bytes_on_execution_device(model, placed: dict) -> int:
    state = model.state_dict(keep_vars=True)
    total = sum(state[k].numel() * state[k].element_size() for k, w in placed.items()
                if w == "module")
    if total == 0:
        raise ModelError("Accelerate kept no weights on the execution device; pass budget=")
    return total


def remove_hooks(model) -> None:
    """Take every Accelerate hook off ``model`` without loading offloaded weights back.

    Accelerate's own ``remove_hook_from_module`` calls each hook's ``detach_hook``, which
    reads every offloaded weight back into memory (the whole disk part of the model, at once).
    This does what it does otherwise: restore ``forward``, drop the hook and the device-moving
    overrides ``dispatch_model`` added.
    """
    try:   # accelerate < 1.16 lists the attributes; later ones mark each added value
        from accelerate.hooks import _accelerate_added_attributes as listed
    except ImportError:
        listed = ()

    for module in model.modules():
        module.__dict__.pop("_hf_hook", None)
        old = module.__dict__.pop("_old_forward", None)
        if old is not None and getattr(old, "__func__", None) is not type(module).forward:
            module.forward = old   # a forward the user set before Accelerate wrapped it
        else:
            module.__dict__.pop("forward", None)
        marked = [name for name, value in module.__dict__.items()
                  if getattr(value, "_accelerate_added_attribute", False)]
        for attr in (*listed, *marked):
            module.__dict__.pop(attr, None)
    model.__dict__.pop("hf_device_map", None)


def _run(source: Source, model, budget, offload_dir, run_kwargs, weights: dict, before=None):
    from .. import api

    # Packed first, with Accelerate's hooks still on: a weight missing from its folder fails
    # here and leaves the user's model as it was.
    progress = run_kwargs.pop("progress", True)
    request = api.Request.of(run_kwargs)   # a bad option: refused before anything moves
    prep = api.prepare(source, offload_dir=offload_dir, progress=progress)
    if before is not None:
        before()
    # Accelerate's copies of the weights go before offload allocates its budget: the store
    # holds them now, and the process must not hold both.
    weights.clear()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)
    return api.run_prepared(prep, budget, request)


# -- a device_map before Accelerate sees it -----------------------------------------------------
def check_device_map(model, device_map: dict) -> None:
    """Every device exists and every module holding weights is covered.

    Raises:
        HardwareError: a device this machine lacks (the module is named).
        ModelError: a module with weights that no entry covers (named), or an entry naming a
            module the model does not have.
    """
    modules = dict(model.named_modules())
    for name, device in device_map.items():
        if name and name not in modules:
            raise ModelError(f"device_map names module {name!r}, which this "
                             f"{type(model).__name__} does not have")
        _check_device(name or "(the whole model)", device)
    for pname, _ in model.state_dict(keep_vars=True).items():
        if _entry_for(device_map, pname) is None:
            raise ModelError(f"{_module_of(pname)} holds weights but is missing from the "
                             f"device_map: add it or a parent (e.g. {{'{_module_of(pname)[7:]}'"
                             ": 'disk'}})")


def _check_device(name: str, device) -> None:
    if device in ("cpu", "disk", "meta"):
        return
    try:
        d = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type != "cuda":
        raise HardwareError(f"device_map puts {name} on {device!r}: offload runs on 'cpu', "
                            "'disk' and CUDA GPUs")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (d.index or 0) >= count:
        raise HardwareError(f"device_map puts {name} on {device!r}, but this machine has "
                            f"{count} CUDA GPU(s); map it to 'cpu' or 'disk'")


def _entry_for(device_map: dict, pname: str):
    best = None
    for name, device in device_map.items():
        if name == "" or pname == name or pname.startswith(name + "."):
            if best is None or len(name) > len(best[0]):
                best = (name, device)
    return best


def _execution_device(device_map: dict, main_device) -> torch.device:
    if main_device is not None:
        return torch.device(main_device)
    gpus = [d for d in device_map.values() if d not in ("cpu", "disk", "meta")]
    if gpus:
        return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0])
    return torch.device("cpu")


def _map_bytes(model, device_map: dict, device: torch.device) -> int:
    """Bytes of the weights ``device_map`` puts on the execution device ``device``."""
    def on_device(where) -> bool:
        if device.type == "cpu":
            return where == "cpu"
        return where not in ("cpu", "disk", "meta")

    return sum(t.numel() * t.element_size()
               for name, t in model.state_dict(keep_vars=True).items()
               if on_device(_entry_for(device_map, name)[1]))


def _weights_from_map(model, device_map, folder, offload_index, state_dict) -> dict:
    from accelerate.utils import OffloadedWeightsLoader

    index = offload_index
    if index is None and folder and os.path.isfile(os.path.join(folder, "index.json")):
        import json

        index = json.loads(Path(folder, "index.json").read_text())
    loader = OffloadedWeightsLoader(state_dict=state_dict or {}, save_folder=folder,
                                    index=index or {}) if (folder or state_dict) else None
    weights = {}
    for pname, t in model.state_dict(keep_vars=True).items():
        _, where = _entry_for(device_map, pname)
        if where == "disk" or t.is_meta:
            if loader is None or not _holds(loader, pname):
                raise StoreError(f"{_module_of(pname)} is mapped to {where!r} but its weight "
                                 f"{pname} is not in the offload folder "
                                 f"{folder or '(none given)'} or state_dict; pass "
                                 "offload_folder= (where Accelerate offloaded it)",
                                 path=str(folder))
            weights[pname] = (lambda n=pname: _load_offloaded(loader, n))
        else:
            weights[pname] = (lambda t=t: t.detach().to("cpu"))
    return weights


def _shapes(model) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict(keep_vars=True).items()}
