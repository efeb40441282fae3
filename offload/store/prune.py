"""Unstructured pruning at pack time (lossy, opt-in): zero the lowest-scoring weights per row.

``magnitude`` scores a weight by ``|W|``; ``wanda`` (Sun et al. 2023) by ``|W| * ||X_j||``, the
norm of its input feature over calibration tokens. Both compare weights within an output row
(Wanda's comparison group), so a row-chunked tensor prunes exactly like the whole one.
"""
from __future__ import annotations

import torch

METHODS = ("magnitude", "wanda")


def prune_rows(weight: torch.Tensor, ratio: float,
               input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of the 2-D ``weight`` with ``round(ratio * columns)`` weights of each row zeroed:
    those with the smallest ``|W|`` (or ``|W| * input_norm`` when given, ``[columns]``)."""
    cols = weight.shape[1]
    k = int(round(cols * ratio))
    if k <= 0:
        return weight
    score = weight.detach().abs().float()
    if input_norm is not None:
        score = score * input_norm.to(score.device, torch.float32)
    # stable=True: equal scores are pruned in column order, the same on every run.
    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
    out = weight.detach().clone()
    out.scatter_(1, idx, 0)
    return out


def prune_model(model: torch.nn.Module, ratio: float, adapter, *,
                input_norms: dict[str, torch.Tensor] | None = None) -> int:
    """Prune ``model``'s prunable weights in place (those ``adapter.prunable_modules`` names);
    returns how many weights were zeroed. The packer applies the same ``prune_rows``."""
    zeroed = 0
    with torch.no_grad():
        for name, module in adapter.prunable_modules(model).items():
            norm = input_norms.get(name) if input_norms else None
            before = int((module.weight == 0).sum())
            module.weight.copy_(prune_rows(module.weight, ratio, norm))
            zeroed += int((module.weight == 0).sum()) - before
    return zeroed


def check_prune(ratio, method: str) -> None:
    from ..errors import OffloadError

    if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise OffloadError(f"prune={ratio!r}: give the fraction of weights to zero, "
                           "between 0 and 1 (e.g. 0.5)")
    if method not in METHODS:
        raise OffloadError(f"prune method {method!r}: use one of {', '.join(METHODS)}")
