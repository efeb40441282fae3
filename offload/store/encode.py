"""The packer's per-tensor step for sparse stores: prune (opt-in), then choose the encoding."""
from __future__ import annotations

from typing import Callable

import torch

from .pack import Encoder, TensorPart, UnitSpec
from .prune import prune_rows


def make_encoder(options, adapter, input_norms: Callable[[], dict[str, torch.Tensor]]
                 ) -> Encoder | None:
    """An ``Encoder`` for ``write_store`` from ``PackOptions``, or None for a dense store.

    ``input_norms`` is called once, on the first weight Wanda prunes."""
    if options.sparse is None:
        return None
    from ..planner.encoding import choose

    norms: dict[str, torch.Tensor] = {}

    def encoder(spec: UnitSpec, part: TensorPart, t: torch.Tensor):
        if options.prune and adapter.prunable(spec, part):
            norm = None
            if options.method == "wanda":
                if not norms:
                    norms.update(input_norms())
                norm = norms[part.source.removesuffix(".weight")]
            t = prune_rows(t, options.prune, norm)
        return t, (choose(t) if adapter.encodable(spec) else None)

    return encoder
