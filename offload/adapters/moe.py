"""Mixture-of-Experts families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (transformers' 5.x
``*ForCausalLM``, whose experts are fused ``[experts, ...]`` tensors in memory).

Each expert of each layer becomes its own Unit (``expert.<layer>.<e>``: its ``gate_up``
``[2I, H]`` and ``down`` ``[H, I]`` projections, one aligned read), whether the checkpoint
stores experts fused (``mlp.experts.gate_up_proj``) or one module per expert (Mixtral's
``block_sparse_moe.experts.<e>.w1/w2/w3``, Qwen's ``mlp.experts.<e>.gate_proj/...``).
The rest of a layer is planned like a dense layer: ``input_norm``, ``attn``, ``post_norm``, a
``router`` Unit (the router, plus Qwen2-MoE's shared-expert gate: tiny, always resident, and
needed ahead of time to predict the next layer's experts), a ``shared`` Unit (Qwen2-MoE's shared
expert), and ``gate``/``up``/``down`` for the dense-MLP layers some Qwen configs interleave.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelError
from ..units import TENSOR_ALIGN, TensorPart, TensorSpec, Unit, UnitSpec, align
from .base import Shape
from .dense import DenseAdapter

# Implementations of transformers' experts forward that offload mirrors bit for bit.
MIRRORED_IMPLEMENTATIONS = ("grouped_mm", "eager")

_FUSED = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down",
         "down_proj": "down"}
# (checkpoint prefix inside a layer, Unit part, module path the Unit binds to)
_LAYER_PARTS = (("input_layernorm.", "input_norm", "input_layernorm"),
                ("self_attn.", "attn", "self_attn"),
                ("post_attention_layernorm.", "post_norm", "post_attention_layernorm"),
                ("mlp.gate.", "router", "mlp"), ("mlp.shared_expert_gate.", "router", "mlp"),
                ("mlp.shared_expert.", "shared", "mlp.shared_expert"),
                ("mlp.gate_proj.", "gate", "mlp.gate_proj"), ("mlp.up_proj.", "up", "mlp.up_proj"),
                ("mlp.down_proj.", "down", "mlp.down_proj"))
_PART_ORDER = ("input_norm", "attn", "post_norm", "router", "shared", "gate", "up", "down")


@dataclass(frozen=True)
class MoEShape:
    """What the expert cache and the planner need to know about a model's experts."""

    experts: int                 # experts per MoE layer
    top_k: int                   # experts each token is routed to
    layers: tuple[int, ...]      # the MoE layers (others have a dense MLP)


