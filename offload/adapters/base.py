"""What an adapter tells the rest of offload about a model family."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch

from ..memory import MMAP_THRESHOLD
from ..units import UnitSpec


def cache_keyword(model: torch.nn.Module) -> str:
    """The name of ``model``'s forward argument for its KV cache: ``cache`` from transformers
    5.2x, ``past_key_values`` before."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that size its KV cache and activations."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def kv_bytes(self, tokens: int, itemsize: int) -> int:
        """KV cache bytes for ``tokens`` cached positions summed over the batch."""
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize * tokens

    def positions_below_mmap(self, batch: int, itemsize: int) -> int:
        """The most positions per sequence at which one layer's cache of ``batch`` sequences
        is still below the C heap's mmap threshold, where ``activation_bytes`` counts every
        layer's old copy as heap."""
        per_position = batch * self.kv_heads * self.head_dim * itemsize
        return -(-MMAP_THRESHOLD // per_position) - 1

    def activation_bytes(self, batch: int, new: int, total: int, itemsize: int,
                         logits_rows: int, cat: bool = True) -> int:
        """A high-water estimate of one forward's activations: the live hidden states of one
        layer, its MLP and attention intermediates (scores in float32, the causal mask as
        booleans and as floats), the layer's keys and values over all ``total`` positions as
        attention reads them (repeated to every query head where heads share them, plus, with
        ``cat``, the old copies DynamicCache's ``torch.cat`` frees: one layer's while the new
        one is made, or, for tensors below the C heap's mmap threshold, every layer's, left as
        heap the larger new ones cannot reuse until the forward ends and the heap is trimmed;
        a paged cache gathers into its own buffers), in half precision the float32 copies
        attention makes of the queries and the repeated keys and values (measured on the CPU:
        a bf16 forward attending 960 positions held 1.1 MB more than the rest of this sum on
        a toy model, float32 none), and ``logits_rows`` rows of logits (counted at float32
        width: generate upcasts them)."""
        n = batch * new
        per_token = (4 * self.hidden + 3 * self.intermediate
                     + (self.heads + 2 * self.kv_heads) * self.head_dim) * itemsize
        scores = batch * self.heads * new * total * 4
        mask = batch * new * total * 5   # the causal mask (bool) and attention's float copy
        repeat = self.heads if self.heads > self.kv_heads else 0   # repeat_kv's copy
        keys = 2 * batch * total * repeat * self.head_dim * itemsize
        if cat:   # one layer's old copy; below the mmap threshold, every layer's stays as heap
            layer = batch * total * self.kv_heads * self.head_dim * itemsize
            keys += 2 * layer * (self.layers if layer < MMAP_THRESHOLD else 1)
        if itemsize < 4:
            keys += (2 * batch * total + n) * self.heads * self.head_dim * 4
        logits = logits_rows * self.vocab * max(itemsize, 4)
        return n * per_token + scores + mask + keys + logits


class Adapter(Protocol):
    """A model family's mapping to Units and hook points."""

    model_types: tuple[str, ...]

    def shape(self, config) -> Shape: ...

    def unit_specs(self, config, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
                   ) -> tuple[list[UnitSpec], dict[str, str]]:
        """Units in execution order, and ``{group: group}`` ties (``{"head": "embed"}``)."""
        ...

    def bind_points(self, model) -> dict[str, torch.nn.Module]:
        """Unit key -> the module whose parameters that Unit fills (layers, norms)."""
        ...

    def row_points(self, model) -> dict[str, tuple[torch.nn.Module, str]]:
        """Static group -> (module, op) for row-chunked groups: op is ``embedding`` or ``linear``."""
        ...

    def execution_order(self, config, groups: dict[str, list[str]], *,
                        stream_experts: bool = False) -> list[str]:
        """Unit keys in the order one forward pass streams them (gathered groups left out;
        MoE experts too, unless ``stream_experts``: then each layer's experts Unit)."""
        ...

    def always_resident(self, units) -> set[str]:
        """Keys the planner must keep resident whatever they cost (an MoE router)."""
        ...

    def check_model(self, model) -> None:
        """Raise ModelError if ``model`` has a structure the hooks cannot serve."""
        ...

    def members(self, units, unit) -> list:
        """Units read inside ``unit`` and each checked by its own checksum (a layer's experts
        Unit in layer-only streaming); empty for an ordinary Unit."""
        ...

# MoE adapters also provide ``moe_shape(config)``, ``expert_points(model)``,
# ``stream_units(units)`` and the names of an MoE model's pieces: ``expert_params``,
# ``expert_weights``, ``stream_expert_weights``, ``router_weight``, ``experts_unit`` (see
# ``adapters/moe.py``); the runtime checks for ``moe_shape``.


def linear_weights(adapter, model):
    """A predicate ``(unit, tensor) -> bool``: the tensor is the ``weight`` of an
    ``nn.Linear`` that ``adapter`` binds in ``model`` (its forward can be replaced by a fused
    quantized matmul), or the weight of a row-chunked embedding or head (their forwards are
    the runtime's own). Experts never are (their compute is the MoE block's)."""
    points = adapter.bind_points(model)
    rows = adapter.row_points(model)

    def linear(unit, tensor) -> bool:
        if unit.kind == "expert":
            return False
        if unit.key in points:
            path, _, attr = tensor.name.rpartition(".")
            module = points[unit.key].get_submodule(path) if path else points[unit.key]
            return attr == "weight" and type(module) is torch.nn.Linear
        return unit.group in rows and tensor.name == "weight"

    return linear
