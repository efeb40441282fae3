"""Dense decoder-only families: Llama, Mistral, Qwen2 (transformers' ``*ForCausalLM``)."""
from __future__ import annotations

import torch

from ..errors import ModelError
from ..units import TensorPart, UnitSpec
from .base import Shape

# Row-chunks of the embedding and head hold a multiple of this many rows: chunked matmuls then
# give bitwise the same logits as the whole-matrix matmul (checked in tests/test_exactness.py).
ROW_QUANTUM = 1024

# A decoder layer is several Units, each bound to the module that consumes it, in the order a
# forward pass calls them (LlamaMLP computes down(act(gate(x)) * up(x)): gate, up, down).
# Finer Units mean smaller staging slots: for a TinyLlama layer the slots shrink from 88 MB (a
# whole layer) to 23 MB (one MLP projection), and the budget keeps ~130 MB more resident.
LAYER_PARTS = (("input_layernorm.", "input_norm"), ("self_attn.", "attn"),
               ("post_attention_layernorm.", "post_norm"), ("mlp.gate_proj.", "gate"),
               ("mlp.up_proj.", "up"), ("mlp.down_proj.", "down"))


class DenseAdapter:
    """Units: ``embed.c`` (row-chunks of the embedding), ``layer.i.<part>`` for each of
    ``LAYER_PARTS``, ``norm``, ``head.c`` (row-chunks of the LM head)."""

    model_types = ("llama", "mistral", "qwen2")

    def shape(self, config) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Shape(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                     heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                     config.vocab_size)

    def unit_specs(self, config, shapes):
        n_layers = config.num_hidden_layers
        layer_parts: list[dict[str, list[TensorPart]]] = [{} for _ in range(n_layers)]
        statics: dict[str, str] = {}
        for name in sorted(shapes):
            shape, dtype = shapes[name]
            if name.startswith("model.layers."):
                i, rest = name[len("model.layers."):].split(".", 1)
                if not i.isdigit() or int(i) >= n_layers:
                    raise ModelError(f"checkpoint tensor {name} names a layer the config lacks")
                prefix, part = _layer_part(rest, name)
                layer_parts[int(i)].setdefault(part, []).append(
                    TensorPart(rest[len(prefix):], name, shape, dtype))
            elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                statics[name] = name
            else:
                raise ModelError(f"checkpoint tensor {name} is not part of a {config.model_type} "
                                 "model this adapter knows; is the config the right one?")
        tied = bool(getattr(config, "tie_word_embeddings", False))
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight")
                   + (() if tied else ("lm_head.weight",)) if n not in shapes]
        if missing or any(not p for p in layer_parts):
            gaps = missing + [f"model.layers.{i}.*" for i, p in enumerate(layer_parts) if not p]
            raise ModelError(f"the checkpoint lacks {', '.join(gaps[:5])}: it is incomplete")
        layers = [UnitSpec(f"layer.{i}.{part}", "layer", "layer", i, tuple(parts[part]))
                  for i, parts in enumerate(layer_parts)
                  for _, part in LAYER_PARTS if part in parts]
        return self._with_statics(layers, shapes, tied)

    def _with_statics(self, layers: list[UnitSpec], shapes, tied: bool
                      ) -> tuple[list[UnitSpec], dict[str, str]]:
        """Embedding row-chunks, ``layers``, the final norm and the head's row-chunks (chunks
        about the size of the largest layer Unit), and the tie of head to embedding."""
        layer_bytes = max(sum(p.nbytes for p in u.parts) for u in layers)
        specs = self._row_chunks("embed", "model.embed_tokens.weight", shapes, layer_bytes)
        specs += layers
        norm_shape, norm_dtype = shapes["model.norm.weight"]
        specs.append(UnitSpec("norm", "static", "norm", 0,
                              (TensorPart("weight", "model.norm.weight", norm_shape, norm_dtype),)))
        if not tied:
            specs += self._row_chunks("head", "lm_head.weight", shapes, layer_bytes)
        return specs, ({"head": "embed"} if tied else {})

    @staticmethod
    def _row_chunks(group: str, source: str, shapes, max_bytes: int) -> list[UnitSpec]:
        (rows, cols), dtype = shapes[source]
        row_bytes = cols * dtype.itemsize
        step = max(ROW_QUANTUM, max_bytes // row_bytes // ROW_QUANTUM * ROW_QUANTUM)
        specs = []
        for c, start in enumerate(range(0, rows, step)):
            stop = min(rows, start + step)
            part = TensorPart("weight", source, (stop - start, cols), dtype, (start, stop))
            specs.append(UnitSpec(f"{group}.{c}", "static", group, c, (part,), (start, stop)))
        return specs

    def always_resident(self, units) -> set[str]:
        return set()

    def members(self, units, unit) -> list:
        """Units read as part of ``unit`` and checked on their own: none in a dense model."""
        return []

    def encodable(self, spec: UnitSpec) -> bool:
        """Units whose tensors may be stored encoded: all but the embedding, whose rows are
        gathered straight from the store."""
        return spec.group != "embed"

    def prunable(self, spec: UnitSpec, part: TensorPart) -> bool:
        """Weights pruning may zero: the decoder layers' projection matrices."""
        return spec.kind == "layer" and len(part.shape) == 2

    def prunable_modules(self, model) -> dict[str, torch.nn.Module]:
        """The modules ``prunable`` weights belong to, by checkpoint name (without .weight)."""
        return {f"model.layers.{i}.{name}": m for i, layer in enumerate(model.model.layers)
                for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}

    def execution_order(self, config, groups, *, stream_experts: bool = False):
        # The embedding is not streamed: its forward gathers only the rows of the batch's ids
        # (a few KB per token) from wherever the chunk lives. Only a tied head reads it whole.
        head = groups.get("head") or groups["embed"]
        return groups["layer"] + groups["norm"] + head

    def bind_points(self, model):
        points = {f"layer.{i}.{part}": layer.get_submodule(prefix.rstrip("."))
                  for i, layer in enumerate(model.model.layers) for prefix, part in LAYER_PARTS}
        points["norm"] = model.model.norm
        return points

    def row_points(self, model):
        return {"embed": (model.model.embed_tokens, "embedding"),
                "head": (model.lm_head, "linear")}

    def check_model(self, model) -> None:
        if getattr(model.lm_head, "bias", None) is not None:
            raise ModelError("an lm_head with a bias is not supported by the dense adapter")
        if not isinstance(model.lm_head, torch.nn.Linear):
            raise ModelError(f"lm_head is a {type(model.lm_head).__name__}, expected Linear")


def _layer_part(rest: str, name: str) -> tuple[str, str]:
    for prefix, part in LAYER_PARTS:
        if rest.startswith(prefix):
            return prefix, part
    raise ModelError(f"checkpoint tensor {name} is not part of a decoder layer this adapter "
                     "knows (attention, MLP, norms)")