class MoEAdapter(DenseAdapter):
    """Units: ``embed.c``, per layer ``layer.i.<part>`` (see module doc) and ``expert.i.e``,
    ``norm``, ``head.c``."""

    model_types = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

    def shape(self, config) -> Shape:
        base = super().shape(config)
        top_k = config.num_experts_per_tok
        moe_i = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        # Per token the experts hold top_k [2I] and [I] intermediates and top_k weighted [H]
        # outputs in float32 (the routing weights are float32): counted as intermediate width.
        width = top_k * moe_i + shared + top_k * config.hidden_size
        return Shape(base.layers, base.hidden, max(config.intermediate_size, width), base.heads,
                     base.kv_heads, base.head_dim, base.vocab)

    def moe_shape(self, config) -> MoEShape:
        experts = (getattr(config, "num_local_experts", None)
                   or getattr(config, "num_experts", None))
        return MoEShape(int(experts), int(config.num_experts_per_tok),
                        tuple(i for i in range(config.num_hidden_layers) if _is_moe(config, i)))

    def unit_specs(self, config, shapes):
        n_layers = config.num_hidden_layers
        parts, experts = _sort_tensors(config, shapes)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight")
                   + (() if tied else ("lm_head.weight",)) if n not in shapes]
        missing += [f"model.layers.{i}.*" for i, p in enumerate(parts) if not p]
        moe = self.moe_shape(config)
        for i in range(n_layers):
            if (i in moe.layers) != bool(experts[i]):
                missing.append(f"model.layers.{i}.mlp.experts" if i in moe.layers
                               else f"(layer {i} has experts its config does not declare)")
            elif experts[i] and sorted(experts[i]) != list(range(moe.experts)):
                missing.append(f"model.layers.{i}.mlp.experts (found {len(experts[i])} of "
                               f"{moe.experts})")
        if missing:
            raise ModelError(f"the checkpoint lacks {', '.join(missing[:5])}: it is incomplete "
                             "or does not match its config")
        layers = []
        for i in range(n_layers):
            layers += [UnitSpec(f"layer.{i}.{p}", "layer", "layer", i, tuple(parts[i][p]))
                       for p in _PART_ORDER if p in parts[i]]
            layers += [_expert_spec(i, e, experts[i][e]) for e in sorted(experts[i])]
        return self._with_statics(layers, shapes, tied)

    def execution_order(self, config, groups, *, stream_experts: bool = False):
        head = groups.get("head") or groups["embed"]
        if not stream_experts:
            return groups["layer"] + groups["norm"] + head
        # Layer-only streaming: all experts of a layer, one Unit (see ``stream_units``), follow
        # the layer's other Units.
        moe = {int(k.split(".")[1]) for k in groups.get("expert", [])}
        order = []
        for pos, key in enumerate(groups["layer"]):
            order.append(key)
            i = int(key.split(".")[1])
            last = pos + 1 == len(groups["layer"]) or \
                int(groups["layer"][pos + 1].split(".")[1]) != i
            if last and i in moe:
                order.append(self.experts_unit(i))
        return order + groups["norm"] + head

    def stream_units(self, units) -> list[Unit]:
        """For layer-only streaming: each layer's experts as one Unit (``experts.<layer>``).

        The store lays a layer's experts out back to back, so all of them are one contiguous
        read; their tensors are named ``gate_up.<e>`` and ``down.<e>``. Its checksum is 0:
        each expert is checked on its own. Experts stored encoded (GGUF blocks) make an
        encoded Unit: read as stored, decoded into the experts laid out back to back.
        """
        by_layer: dict[int, list[Unit]] = {}
        for u in units:
            if u.kind == "expert" and u.expert is not None:
                by_layer.setdefault(u.index, []).append(u)
        out = []
        for i, members in sorted(by_layer.items()):
            members.sort(key=lambda u: u.expert)
            first, last = members[0], members[-1]
            strides = {b.offset - a.offset for a, b in zip(members, members[1:])}
            stored = lambda u: tuple((t.encoding, t.source) for t in u.tensors)  # noqa: E731
            if len(strides) > 1 or any(u.layout != first.layout or stored(u) != stored(first)
                                       for u in members):
                raise ModelError(f"layer {i}'s experts are not laid out at one stride in the "
                                 "store; pack the model again")
            span = last.offset + last.stored_bytes - first.offset
            if not first.encoded:
                tensors = tuple(TensorSpec(f"{t.name}.{u.expert}", t.dtype, t.shape,
                                           u.offset - first.offset + t.offset, t.nbytes)
                                for u in members for t in u.tensors)
                out.append(Unit(self.experts_unit(i), "expert", "experts", i, first.offset,
                                span, 0, tensors))
                continue
            dense = align(first.nbytes, TENSOR_ALIGN)
            tensors = tuple(TensorSpec(f"{t.name}.{u.expert}", t.dtype, t.shape,
                                       n * dense + t.offset, t.nbytes, t.encoding,
                                       u.offset - first.offset + t.source[0], t.source[1])
                            for n, u in enumerate(members) for t in u.tensors)
            out.append(Unit(self.experts_unit(i), "expert", "experts", i, first.offset,
                            len(members) * dense, 0, tensors, stored_nbytes=span))
        return out

    def encodable(self, spec) -> bool:
        """Expert Units move through the expert cache, which reads them as stored: dense."""
        return spec.group not in ("embed", "expert", "experts") and spec.kind != "expert"

    def prunable(self, spec, part) -> bool:
        """Attention projections only: routers and experts are not pruned."""
        return spec.kind == "layer" and spec.key.endswith(".attn") and len(part.shape) == 2

    def prunable_modules(self, model) -> dict:
        return {f"model.layers.{i}.self_attn.{name}": m
                for i, layer in enumerate(model.model.layers)
                for name, m in layer.self_attn.named_modules()
                if isinstance(m, torch.nn.Linear)}

    def always_resident(self, units) -> set[str]:
        """Routers: tiny, and read ahead of their layer to predict its experts."""
        return {u.key for u in units if u.key.endswith(".router")}

    def bind_points(self, model):
        points = {}
        for i, layer in enumerate(model.model.layers):
            mlp = layer.mlp
            for _, part, path in _LAYER_PARTS:
                try:
                    points.setdefault(f"layer.{i}.{part}", layer.get_submodule(path))
                except AttributeError:
                    continue
            if not hasattr(mlp, "experts"):
                points.pop(f"layer.{i}.router", None)
        points["norm"] = model.model.norm
        return points

    # -- the names of an MoE model's pieces, for the runtime (which knows none of them) ------
    expert_params = ("gate_up_proj", "down_proj")   # an experts module's fused parameters
    expert_params_of = ("gate_up", "down")   # an expert Unit's tensors, in that order

    @staticmethod
    def expert_weights(views: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up, down)`` of one expert Unit's tensors."""
        return views["gate_up"], views["down"]

    @staticmethod
    def stream_expert_weights(views: dict, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up, down)`` of ``expert`` inside a layer's experts Unit (``stream_units``)."""
        return views[f"gate_up.{expert}"], views[f"down.{expert}"]

    @staticmethod
    def router_weight(resident: dict, layer: int) -> torch.Tensor:
        """Layer ``layer``'s router weight ``[experts, H]``, from the resident Units' views."""
        return resident[f"layer.{layer}.router"]["gate.weight"]

    @staticmethod
    def experts_unit(layer: int) -> str:
        """The key of layer ``layer``'s experts Unit in layer-only streaming."""
        return f"experts.{layer}"

    def members(self, units, unit: Unit) -> list[Unit]:
        """The expert Units inside a layer's experts Unit (each checked by its own CRC32);
        empty for any other Unit."""
        if unit.group != "experts":
            return []
        return [u for u in units if u.kind == "expert" and u.index == unit.index
                and u.expert is not None]

    def expert_points(self, model) -> dict[int, object]:
        """MoE layer number -> its experts module (the fused ``*Experts``)."""
        return {i: layer.mlp.experts for i, layer in enumerate(model.model.layers)
                if hasattr(layer.mlp, "experts")}

    def check_model(self, model) -> None:
        super().check_model(model)
        impl = getattr(model.config, "_experts_implementation", None) or "eager"
        if impl not in MIRRORED_IMPLEMENTATIONS:
            raise ModelError(
                f"this model computes its experts with {impl!r}; offload reproduces "
                f"{' and '.join(map(repr, MIRRORED_IMPLEMENTATIONS))} bit for bit: load it with "
                "experts_implementation='grouped_mm' (transformers' default)")
        for i, experts in self.expert_points(model).items():
            flags = {k: getattr(experts, k, None) for k in
                     ("has_bias", "has_gate", "is_transposed", "is_concatenated")}
            if flags != {"has_bias": False, "has_gate": True, "is_transposed": False,
                         "is_concatenated": True} and any(v is not None for v in flags.values()):
                raise ModelError(f"layer {i}'s experts have a layout offload does not support "
                                 f"({flags}); supported: gated, concatenated, untransposed, "
                                 "no bias")


