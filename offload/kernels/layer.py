"""A Llama decoder layer's decode step in two kernel calls, or one over the runtime's own KV
cache (``compute="fast"``).

With the products fused (``qmatmul``), what is left of a small model's decode step is the
framework: some twenty torch and module calls per layer at a few microseconds each (SmolLM2-135M:
about 5 ms of a 14 ms step). ``attach`` gives a Llama decoder layer whose seven linear layers
are all kept in GGUF blocks forwards that run a decode step (up to ``qmatmul.INT_ROWS`` rows) as

1. ``offload_llama_attn_in``: RMS norm, the q, k and v products, the rotary embedding;
2. the KV cache's ``update`` and the model's own attention function (sdpa: torch's call made
   here for one query position; other implementations and longer queries: the model's function
   with its masks);
3. ``offload_llama_attn_out_mlp``: the o product and the residual, RMS norm, gate and up,
   SiLU times up, the down product and the residual.

Where the cache is the runtime's own, written in place (``adapters/kvbuffer.py``: every
``compute="fast"`` plan's), a step of one position per sequence under the model's sdpa or eager
attention (no mask, or a boolean one: padding) is all three in one call,
``offload_llama_layer_step``: the new keys and values written into the cache's buffers and the
attention computed in C (``csrc/attention.h``; grouped heads, float32, the same bits at every
CPU level). SmolLM2-135M resident, 2 cores: a decode step 7.9 -> 6.4-7.0 ms (p50; the
cache's update and torch's attention were some 40 us of each layer's 0.26 ms).

Where every layer of a ``LlamaModel`` has these forwards under sdpa, ``attach_model`` gives the
model a forward for such a decode step that calls no layer module at all: the embedding, the
rotary rows and the padding flags once, then ``offload_llama_layers_step`` over each run of
layers all resident (one C call for the whole stack of a resident model), a layer with streamed
parts in a call of its own (its binders entered around it, the pipeline's order), a layer it
cannot bind through its module as below, and the last norm in C too.
SmolLM2-135M resident, 2 cores: a decode step 8.5 -> 5.3-5.5 ms with the kernels' prefetch
(module calls, hook checks and transformers' mask and slicing were some 1.4 ms of it).

That merged road needs every weight of the layer bound when the layer is called: the layer
resident, streamed as one Unit, or its parts streamed as Units of their own whose only hooks are
the runtime's binders (``hooks.StreamedBindHook``): the layer binds those first, in the order its
parts would be called (the order they stream in), at most ``hold`` of them (the pipeline's slots).
Where a part has another hook (a user's) or more parts stream than that, the layer's own forward
runs and calls its parts, which ``attach`` also replaces: the norms by ``offload_rms_norm``, the
attention by steps 1-2 and the o product, the MLP by gate, up, ``offload_silu_mul`` and down, each
part bound by its hooks as it is called (SmolLM2 with every other ``down`` streamed: 0.47 ms a
layer part by part, 0.31 ms merged). Both roads do the same arithmetic in the same order (the same
C functions, the residual sums commuted), so a layer gives the same bits resident or streamed.

Lossy as every ``fast`` product (activations rounded to 8 bits per block), and the norms and
SiLU in float32 C in another order than torch's: not bitwise ``exact`` (``tests/test_fast.py``
measures its agreement and perplexity against it).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import operator
import sys
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

from . import cpu, gguf, qmatmul

# Layer classes whose forward ``attach`` replaces (it does what theirs does), and the model
# types whose layers are of them (for the planner: ``family_key``).
CLASSES = ("LlamaDecoderLayer",)
FAMILIES = ("llama",)
# Caches whose ``update(key, value, layer_idx)`` needs nothing more (a static cache needs the
# positions: those steps take the model's own forwards).
CACHES = ("DynamicCache", "PagedKVCache")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# An attention's keyword arguments that are not passed on to the attention function.
_OWN_ARGS = ("hidden_states", "cache", "past_key_values", "position_embeddings",
             "attention_mask")


def _library():
    lib = qmatmul._library()
    if lib is not None and not hasattr(lib, "_offload_layer"):
        p, i64, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.offload_llama_attn_in.argtypes = [p, p, p, i64, p, i64, p, f, p, p, i64, p, p, p, p,
                                              i]
        lib.offload_llama_attn_out_mlp.argtypes = [p, p, p, i64, i64, i64, p, p, i64, p, f, p,
                                                   p, i]
        lib.offload_rms_norm.argtypes = [p, i64, i64, p, f, p]
        lib.offload_rms_norm.restype = None
        lib.offload_silu_mul.argtypes = [p, p, i64]
        lib.offload_silu_mul.restype = None
        lib.offload_llama_attend.argtypes = [p, p, p, i64, i64, i64, i64, p, p, i64, i64, i64,
                                             p, i64, f, p, p, i]
        lib.offload_llama_layer_step.argtypes = [ctypes.POINTER(LayerSpec), p, i64, p, p, p, p,
                                                 i64, i64, i64, p, i64, p, p, i]
        lib.offload_llama_layers_step.argtypes = [p, i64, p, i64, p, p, p, p, p, p, p, p, i64,
                                                  p, p, i]
        lib._offload_layer = True
    return lib


class LayerSpec(ctypes.Structure):
    """``csrc/gguf_matmul_cpu.cpp``'s ``LlamaLayer``: a layer's weights and constants for
    ``offload_llama_layer_step`` (the pointers set per call: a streamed Unit binds others)."""
    _fields_ = [("types", ctypes.c_int * 7), ("rows", ctypes.c_int64 * 7),
                ("ws", ctypes.c_void_p * 7), ("norms", ctypes.c_void_p * 2),
                ("eps", ctypes.c_float * 2), ("hidden", ctypes.c_int64),
                ("inter", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("scale", ctypes.c_float)]


def linears(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The seven linear layers of an ``eligible`` layer: q, k, v, o, gate, up, down."""
    return [getattr(layer.self_attn, n) for n in _ATTN] + [getattr(layer.mlp, n) for n in _MLP]


