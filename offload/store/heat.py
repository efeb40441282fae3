"""Expert heat: the share of decode steps that used each expert, measured in one run and kept
beside the store (``expert_heat.json``) so the next plan keeps the hottest experts resident."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

HEAT_FILE = "expert_heat.json"


def load_heat(store: Path, min_steps: int = 8) -> dict[str, float] | None:
    """A previous run's expert heat for this store, if it saw enough decode steps."""
    try:
        d = json.loads((Path(store) / HEAT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("decode_steps", 0) < min_steps:
        return None
    return {k: float(v) for k, v in d.get("heat", {}).items()}


def save_heat(store: Path, decode_steps: int, heat: dict[str, float]) -> None:
    """Write ``heat`` (expert key -> share of ``decode_steps``) beside the store: to a
    temporary name, then renamed. A read-only store only loses the hint."""
    path = Path(store) / HEAT_FILE
    tmp = path.with_name(f".{HEAT_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"decode_steps": decode_steps, "heat": heat}))
        os.replace(tmp, path)
    except OSError as e:
        log.info("could not save expert heat in %s: %s", path, e)
