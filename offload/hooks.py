"""Attach and detach: how the runtime borrows a model's modules and gives them back.

Decoder layers and norms whose Unit is streamed get a forward pre-hook that waits for the Unit
and binds its tensors as the module's parameters, and a forward hook (always called, also when
forward raises) that unbinds them and releases the slot (``attach_unit``). Row-chunked modules
(embedding, head) and MoE experts get an instance-level forward (``replace_forward``); the model
gets a hook pair around each forward (``wrap_model``) and its ``generate`` a wrapper that sizes
the prefill and the cache to the reserve (``wrap_generate``). Each returns its undo steps, and
``detach`` runs them: every parameter and forward restored; user classes are never patched.
"""
from __future__ import annotations

import bisect
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .kernels import head


def submodule_param(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """``("self_attn.q_proj.weight")`` -> (the q_proj module, ``"weight"``)."""
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def placeholder(p: torch.Tensor, device: torch.device) -> torch.nn.Parameter:
    """A parameter with ``p``'s shape and dtype on ``device`` that holds one element: keeps
    ``model.device``/``dtype`` truthful while the real bytes live elsewhere."""
    one = torch.zeros((), dtype=p.dtype, device=device)
    return torch.nn.Parameter(one.expand(p.shape), requires_grad=False)


class Binding:
    """The parameters of one module that one Unit fills, and their placeholders."""

    def __init__(self, module: torch.nn.Module, names: list[str], device: torch.device):
        self.targets = [submodule_param(module, n) for n in names]
        self.names = names
        params = [m._parameters[a] for m, a in self.targets]
        self.placeholders = [placeholder(p, device) for p in params]
        # What detach restores: the same parameters on the meta device. The real bytes now live
        # in the store, so a model object passed in gives its RAM back instead of keeping it.
        self.originals = [p if p.is_meta else torch.nn.Parameter(p.detach().to("meta"),
                                                                 requires_grad=p.requires_grad)
                          for p in params]

    def bind(self, tensors: dict[str, torch.nn.Parameter]) -> None:
        for (m, a), n in zip(self.targets, self.names):
            m._parameters[a] = tensors[n]

    def unbind(self) -> None:
        for (m, a), p in zip(self.targets, self.placeholders):
            m._parameters[a] = p

    def restore(self) -> None:
        for (m, a), p in zip(self.targets, self.originals):
            m._parameters[a] = p


def attach_unit(module: torch.nn.Module, names: list[str], device: torch.device, *,
                resident: dict | None = None, key: str | None = None,
                acquire: Callable | None = None, release: Callable | None = None
                ) -> list[Callable[[], None]]:
    """Give ``module`` one Unit's tensors as its parameters ``names``: a resident Unit's views
    once, or a streamed Unit's per forward (``acquire(key)`` before, ``release(key)`` after,
    also when the forward raises). Returns the undo steps, to be run in reverse."""
    binding = Binding(module, names, device)
    undo: list[Callable[[], None]] = [binding.restore]
    if resident is not None:
        binding.bind(resident)
        return undo
    binding.unbind()
    hook = StreamedBindHook(key, binding, acquire, release)
    undo.append(module.register_forward_pre_hook(hook.pre_forward).remove)
    undo.append(module.register_forward_hook(hook.post_forward, always_call=True).remove)
    return undo


def replace_forward(module: torch.nn.Module, forward: Callable, names: list[str],
                    device: torch.device) -> list[Callable[[], None]]:
    """Run ``forward`` in place of ``module``'s own (an instance attribute: the class is left
    alone), with its parameters ``names`` replaced by placeholders. Returns the undo steps."""
    binding = Binding(module, names, device)
    binding.unbind()
    module.forward = forward
    return [binding.restore, lambda: module.__dict__.pop("forward", None)]


def wrap_model(model: torch.nn.Module, begin: Callable, end: Callable
               ) -> list[Callable[[], None]]:
    """``begin(module, args, kwargs)`` before every forward of ``model`` and ``end(module,
    args, output)`` after it (also when it raises). Returns the undo steps."""
    return [model.register_forward_pre_hook(begin, with_kwargs=True).remove,
            model.register_forward_hook(end, always_call=True).remove]


def wrap_generate(model: torch.nn.Module, generate: Callable) -> list[Callable[[], None]]:
    """``generate(orig, args, kwargs)`` in place of ``model.generate`` (an instance attribute
    with the original's signature). Returns the undo steps."""
    orig = model.generate

    @functools.wraps(orig)
    def wrapped(*args, **kwargs):
        return generate(orig, args, kwargs)

    model.generate = wrapped
    return [lambda: model.__dict__.pop("generate", None)]


def wrap_forward(model: torch.nn.Module, forward: Callable) -> list[Callable[[], None]]:
    """``forward(orig, args, kwargs)`` in place of ``model.forward`` (an instance attribute,
    run inside ``model.__call__``, so forward hooks still wrap it). Returns the undo steps."""
    orig = model.forward

    @functools.wraps(orig)
    def wrapped(*args, **kwargs):
        return forward(orig, args, kwargs)

    wrapped.offload_wrapper = True
    model.forward = wrapped
    return [lambda: model.__dict__.pop("forward", None)]


def detach(undo: list[Callable[[], None]]) -> None:
    """Run the undo steps of ``attach_unit`` / ``replace_forward`` / ``wrap_model``, last
    first: every hook removed, every parameter and forward restored."""
    for step in reversed(undo):
        step()
    undo.clear()


class StreamedBindHook:
    """pre_forward: wait for the Unit and bind it; post_forward: unbind and release.

    A module may also bind it around a call of its own (``enter``, then ``exit`` also when the
    call raises): ``kernels.layer`` binds a layer's streamed parts before running the layer as
    one kernel road. ``binds_unit`` marks the hook as this kind for such a module.
    """

    binds_unit = True

    def __init__(self, key: str, binding: Binding, acquire: Callable, release: Callable):
        self.key, self.binding = key, binding
        self._acquire, self._release = acquire, release

    def enter(self) -> None:
        self.binding.bind(self._acquire(self.key))

    def exit(self) -> None:
        self.binding.unbind()
        self._release(self.key)

    def pre_forward(self, module, args):
        self.enter()

    def post_forward(self, module, args, output):
        self.exit()


# Ids an embedding's forward looks up one by one (a decode step's batch), not by masks.
FEW_IDS = 16


def embedding_forward(chunks: list[tuple[str, tuple[int, int]]], hidden: int, dtype, device,
                      resident: dict, gather: Callable,
                      decode_rows: Callable | None = None) -> Callable:
    """A forward for an embedding whose rows live in chunks: resident chunks are indexed in
    memory; for the others ``gather(key, rows)`` reads just the rows the ids name. A resident
    chunk kept in GGUF blocks (``compute="fast"``: uint8 rows of blocks) has the rows the ids
    name decoded by ``decode_rows(blocks)``."""

    starts = torch.tensor([start for _, (start, _) in chunks], device=device)
    bounds = starts.tolist()

    def few(ids: torch.Tensor) -> torch.Tensor | None:
        """A decode step's few ids on the CPU, row by row from resident chunks (a dozen torch
        calls fewer than the masks: SmolLM2's embedding in a decode step 0.33 -> 0.17 ms
        here, 0.02 ms called alone); None where an id is not in a resident chunk's rows (the
        masked road below)."""
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), hidden, dtype=dtype, device=device)
        for i, t in enumerate(flat):
            key, (start, stop) = chunks[max(0, bisect.bisect_right(bounds, t) - 1)]
            views = resident.get(key)
            if views is None or not start <= t < stop:
                return None
            weight = views["weight"]
            out[i] = (weight[t - start] if weight.dtype != torch.uint8
                      else decode_rows(weight[t - start:t - start + 1])[0])
        return out.view(*ids.shape, hidden)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        if ids.device.type == "cpu" and ids.numel() <= FEW_IDS:
            out = few(ids)
            if out is not None:
                return out
        out = torch.empty(*ids.shape, hidden, dtype=dtype, device=device)   # [B, T, H]
        for key, (start, stop) in _chunks_hit(ids, chunks, starts):
            hit = (ids >= start) & (ids < stop)
            views = resident.get(key)
            if views is not None:
                weight = views["weight"]
                out[hit] = F.embedding(ids[hit] - start, weight) if weight.dtype != torch.uint8 \
                    else decode_rows(weight[ids[hit] - start])
                continue
            wanted = ids[hit]
            if wanted.numel():
                rows, inverse = torch.unique(wanted - start, return_inverse=True)
                out[hit] = gather(key, rows)[inverse]
        return out

    return forward


