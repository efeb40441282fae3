"""The packer's per-tensor step for sparse stores: prune (opt-in), then choose the encoding.

A tensor is stored ``bitmap`` only where that saves bytes: decoding costs compute-device time,
so a tensor must save at least ``MIN_SAVING`` of its bytes (a dense model's tensors never do:
0% sparsity encodes to 106% of dense in bf16).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels import bitmap, gguf
from ..units import TensorPart, UnitSpec
from .pack import Encoder
from .prune import prune_rows

SPARSE_ENCODINGS = ("bitmap",)
# LOSSY, opt-in quantization at pack (the gguf package's quantizers).
QUANTIZE_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
MIN_ELEMENTS = 4096    # smaller tensors (norms, biases) are not worth a decode
MIN_SAVING = 0.05


def make_encoder(options, adapter, input_norms: Callable[[], dict[str, torch.Tensor]]
                 ) -> Encoder | None:
    """An ``Encoder`` for ``write_store`` from ``PackOptions``, or None for a dense store.

    ``input_norms`` is called once, on the first weight Wanda prunes."""
    if options.quantize:
        return _quantizer(options.quantize.upper(), adapter)
    if options.sparse is None:
        return None
    norms: dict[str, torch.Tensor] = {}

    def encoder(spec: UnitSpec, part: TensorPart, t: torch.Tensor):
        if options.prune and adapter.prunable(spec, part):
            norm = None
            if options.method == "wanda":
                if not norms:
                    norms.update(input_norms())
                norm = norms[part.source.removesuffix(".weight")]
            t = prune_rows(t, options.prune, norm)
        chosen = choose(t) if adapter.encodable(spec) else None
        return t, (None if chosen is None else (chosen[0], "bitmap", chosen[1]))

    return encoder


def _quantizer(qtype: str, adapter) -> Encoder:
    """LOSSY: the decoder's projection weights quantized to ``qtype`` with the gguf package's
    quantizer (rows whose length is not a whole number of blocks stay float32)."""
    from gguf import GGMLQuantizationType, quantize

    block = gguf.TYPES[qtype][1]

    def encoder(spec: UnitSpec, part: TensorPart, t: torch.Tensor):
        if not adapter.prunable(spec, part) or t.shape[-1] % block:
            return t, None
        blocks = quantize(t.numpy(), GGMLQuantizationType[qtype])
        return t, (torch.from_numpy(blocks.reshape(-1).copy()), gguf.encoding(qtype), None)

    return encoder


def quantized_source(source):
    """``source`` with every tensor as float32 (the store a quantized pack writes decodes to
    float32); ``_quantizer`` then quantizes the projections."""
    import copy
    import dataclasses

    config = copy.deepcopy(source.config)   # the caller's model keeps its own
    config.dtype = torch.float32

    def shapes():
        return {k: (shape, torch.float32) for k, (shape, _) in source.shapes().items()}

    return dataclasses.replace(source, config=config, shapes=shapes,
                               load=lambda name: source.load(name).float(),
                               module=None)


def choose(tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(encoded bytes, nnz)`` if storing ``tensor`` as a bitmap saves bytes, else None."""
    if tensor.dtype not in bitmap.DTYPES or tensor.numel() < MIN_ELEMENTS:
        return None
    elem = tensor.dtype.itemsize
    nnz = int(torch.count_nonzero(tensor.reshape(-1).view({2: torch.int16, 4: torch.int32}[elem])))
    dense = tensor.numel() * elem
    if bitmap.encoded_nbytes(tensor.numel(), nnz, elem) > dense * (1 - MIN_SAVING):
        return None
    return bitmap.encode(tensor)
