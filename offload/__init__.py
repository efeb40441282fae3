"""offload: run models larger than memory, streamed from disk, exactly.

    import offload
    model = offload.run("path/to/checkpoint", budget="8GB")
    model.generate(...)
    offload.stats(model)
"""
from .memory import cap_kernel_caches, map_large_allocations

cap_kernel_caches()       # before torch builds its first oneDNN kernel: see its docstring
map_large_allocations()   # before loading and probing leave large holes in the C heap

from .api import close, default_model, pack, plan, run, stats, tokenizer
from .errors import BudgetError, HardwareError, ModelError, OffloadError, StoreError
from .integrations.accelerate import from_accelerate, infer_device_map

__all__ = ["run", "plan", "pack", "stats", "close", "tokenizer", "default_model",
           "from_accelerate", "infer_device_map",
           "OffloadError", "BudgetError", "StoreError", "ModelError", "HardwareError"]
__version__ = "0.1.0"