def _chunks_hit(ids: torch.Tensor, chunks: list, starts: torch.Tensor) -> list:
    """The chunks some id falls in (a decode step: one of ~50 for a 49k vocabulary); on a
    GPU every chunk (knowing which would sync the host on the ids)."""
    if ids.device.type != "cpu":
        return chunks
    present = torch.unique(torch.bucketize(ids.contiguous(), starts, right=True) - 1)
    return [chunks[i] for i in present.tolist()]


# Linear layers a model calls one after another on the same input: the fused kernel runs
# each such set, where all are kept in GGUF blocks of one type, as one call (``fused_group``).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_group(modules: list[torch.nn.Module], group: Callable, matmul: Callable
                ) -> list[Callable[[], None]]:
    """Like ``kernels.layer.fused_linear`` for ``modules`` (siblings: the same input, one weight
    type): the first of them called multiplies all their weights at once (``group(x,
    weights)``, None for a prefill) and keeps the others' outputs for their own calls on that
    same input (the same tensor, unmodified); a call on any other input multiplies its own
    weight alone (``matmul``). Returns the undo steps."""
    kept: dict[int, torch.Tensor] = {}
    state: dict = {"x": None, "version": -1}

    def forward_of(i: int, module: torch.nn.Module) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if state["x"] is x and state["version"] == x._version and i in kept:
                y = kept.pop(i)
                if not kept:
                    state["x"] = None
            else:
                kept.clear()
                state["x"] = None
                ys = group(x, [m._parameters["weight"] for m in modules])
                if ys is None:
                    y = matmul(x, module._parameters["weight"])
                else:
                    y = ys[i]
                    kept.update((j, o) for j, o in enumerate(ys) if j != i)
                    state["x"], state["version"] = x, x._version
            bias = module._parameters.get("bias")
            return y if bias is None else y.add_(bias)
        return forward

    for i, module in enumerate(modules):
        module.forward = forward_of(i, module)

    def undo() -> None:
        kept.clear()
        state["x"] = None
        for module in modules:
            module.__dict__.pop("forward", None)
    return [undo]


