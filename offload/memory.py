"""The process's memory as the OS sees it: handing freed heap pages back."""
from __future__ import annotations

import functools


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A prefill's activations are freed when it ends, but glibc keeps the pages in its arenas:
    measured on a Mixtral-shaped model, 19 MiB of RSS the decode steps never use again, inside
    a memory cap that counts it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
