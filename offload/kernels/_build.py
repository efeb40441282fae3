"""Lazy builds of the ``csrc/`` kernels into shared libraries with a plain C ABI.

Why not ``torch.utils.cpp_extension``: it needs ninja and torch's headers (a build of 30 s or
more per kernel), and builds CUDA code only with a CUDA build of torch. The kernels take raw
pointers, so a C ABI loaded with ``ctypes`` needs neither: ``g++`` builds the CPU kernel in
about a second, ``nvcc`` the CUDA one, with the same command CI uses for its compile check.

Builds are cached under ``$OFFLOAD_CACHE/ext`` (default ``~/.cache/offload/ext``), keyed by a
hash of the source, compiler and flags; each is written to a temporary name and renamed into
place, so an interrupted build leaves nothing half-written. A missing compiler or a failed
build is one warning, after which callers use the kernel's reference (same bits, slower).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# -ffp-contract=off: no fused multiply-add, so float kernels round each step as their numpy and
# torch references do (the GGUF dequantizers are bitwise the gguf package's).
CPU_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")


class KernelBuildWarning(RuntimeWarning):
    """A compiled kernel is unavailable; the pure-torch reference is used instead."""


def build_dir() -> Path:
    root = os.environ.get("OFFLOAD_CACHE") or os.path.join(Path.home(), ".cache", "offload")
    return Path(root) / "ext"


def cxx() -> str:
    return os.environ.get("OFFLOAD_CXX") or os.environ.get("CXX") or "g++"


def nvcc() -> str:
    return os.environ.get("OFFLOAD_NVCC") or "nvcc"


def nvcc_command(source: Path, out: Path, arch: str, *, compile_only: bool = False,
                 ptx: bool = False) -> list[str]:
    """The nvcc command line for ``source`` (the tests run it with ``compile_only`` or
    ``ptx``). ``--fmad=false``: no fused multiply-add, as ``-ffp-contract=off`` on the CPU."""
    mode = ["--ptx"] if ptx else ["-c"] if compile_only else ["-shared", "-Xcompiler", "-fPIC"]
    return [nvcc(), "-O3", "-std=c++17", "--fmad=false", f"-arch={arch}", *mode, "-o", str(out),
            str(source)]


@functools.lru_cache(maxsize=None)
def cpu_library(name: str = "bitmap_decode_cpu"):
    """The CPU kernel library ``csrc/{name}.cpp``, built if needed; ``None`` (one warning)
    when there is no compiler or the build fails."""
    source = CSRC / f"{name}.cpp"
    compiler = cxx()
    return _load(source, lambda out: [compiler, *CPU_FLAGS, "-o", str(out), str(source)],
                 key=(compiler, *CPU_FLAGS), what="C++ compiler", tool=compiler)


@functools.lru_cache(maxsize=None)
def cuda_library(arch: str, name: str = "bitmap_decode"):
    """The CUDA kernel library ``csrc/{name}.cu`` for ``arch`` (``sm_90``), or ``None``."""
    source = CSRC / f"{name}.cu"
    return _load(source, lambda out: nvcc_command(source, out, arch),
                 key=(nvcc(), arch), what="CUDA compiler", tool=nvcc())


def _digest(source: Path, key: tuple = ()) -> str:
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    return hashlib.sha256(source.read_bytes() + headers + repr(key).encode()).hexdigest()[:16]


def source_digest(name: str) -> str:
    """A digest of the CPU kernel source ``csrc/{name}.cpp`` and the headers beside it (what
    a build of it depends on); empty where the source is missing."""
    source = CSRC / f"{name}.cpp"
    return _digest(source) if source.is_file() else ""


def _load(source: Path, command, *, key: tuple, what: str, tool: str):
    if not source.is_file():
        return _unavailable(f"the kernel source {source} is missing (offload installed without "
                            "csrc/)")
    if shutil.which(tool) is None:
        return _unavailable(f"no {what} ({tool!r} is not on PATH); install one (or set "
                            f"{'OFFLOAD_NVCC' if 'CUDA' in what else 'OFFLOAD_CXX'})")
    digest = _digest(source, key)
    target = build_dir() / f"{source.stem}-{digest}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
            log.info("building %s", target.name)
            done = subprocess.run(command(tmp), capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                return _unavailable(f"building {source.name} failed:\n{done.stderr.strip()}")
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as e:
            return _unavailable(f"building {source.name} failed: {e}")
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        return _unavailable(f"loading {target} failed: {e}")


def _unavailable(reason: str):
    warnings.warn(f"{reason}; using the kernel's reference decoder instead (slower, same bits)",
                  KernelBuildWarning, stacklevel=3)
    return None