def linear_forward(chunks: list[tuple[str, tuple[int, int]]], rows: int, acquire: Callable,
                   release: Callable, *, fold: bool = True, half_paths="auto",
                   whole: torch.Tensor | None = None,
                   matmul: Callable | None = None) -> Callable:
    """A forward for a bias-free linear whose output rows live in chunks (the LM head).

    ``fold``: the model's own weight required grad. torch's CPU linear then folds a strided
    3-D input (generate's ``h[:, -1:, :]``) into a contiguous 2-D matrix before its matmul, and
    otherwise runs another kernel with other rounding: the streamed head's weight views never
    require grad, so the fold is done here to give the model's own bits.
    ``half_paths``: how an unfolded half-precision input is computed without torch's per-row
    weight copies (``kernels.head.HalfPaths``); ``"auto"``: ``head.choose`` on this CPU.
    ``whole``: the whole ``[rows, H]`` weight, when every chunk is resident and contiguous:
    one matmul of the model's own shape, so its bits are the model's whatever the BLAS does
    with a smaller problem (``kernels.head.chunking_mismatches``).
    ``matmul``: ``matmul(h, weight)`` for a weight kept in GGUF blocks (``compute="fast"``)
    instead of torch's linear."""

    def forward(h: torch.Tensor) -> torch.Tensor:
        if fold and h.dim() > 2:   # torch folds every input when the weight requires grad
            return forward(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], rows)
        if matmul is not None:
            return fused(h)
        strided_half = head.needs_choice(h)
        if strided_half:
            paths = head.choose(h.dtype, h.shape[-1]) if half_paths == "auto" else half_paths
            path = paths.for_batch(h.shape[0])
        if whole is not None:
            return head.linear(h, whole, path) if strided_half else F.linear(h, whole)
        out = torch.empty(*h.shape[:-1], rows, dtype=h.dtype, device=h.device)   # [B, T, V]
        for key, (start, stop) in chunks:
            weight = acquire(key)["weight"]
            try:
                if strided_half:
                    head.linear(h, weight, path, out=out[..., start:stop])
                else:
                    out[..., start:stop] = F.linear(h, weight)
            finally:
                release(key)
        return out

    def fused(h: torch.Tensor) -> torch.Tensor:
        if whole is not None:
            return matmul(h, whole)
        out = torch.empty(*h.shape[:-1], rows, dtype=h.dtype, device=h.device)   # [B, T, V]
        for key, (start, stop) in chunks:
            try:
                out[..., start:stop] = matmul(h, acquire(key)["weight"])
            finally:
                release(key)
        return out

    return forward