def _sort_tensors(config, shapes) -> tuple[list[dict], list[dict]]:
    """Per layer: the non-expert tensors by Unit part, and each expert's tensors by role
    (``gate_up_proj``/``down_proj`` slices of fused tensors, or ``gate``/``up``/``down``)."""
    n_layers = config.num_hidden_layers
    parts: list[dict[str, list[TensorPart]]] = [{} for _ in range(n_layers)]
    experts: list[dict[int, dict[str, tuple]]] = [{} for _ in range(n_layers)]
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        if not name.startswith("model.layers."):
            if name not in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                raise ModelError(f"checkpoint tensor {name} is not part of a {config.model_type}"
                                 " model this adapter knows; is the config the right one?")
            continue
        i, rest = name[len("model.layers."):].split(".", 1)
        if not i.isdigit() or int(i) >= n_layers:
            raise ModelError(f"checkpoint tensor {name} names a layer the config lacks")
        i = int(i)
        if rest.startswith("block_sparse_moe."):   # Mixtral's original module name
            rest = "mlp." + rest[len("block_sparse_moe."):]
        m = _FUSED.match(rest)
        if m:
            for e in range(shape[0]):
                experts[i].setdefault(e, {})[m.group(1)] = (name, shape[1:], dtype, e)
            continue
        m = _PER_EXPERT.match(rest)
        if m:
            experts[i].setdefault(int(m.group(1)), {})[_ROLE[m.group(2)]] = (
                name, shape, dtype, None)
            continue
        prefix, part, _ = _layer_part(rest, name)
        local = rest[len(prefix):] if part != "router" else rest[len("mlp."):]
        parts[i].setdefault(part, []).append(TensorPart(local, name, shape, dtype))
    return parts, experts


def _is_moe(config, i: int) -> bool:
    if config.model_type in ("mixtral", "olmoe"):
        return True
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only = getattr(config, "mlp_only_layers", None) or []
    n = getattr(config, "num_experts", 0) or 0
    return i not in only and n > 0 and (i + 1) % step == 0


def _layer_part(rest: str, name: str) -> tuple[str, str, str]:
    for prefix, part, path in _LAYER_PARTS:
        if rest.startswith(prefix):
            return prefix, part, path
    raise ModelError(f"checkpoint tensor {name} is not part of a decoder layer this adapter "
                     "knows (attention, norms, router, experts, shared expert, MLP)")


def _expert_spec(i: int, e: int, found: dict[str, tuple]) -> UnitSpec:
    """One expert: ``gate_up`` [2I, H] and ``down`` [H, I], from fused or per-expert tensors."""
    if "gate_up_proj" in found:
        name, shape, dtype, idx = found["gate_up_proj"]
        gate_up = TensorPart("gate_up", name, tuple(shape), dtype, index=idx)
        name, shape, dtype, idx = found["down_proj"] if "down_proj" in found else (None,) * 4
    else:
        if not {"gate", "up", "down"} <= set(found):
            raise ModelError(f"expert {e} of layer {i} lacks "
                             f"{sorted({'gate', 'up', 'down'} - set(found))} projections")
        gname, gshape, dtype, _ = found["gate"]
        uname, ushape, _, _ = found["up"]
        gate_up = TensorPart("gate_up", gname, (gshape[0] + ushape[0], *gshape[1:]), dtype,
                             concat=(uname,))
        name, shape, dtype, idx = found["down"]
    if name is None:
        raise ModelError(f"layer {i}'s experts lack down_proj")
    down = TensorPart("down", name, tuple(shape), dtype, index=idx)
    return UnitSpec(f"expert.{i}.{e}", "expert", "expert", i, (gate_up, down), expert=e)

