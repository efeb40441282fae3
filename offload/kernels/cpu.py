"""Which vector path the compiled CPU kernels run: chosen at run time, never at build time.

Levels (``csrc/cpu_isa.h``): ``scalar``, ``avx2`` (AVX2 + FMA + F16C + BMI2) and ``avx512``
(AVX-512 F/BW/VL/VBMI2). Every kernel is built once with all its paths and takes the highest
level it may use, so one build serves every CPU of a fleet and tests can run each path the CPU
can execute. ``$OFFLOAD_CPU_ISA`` (``auto``, ``avx512``, ``avx2``, ``scalar``) caps the level
for a whole process, e.g. to run the suite on the AVX2 path of an AVX-512 machine; asking for a
level the CPU lacks is an error, never a silent downgrade.
"""
from __future__ import annotations

import os

from ..errors import HardwareError
from . import _build

LEVELS = ("scalar", "avx2", "avx512")
ENV = "OFFLOAD_CPU_ISA"


def best() -> str | None:
    """The best level this CPU runs, or ``None`` where the kernels could not be built."""
    lib = _build.cpu_library()
    return None if lib is None else LEVELS[lib.offload_cpu_isa()]


def supported() -> tuple[str, ...]:
    """Every level this CPU runs, lowest first (empty without a compiled kernel)."""
    top = best()
    return () if top is None else LEVELS[:LEVELS.index(top) + 1]


def selected() -> str | None:
    """The level kernels run at in this process: ``$OFFLOAD_CPU_ISA`` or the best.

    Raises:
        HardwareError: the variable names an unknown level or one this CPU lacks.
    """
    asked = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if asked != "auto" and asked not in LEVELS:
        raise HardwareError(f"{ENV}={asked!r} is not a CPU kernel level: use auto, "
                            f"{', '.join(reversed(LEVELS))}")
    top = best()
    if top is None or asked == "auto":
        return top
    if LEVELS.index(asked) > LEVELS.index(top):
        raise HardwareError(f"{ENV}={asked} asks for a path this CPU cannot run (its best is "
                            f"{top}); unset it or use one of {', '.join(supported())}")
    return asked


def level(name: str | None = None) -> int:
    """The integer a kernel takes for ``name`` (default: ``selected()``)."""
    name = selected() if name is None else name
    if name not in LEVELS:
        raise HardwareError(f"unknown CPU kernel level {name!r}: use one of {', '.join(LEVELS)}")
    return LEVELS.index(name)