def eligible(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` is a decoder layer ``attach`` computes as its class does: a Llama
    layer with bias-free projections, SiLU gating and no extra norms."""
    if type(layer).__name__ not in CLASSES:
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or getattr(attn, "q_norm", None) is not None:
        return False
    mods = [getattr(attn, n, None) for n in _ATTN] + [getattr(mlp, n, None) for n in _MLP]
    if any(not isinstance(m, torch.nn.Linear) or m.bias is not None for m in mods):
        return False
    config = getattr(attn, "config", None)
    return (getattr(config, "hidden_act", None) == "silu"
            and getattr(config, "pretraining_tp", 1) == 1
            and all(hasattr(n, "variance_epsilon")
                    for n in (layer.input_layernorm, layer.post_attention_layernorm)))


@functools.lru_cache(maxsize=None)
def _functions():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def _attention(attn: torch.nn.Module) -> Callable:
    """The model's own attention function for ``attn`` (as its forward looks it up)."""
    impl = attn.config._attn_implementation
    if impl in (None, "eager"):
        return sys.modules[type(attn).__module__].eager_attention_forward
    return _functions()[impl]


def _rms_norm(lib, x: torch.Tensor, weight: torch.Tensor, eps: float, hidden: int
              ) -> torch.Tensor:
    """``offload_rms_norm`` of ``x`` (float32 rows of ``hidden``) with ``weight``."""
    out = torch.empty_like(x)
    lib.offload_rms_norm(x.data_ptr(), x.numel() // hidden, hidden, weight.data_ptr(), eps,
                         out.data_ptr())
    return out


def _float_rows(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


class DecoderKernels:
    """The kernel calls for one layer (the pool, the CPU path and the ctypes arrays made once;
    the weights' addresses read per call: a streamed Unit binds other buffers)."""

    def __init__(self, layer: torch.nn.Module, pool: qmatmul.Pool | None, types: dict,
                 isa: str | None = None):
        attn, mlp = layer.self_attn, layer.mlp
        self.linears = linears(layer)
        self.norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self.head_dim, self.layer_idx = attn.head_dim, attn.layer_idx
        self.hidden, self.inter = attn.q_proj.in_features, mlp.gate_proj.out_features
        self.rows = [m.out_features for m in self.linears]
        self.width = attn.o_proj.in_features
        self._cols = [self.hidden] * 3 + [self.width] + [self.hidden] * 2 + [self.inter]
        self._qtypes = [types[id(m)] for m in self.linears]
        lib = _library()
        self._lib = lib
        self._pool = pool.handle if pool is not None else None
        self._level = cpu.level(isa)
        codes = [gguf.TYPES[q][0] for q in self._qtypes]
        self._in_types = (ctypes.c_int * 3)(*codes[:3])
        self._out_types = (ctypes.c_int * 4)(*codes[3:])
        self._in_rows = (ctypes.c_int64 * 3)(*self.rows[:3])
        self._out_rows = (ctypes.c_int64 * 4)(*self.rows[3:])
        self._in_ws, self._out_ws = (ctypes.c_void_p * 3)(), (ctypes.c_void_p * 4)()
        self._eps = [float(n.variance_epsilon) for n in self.norms]
        self._checked: list = [None] * 9
        self.heads, self.kv_heads = self.rows[0] // self.head_dim, self.rows[1] // self.head_dim
        self._scale = float(attn.scaling)
        self._spec = LayerSpec(types=(ctypes.c_int * 7)(*codes),
                               rows=(ctypes.c_int64 * 7)(*self.rows),
                               eps=(ctypes.c_float * 2)(*self._eps), hidden=self.hidden,
                               inter=self.inter, head_dim=self.head_dim, scale=self._scale)
        self._spec_ptr = ctypes.pointer(self._spec)
        self._bound: list = [None] * 9   # the tensors whose addresses _spec holds

    def weights(self, which=range(9)) -> list[torch.Tensor] | None:
        """The seven linears' weights and the two norms' as bound now, or None where one of
        ``which`` is not blocks of its type and shape or a norm's not float32 (its Unit not
        bound: a placeholder). Tensors checked before are not checked again (a resident
        layer's, every step)."""
        ws = [m._parameters["weight"] for m in self.linears] + \
            [n._parameters["weight"] for n in self.norms]
        for i in which:
            w = ws[i]
            if w is self._checked[i]:
                continue
            if i < 7:
                ok = (w.dtype == torch.uint8 and w.dim() == 2 and w.shape[0] == self.rows[i]
                      and w.is_contiguous()
                      and qmatmul.cols_of(self._qtypes[i], w.shape[1]) == self._cols[i])
            else:
                ok = _float_rows(w) and tuple(w.shape) == (self.hidden,)
            if not ok:
                return None
            self._checked[i] = w
        return ws

    def attn_in(self, ws, x, cos, sin, norm: bool = True):
        """x: float32 [m, hidden] contiguous; cos, sin: [m, head_dim] -> q, k, v [m, rows]
        (``norm``: x goes through the input norm first)."""
        m = x.shape[0]
        q, k, v = (torch.empty(m, n, dtype=torch.float32) for n in self.rows[:3])
        for i in range(3):
            self._in_ws[i] = ws[i].data_ptr()
        self._check(self._lib.offload_llama_attn_in(
            self._in_types, self._in_ws, self._in_rows, self.hidden, x.data_ptr(), m,
            ws[7].data_ptr() if norm else None, self._eps[0], cos.data_ptr(), sin.data_ptr(),
            self.head_dim, q.data_ptr(), k.data_ptr(), v.data_ptr(), self._pool, self._level))
        return q, k, v

    def attn_out_mlp(self, ws, attn, x):
        """attn: [m, width], x: [m, hidden] (float32, contiguous) -> the layer's output."""
        out = torch.empty_like(x)
        for i in range(4):
            self._out_ws[i] = ws[3 + i].data_ptr()
        self._check(self._lib.offload_llama_attn_out_mlp(
            self._out_types, self._out_ws, self._out_rows, self.hidden, self.inter, self.width,
            attn.data_ptr(), x.data_ptr(), x.shape[0], ws[8].data_ptr(), self._eps[1],
            out.data_ptr(), self._pool, self._level))
        return out

    def attend(self, q, k, v, room, mask):
        """q: [b, heads * head_dim], k, v: [b, kv_heads * head_dim] (one position per
        sequence, float32, contiguous) written into ``room`` (``BufferLayer.room``'s key and
        value buffers and position), ``mask``: ``step_mask``'s -> the attention [b, width]."""
        kb, vb, pos = room
        out = torch.empty_like(q)
        flags, stride = mask
        self._check(self._lib.offload_llama_attend(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), q.shape[0], self.heads, self.kv_heads,
            self.head_dim, kb.data_ptr(), vb.data_ptr(), kb.stride(0), kb.stride(1), pos,
            None if flags is None else flags.data_ptr(), stride, self._scale, out.data_ptr(),
            self._pool, self._level))
        return out

    def bind(self, ws) -> None:
        """Point the layer's ``LayerSpec`` at ``ws`` (``weights``'s), where they are not the
        tensors it points at already (a streamed Unit bound anew)."""
        if any(w is not b for w, b in zip(ws, self._bound)):
            spec = self._spec
            spec.ws[:] = [w.data_ptr() for w in ws[:7]]
            spec.norms[:] = [ws[7].data_ptr(), ws[8].data_ptr()]
            self._bound = ws

    def step(self, ws, x, cos, sin, room, mask):
        """A decode step of the whole layer for x: [b, hidden] (one position per sequence,
        float32, contiguous): ``attn_in``, ``attend`` and ``attn_out_mlp`` in one call, the
        same arithmetic -> the layer's output [b, hidden]."""
        kb, (flags, stride) = room[0], mask
        self.bind(ws)
        out = torch.empty_like(x)
        self._check(self._lib.offload_llama_layer_step(
            self._spec_ptr, x.data_ptr(), x.shape[0], cos.data_ptr(), sin.data_ptr(),
            kb.data_ptr(), room[1].data_ptr(), kb.stride(0), kb.stride(1), room[2],
            None if flags is None else flags.data_ptr(), stride, out.data_ptr(), self._pool,
            self._level))
        return out

    def norm(self, which: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Norm ``which`` (0: input, 1: post-attention) of ``x`` (float32 rows)."""
        return _rms_norm(self._lib, x, weight, self._eps[which], self.hidden)

    def silu_mul(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """silu(g) * u into g (float32, contiguous, the same shape)."""
        self._lib.offload_silu_mul(g.data_ptr(), u.data_ptr(), g.numel())
        return g

    def _check(self, code: int) -> None:
        if code:
            raise ValueError(f"the fused layer kernel refused layer {self.layer_idx} "
                             f"(code {code}): types {self._qtypes}, rows {self.rows}, "
                             f"head_dim {self.head_dim}")


def attach(layer: torch.nn.Module, kernels: DecoderKernels, hold: int = 0,
           roads: dict | None = None) -> list[Callable[[], None]]:
    """Give ``layer`` (``eligible``, its linears fused) and its norms, attention and MLP the
    forwards of this module (instance attributes: the classes are left alone); a decode step
    binds up to ``hold`` streamed parts itself (the pipeline's slots). ``roads``, if given,
    gets ``roads[layer]``: the layer's ``Road`` for ``attach_model``. Returns the undo
    steps."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = kernels.norms
    # the layer's parts in the order its own forward calls them: the order their Units stream;
    # any hook on one is a streamed part's binder, bound by the merged road, or another (a
    # user's) that sends a step part by part (``binders``)
    parts = (norms[0], attn, *kernels.linears[:4], norms[1], mlp, *kernels.linears[4:])
    own = {m: type(m).forward.__get__(m) for m in (layer, attn, mlp, *norms)}
    attention = _attention(attn)
    sdpa = attention is _functions().get("sdpa")
    # attention functions that compute softmax(q k^T * scale + mask) v and nothing else: what
    # the kernel computes for a step over the cache's buffers
    plain = ((sdpa or attn.config._attn_implementation in (None, "eager"))
             and getattr(attn, "sliding_window", None) is None)
    gqa = attn.config.num_attention_heads != attn.config.num_key_value_heads
    hd = kernels.head_dim

    def fits(x: torch.Tensor, kwargs: dict) -> bool:
        """A decode step's rows the kernels take (the same test on both roads)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return (x.dtype == torch.float32 and x.dim() == 3
                and x.shape[0] * x.shape[1] <= qmatmul.INT_ROWS
                and kwargs.get("position_embeddings") is not None
                and (cache is None or type(cache).__name__ in CACHES))

    def in_place(x: torch.Tensor, kwargs: dict) -> tuple | None:
        """(the cache's layer, its ``room``, ``step_mask``'s flags) where a step of rows x
        ([b, t, hidden]) takes the kernel's attention over the cache's own buffers: one
        position per sequence, a plain attention, a cache written in place with room, a mask
        the kernel takes; else None."""
        b, t, _ = x.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = getattr(cache, "layers", None)
        if t != 1 or not plain or layers is None or len(layers) <= kernels.layer_idx:
            return None
        kv = layers[kernels.layer_idx]
        room = getattr(kv, "room", None)   # an adapters/kvbuffer.BufferLayer
        room = room(b, kernels.kv_heads, t, torch.float32) if room is not None else None
        mask = step_mask(kwargs.get("attention_mask"), b, room[2] + t) if room else None
        return None if mask is None else (kv, room, mask)

    def attend(ws, x, kwargs, norm: bool) -> torch.Tensor:
        """q, k, v of rows x ([b, t, hidden]), the cache, the attention: [b * t, width]."""
        b, t, hidden = x.shape
        cos, sin = _rope_rows(kwargs["position_embeddings"], b, t)
        q, k, v = kernels.attn_in(ws, x.reshape(b * t, hidden).contiguous(), cos, sin, norm)
        written = in_place(x, kwargs)
        if written is not None:
            out = kernels.attend(q, k, v, written[1], written[2])
            written[0].advance(t)
            return out
        q, k, v = (y.view(b, t, -1, hd).transpose(1, 2) for y in (q, k, v))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            k, v = cache.update(k, v, kernels.layer_idx)
        mask = kwargs.get("attention_mask")
        if sdpa and t == 1 and (mask is None or mask.dtype == torch.bool):
            # one query position: no causal mask to make (the model's sdpa function, less its
            # checks)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=gqa).transpose(1, 2)
        else:
            out, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling,
                               **{n: a for n, a in kwargs.items() if n not in _OWN_ARGS})
        return out.reshape(b * t, -1).contiguous()

    hook_dicts = [d for m in parts for d in (m._forward_pre_hooks, m._forward_hooks)]
    params = [m._parameters for m in (*kernels.linears, *norms)]

    def ready() -> list | None:
        """The layer's weights, bound into its ``LayerSpec``, where no part has a hook (every
        part resident) and all are what the kernels take; else None."""
        if any(hook_dicts):
            return None
        ws = [p["weight"] for p in params]
        if all(map(operator.is_, ws, kernels._bound)):   # as checked and bound before
            return ws
        ws = kernels.weights()
        if ws is not None:
            kernels.bind(ws)
        return ws

    def binders() -> list | None:
        """The parts' Unit binders in call order, or None where a part has another hook or
        more than ``hold`` parts are streamed."""
        found = []
        for m in parts:
            pre, post = m._forward_pre_hooks, m._forward_hooks
            if not pre and not post:
                continue
            if len(pre) != 1 or len(post) != 1:
                return None
            binder = getattr(next(iter(pre.values())), "__self__", None)
            if (not getattr(binder, "binds_unit", False)
                    or getattr(next(iter(post.values())), "__self__", None) is not binder):
                return None
            found.append(binder)
        return found if len(found) <= hold else None

    def layer_forward(*args, **kwargs):
        x = args[0] if len(args) == 1 else None
        if (x is None or not fits(x, kwargs)
                or torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks):
            return own[layer](*args, **kwargs)
        bound = binders()
        if bound is None:
            return own[layer](*args, **kwargs)
        with _entered(bound):
            ws = kernels.weights()
            if ws is not None:
                b, t, hidden = x.shape
                rows = x.reshape(b * t, hidden).contiguous()
                written = in_place(x, kwargs)
                if written is not None:   # the whole step in one call
                    cos, sin = _rope_rows(kwargs["position_embeddings"], b, t)
                    out = kernels.step(ws, rows, cos, sin, written[1], written[2])
                    written[0].advance(t)
                    return out.view(b, t, hidden)
                out = attend(ws, x, kwargs, True)
                return kernels.attn_out_mlp(ws, out, rows).view(b, t, hidden)
        return own[layer](*args, **kwargs)   # a weight not in blocks: part by part

    def norm_forward(which: int) -> Callable:
        norm = norms[which]

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = norm._parameters["weight"]
            if not (_float_rows(x) and _float_rows(w) and x.shape[-1] == kernels.hidden):
                return own[norm](x)
            return kernels.norm(which, x, w)
        return forward

    def attn_forward(*args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        ws = kernels.weights(range(3)) if x is not None and fits(x, kwargs) else None
        if ws is None:
            return own[attn](*args, **kwargs)
        b, t, _ = x.shape
        # o through its module: its own Unit (if any) is bound by its hooks
        return attn.o_proj(attend(ws, x, kwargs, False)).view(b, t, -1), None

    def mlp_forward(x: torch.Tensor) -> torch.Tensor:
        g, u = mlp.gate_proj(x), mlp.up_proj(x)
        if not (_float_rows(g) and _float_rows(u) and g.shape == u.shape):
            return mlp.down_proj(mlp.act_fn(g) * u)
        return mlp.down_proj(kernels.silu_mul(g, u))

    forwards = {layer: layer_forward, norms[0]: norm_forward(0), norms[1]: norm_forward(1),
                attn: attn_forward, mlp: mlp_forward}
    for m, f in forwards.items():
        m.forward = f
    if roads is not None:
        roads[layer] = Road(kernels, ready, binders, plain and sdpa, layer_forward)
    return [lambda: [m.__dict__.pop("forward", None) for m in forwards]]


@contextlib.contextmanager
def _entered(binders: list):
    """Each of ``binders`` (``hooks.StreamedBindHook``) entered in order around the block, and
    those entered exited after it, also when it or a later enter raises."""
    entered = []
    try:
        for binder in binders:
            binder.enter()
            entered.append(binder)
        yield
    finally:
        for binder in entered:
            binder.exit()


class Road(NamedTuple):
    """What ``attach_model`` needs of a layer ``attach`` gave its forwards: the kernels,
    ``ready()`` (its weights bound into its ``LayerSpec`` where the layer is all resident and
    unhooked, else None), ``binders()`` (its streamed parts' binders, or None where its module
    must run it part by part), whether its attention is the model's sdpa over the whole cache,
    and the forward attached."""
    kernels: DecoderKernels
    ready: Callable[[], list | None]
    binders: Callable[[], list | None]
    sdpa: bool
    forward: Callable


# False sends every step through the model's own forward and its layers' (the roads compared).
MODEL_ROAD = True
# Models whose forward ``attach_model`` does as theirs does for a decode step.
MODELS = ("LlamaModel",)
# A decode step's keyword arguments the model road takes (any other: the model's forward).
_STEP_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "cache",
                          "past_key_values", "inputs_embeds", "use_cache", "output_attentions",
                          "output_hidden_states", "return_dict"})


def attach_model(base: torch.nn.Module, roads: dict) -> list[Callable[[], None]]:
    """Give ``base`` (a ``MODELS`` model, every layer of it given ``Road`` by ``attach``, its
    attention sdpa) a forward that runs a decode step over the runtime's in-place cache
    without the layer modules (``offload_llama_layers_step``): the layers all resident one
    after another in one call, a layer with streamed parts in a call of its own, those parts
    bound around it in their order (the pipeline's), a layer the road cannot bind (a user's
    hook on a part, more parts streamed than the slots) through its module, part by part; and
    the last norm in C. Any other forward, and a step the road does not take, goes to the
    model's own. The same arithmetic as the layers' own roads, so the same bits. Returns the
    undo steps ([] where ``base`` does not qualify)."""
    if type(base).__name__ not in MODELS:
        return []
    config = base.config
    layers = list(base.layers[: config.num_hidden_layers])
    if not layers or any(m not in roads or not roads[m].sdpa for m in layers):
        return []
    from transformers.modeling_outputs import BaseModelOutputWithPast

    own = type(base).forward.__get__(base)
    lib, n = _library(), len(layers)
    road = [roads[m] for m in layers]
    kernels = [r.kernels for r in road]
    hidden, pool, level = kernels[0].hidden, kernels[0]._pool, kernels[0]._level
    specs = (ctypes.c_void_p * n)(*[ctypes.addressof(k._spec) for k in kernels])
    kbs, vbs = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)()
    sbs, shs, poss = ((ctypes.c_int64 * n)() for _ in range(3))
    width = ctypes.sizeof(ctypes.c_void_p)
    cache_key = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ \
        else "past_key_values"
    # the name a layer takes its cache by (transformers 5 renamed past_key_values)
    layer_cache = "cache" if "cache" in inspect.signature(type(layers[0]).forward).parameters \
        else "past_key_values"

    def prepare(kwargs: dict) -> tuple | None:
        """(ids, cache, rooms, flags) of a decode step the road takes, else None."""
        ids = kwargs.get("input_ids")
        if (ids is None or kwargs.get("inputs_embeds") is not None or ids.dim() != 2
                or ids.shape[1] != 1 or ids.device.type != "cpu"
                or ids.shape[0] > qmatmul.INT_ROWS or not _STEP_KWARGS.issuperset(kwargs)
                or kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
                or config.output_attentions or config.output_hidden_states
                or kwargs.get("return_dict") is False
                or torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks):
            return None
        b = ids.shape[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        held = getattr(cache, "layers", None)
        if held is None or len(held) != n or type(cache).__name__ not in CACHES:
            return None
        rooms = []
        for i, m in enumerate(layers):
            if (m._forward_pre_hooks or m._forward_hooks
                    or m.__dict__.get("forward") is not road[i].forward):
                return None
            room = getattr(held[i], "room", None)
            room = room(b, kernels[i].kv_heads, 1, torch.float32) if room is not None else None
            if room is None or (rooms and room[2] != rooms[0][2]):
                return None
            rooms.append(room)
        mask = kwargs.get("attention_mask")
        if mask is not None:   # transformers' padding mask: one row per sequence, made bool
            if mask.dim() != 2 or tuple(mask.shape) != (b, rooms[0][2] + 1):
                return None
            mask = None if bool(mask.all()) else mask.bool().contiguous()
        return ids, cache, rooms, mask

    def run(first: int, stop: int, rows, cos, sin, rooms, flags, held) -> torch.Tensor:
        """Layers first..stop - 1 (bound) on rows [b, hidden] in one call -> their output."""
        if first == stop:
            return rows
        for i in range(first, stop):
            kb, vb, pos = rooms[i]
            kbs[i], vbs[i] = kb.data_ptr(), vb.data_ptr()
            sbs[i], shs[i], poss[i] = kb.stride(0), kb.stride(1), pos
        out = torch.empty_like(rows)
        at = first * width
        b = rows.shape[0]
        kernels[first]._check(lib.offload_llama_layers_step(
            ctypes.byref(specs, at), stop - first, rows.data_ptr(), b, cos.data_ptr(),
            sin.data_ptr(), ctypes.byref(kbs, at), ctypes.byref(vbs, at), ctypes.byref(sbs, at),
            ctypes.byref(shs, at), ctypes.byref(poss, at),
            None if flags is None else flags.data_ptr(),
            flags.shape[1] if flags is not None and b > 1 else 0,
            out.data_ptr(), pool, level))
        for i in range(first, stop):
            held[i].advance(1)
        return out

    def streamed(i: int, rows, cos, sin, rooms, flags, held) -> torch.Tensor | None:
        """Layer i, its streamed parts bound here (as its own forward binds them, in their
        order), in a call of its own -> its output; None where its module must run it."""
        bound = road[i].binders()
        if not bound:
            return None
        with _entered(bound):
            ws = kernels[i].weights()
            if ws is None:
                return None
            kernels[i].bind(ws)
            return run(i, i + 1, rows, cos, sin, rooms, flags, held)

    def forward(*args, **kwargs):
        step = None if args or not MODEL_ROAD else prepare(kwargs)
        if step is None:
            return own(*args, **kwargs)
        ids, cache, rooms, flags = step
        x = base.embed_tokens(ids)
        if x.dtype != torch.float32:
            return own(**kwargs)
        b, past = ids.shape[0], rooms[0][2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:   # as the model's forward makes them
            position_ids = (torch.arange(1) + past).unsqueeze(0)
        pe = base.rotary_emb(x, position_ids=position_ids)
        cos, sin = _rope_rows(pe, b, 1)
        rows = x.reshape(b, hidden).contiguous()
        held = cache.layers
        # what the model's forward would give a layer (its sdpa mask for one position: the
        # padding, or None)
        given = dict(attention_mask=None if flags is None else flags[:, None, None, :],
                     position_embeddings=pe, position_ids=position_ids,
                     use_cache=kwargs.get("use_cache"), **{layer_cache: cache})
        first = 0   # the run of layers bound and not yet computed starts here
        for i in range(n):
            if road[i].ready() is not None:
                continue
            rows = run(first, i, rows, cos, sin, rooms, flags, held)
            first = i + 1
            out = streamed(i, rows, cos, sin, rooms, flags, held)
            rows = out if out is not None else \
                layers[i](rows.view(b, 1, hidden), **given).reshape(b, hidden)
        rows = run(first, n, rows, cos, sin, rooms, flags, held)
        return BaseModelOutputWithPast(last_hidden_state=base.norm(rows.view(b, 1, hidden)),
                                       **{cache_key: cache})

    base.forward = forward
    undo = [lambda: base.__dict__.pop("forward", None)]
    return undo + _final_norm(base.norm, hidden, lib)


def _final_norm(norm: torch.nn.Module, hidden: int, lib) -> list[Callable[[], None]]:
    """The model's last norm (a Llama RMS norm) as ``offload_rms_norm``, the decoder layers'
    (a decode step's norm through torch: some 0.1 ms of calls). Returns the undo steps."""
    if type(norm).__name__ != "LlamaRMSNorm" or not hasattr(norm, "variance_epsilon"):
        return []
    own, eps = type(norm).forward.__get__(norm), float(norm.variance_epsilon)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = norm._parameters["weight"]
        if not (_float_rows(x) and _float_rows(w) and x.shape[-1] == hidden
                and tuple(w.shape) == (hidden,)):
            return own(x)
        return _rms_norm(lib, x, w, eps, hidden)

    norm.forward = forward
    return [lambda: norm.__dict__.pop("forward", None)]


def family_key(model_type: str | None, fast: bool) -> str | None:
    """The profile's key for the per-layer time of ``model_type``'s decode step: the layers'
    own forwards (``llama``), or this module's road where ``fast`` (``llama/fast``)."""
    return f"{model_type}/fast" if fast and model_type in FAMILIES else model_type


def fused_linear(module: torch.nn.Module, matmul: Callable) -> list[Callable[[], None]]:
    """Run ``module`` (an ``nn.Linear`` whose bound weight is uint8 GGUF blocks:
    ``compute="fast"``) as ``matmul(x, weight)`` plus its bias, with an instance-level
    forward (the class is left alone). Returns the undo steps."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, module._parameters["weight"])
        bias = module._parameters.get("bias")
        return y if bias is None else y.add_(bias)

    module.forward = forward
    return [lambda: module.__dict__.pop("forward", None)]


def fuse_miniature(model: torch.nn.Module, pool: qmatmul.Pool | None) -> int:
    """Give a miniature (``workspace.miniature``, float32) Q8_0 blocks of zeros for the linear
    weights of its eligible layers and the fast road: what ``hardware.measure_layer_time``
    times for ``family_key(..., fast=True)``. Returns the layers given it."""
    fused = qmatmul.Fused("Q8_0", pool)
    done, roads = 0, {}
    for module in model.modules():
        if not eligible(module):
            continue
        types = {}
        for m in linears(module):
            rows, cols = m.weight.shape
            m._parameters["weight"] = torch.nn.Parameter(
                torch.zeros(rows, cols // 32 * 34, dtype=torch.uint8), requires_grad=False)
            fused_linear(m, fused)
            types[id(m)] = "Q8_0"
        attach(module, DecoderKernels(module, pool, types), roads=roads)
        done += 1
    for module in model.modules():
        attach_model(module, roads)
    return done


def step_mask(mask: torch.Tensor | None, b: int, n: int
              ) -> tuple[torch.Tensor | None, int] | None:
    """A one-position step's attention mask as the kernel takes it: ``(flags, stride)``, b
    rows of n flags (nonzero: attended) ``stride`` apart (0: one row for all), or
    ``(None, 0)`` for no mask; None for a mask it does not take (an additive one, another
    length)."""
    if mask is None:
        return None, 0
    if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[-1] != n or mask.shape[0] not in (1, b)):
        return None
    flags = mask[:, 0, -1]
    if flags.stride(-1) != 1:
        flags = flags.contiguous()
    return flags, flags.stride(0) if flags.shape[0] > 1 else 0


_last_rope: list = [(None, None)]


def _rope_rows(rope: tuple, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (cos, sin) as float32 [b * t, head_dim] rows, made once per step: every
    layer of a step is given the same tuple. (One entry, read and replaced whole: a thread
    with another step's tuple makes its own rows.)"""
    given, rows = _last_rope[0]
    if given is not rope:
        rows = tuple(e.float().expand(b, t, -1).reshape(b * t, -1).contiguous() for e in rope)
        _last_rope[0] = (rope, rows)
    return rows
