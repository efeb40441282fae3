"""Expert heat: the share of decode steps that used each expert, measured in one run and kept
beside the store (``expert_heat.json``, with the sequences a step decoded and the experts each
layer's last steps used, in order) so the next plan keeps the hottest experts resident and
predicts its expert cache's hits from them."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

HEAT_FILE = "expert_heat.json"


class Heat(dict):
    """Expert key -> the share of a token's routings that used it, with the sequences per
    decode step (``batch``) of the run that measured it and, where it kept them, the experts
    each MoE layer's last decode steps used (``trace``: layer index -> steps, each a list of
    expert numbers), in order: what an LRU cache over them hits, reuse included."""

    batch: float = 1.0
    trace: dict[int, list[list[int]]] | None = None


def load_heat(store: Path, min_steps: int = 8) -> Heat | None:
    """A previous run's expert heat for this store, if it saw enough decode steps: expert key
    -> the share of a token's routings that used it (a step of ``b`` sequences that used an
    expert with share ``s`` of the steps gives ``1 - (1 - s) ** (1 / b)``, sequences routed
    independently)."""
    try:
        d = json.loads((Path(store) / HEAT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("decode_steps", 0) < min_steps:
        return None
    per_step = max(1.0, float(d.get("batch", 1)))
    # an expert used in every one of n steps was used more than most of the time, not
    # always: its share is taken as 1 - 1/(2n), or a batch's share could not be inverted
    most = 1 - 0.5 / d["decode_steps"]
    heat = Heat({k: 1 - (1 - min(most, float(v))) ** (1 / per_step)
                 for k, v in d.get("heat", {}).items()})
    heat.batch = per_step
    trace = d.get("trace")
    if isinstance(trace, dict):
        try:
            heat.trace = {int(layer): [[int(e) for e in step] for step in steps]
                          for layer, steps in trace.items() if steps}
        except (TypeError, ValueError):
            heat.trace = None   # a damaged trace only loses the hint
    return heat


def save_heat(store: Path, decode_steps: int, heat: dict[str, float],
              batch: float = 1.0, trace: dict[int, list[list[int]]] | None = None) -> None:
    """Write ``heat`` (expert key -> share of ``decode_steps``, each of ``batch`` sequences on
    average) and ``trace`` (``Heat.trace``) beside the store: to a temporary name, then
    renamed. A read-only store only loses the hint."""
    path = Path(store) / HEAT_FILE
    tmp = path.with_name(f".{HEAT_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"decode_steps": decode_steps, "batch": batch,
                                   "heat": heat, "trace": trace or {}}))
        os.replace(tmp, path)
    except OSError as e:
        log.info("could not save expert heat in %s: %s", path, e)
