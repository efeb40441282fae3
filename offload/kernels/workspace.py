"""What torch's CPU kernels keep for themselves once a model's shapes have run: measured.

MKL keeps its GEMM packing buffers per thread and oneDNN its scratchpads after their first use
(measured for SmolLM2's shapes on 2 threads: 3.8 MB for the linears, 1.3 MB for attention), so
a process that runs a model holds them for the rest of its life, whatever the budget.
``api.run_prepared`` allocates them before the measured peak starts (they are the baseline's,
like the interpreter's, and reported as ``stats()["workspace_bytes"]``): ``library_workspace``
runs the model's linear and attention shapes once, on weights whose pages are never written
(the kernel's zero page: no memory), and returns how much the process's resident memory grew.
A process that already ran those shapes grows by nothing. The figure is an RSS difference,
noisy at a few hundred KB, which is why it sizes nothing.
"""
from __future__ import annotations

import functools
import json
import logging

import torch
import torch.nn.functional as F

from ..memory import rss_bytes, zero_page_tensor

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 64)   # a decode step and a prefill block: GEMV and packed GEMM paths


@functools.lru_cache(maxsize=None)
def _measure(shapes: tuple[tuple[int, int], ...], heads: int, head_dim: int,
             dtype: torch.dtype, threads: int) -> int:
    before = rss_bytes()
    if before is None:
        return 0
    weights = [zero_page_tensor((o, i), dtype) for o, i in shapes]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in PROBE_ROWS:
            for w in weights:
                F.linear(torch.randn(1, rows, w.shape[1], generator=g).to(dtype), w)
            q = torch.randn(1, heads, rows, head_dim, generator=g).to(dtype)
            F.scaled_dot_product_attention(q, q, q, is_causal=rows > 1)
    del weights
    return max(0, (rss_bytes() or before) - before)


@functools.lru_cache(maxsize=None)
def initialise(threads: int | None = None) -> None:
    """Start torch's CPU kernels (the OpenMP pool, MKL's and oneDNN's set-up) on tiny
    shapes: what any process that computes with torch holds, whatever the model, so it
    belongs to the interpreter's baseline rather than to a run's peak."""
    x = torch.ones(1, 2, 8, 8)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            F.linear(x.to(dtype), torch.ones(8, 8, dtype=dtype))
            F.linear(x.reshape(16, 8).to(dtype), torch.ones(8, 8, dtype=dtype))
            F.scaled_dot_product_attention(x.to(dtype), x.to(dtype), x.to(dtype),
                                           is_causal=True)


def library_workspace(shape, dtype: torch.dtype, device: str = "cpu", *,
                      head_rows: int = 0) -> int:
    """Bytes this process's resident memory grows by when torch first runs ``shape``'s linears
    (the head's ``head_rows``-row chunks included) and attention at decode and prefill sizes
    here (0 on a GPU: the CUDA allocator's peaks count cuBLAS workspaces already). Cached per
    process, shape and thread count."""
    if not device.startswith("cpu"):
        return 0
    attn = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    shapes = tuple(sorted({(attn, shape.hidden), (kv, shape.hidden), (shape.hidden, attn),
                           (shape.intermediate, shape.hidden),
                           (shape.hidden, shape.intermediate)}
                          | ({(head_rows, shape.hidden)} if head_rows else set())))
    return _measure(shapes, shape.heads, shape.head_dim, dtype, torch.get_num_threads())


def miniature(config_json: str, dtype: torch.dtype, layers: int = 2):
    """A model of ``config_json``'s family with ``layers`` layers 64 wide (two attention heads,
    tiny experts and vocabulary): its weights too small to matter, so its forward is the
    family's framework work alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(config_json)
    kv = 1 if d.get("num_key_value_heads", 1) != d.get("num_attention_heads", 1) else 2
    small = dict(hidden_size=64, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=kv, head_dim=32, vocab_size=256,
                 num_hidden_layers=min(layers, d.get("num_hidden_layers", layers)))
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in d:
            small[key] = 32
    d.update(small)
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = (d["layer_types"] * layers)[:small["num_hidden_layers"]]
    config = AutoConfig.for_model(d.pop("model_type"), **{
        k: v for k, v in d.items() if k not in ("architectures", "transformers_version")})
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@functools.lru_cache(maxsize=None)
def _warm_family(config_json: str, dtype: torch.dtype) -> None:
    model = miniature(config_json, dtype)
    ids = torch.tensor([[1, 2, 3], [0, 4, 5]])
    with torch.no_grad():
        model.generate(ids, attention_mask=(ids > 0).long(), max_new_tokens=2,
                       do_sample=False, pad_token_id=0)


def warm_code_paths(config, dtype: torch.dtype) -> None:
    """Run a miniature of ``config``'s family (two layers, 64 wide) through a prefill and a
    decode step: the pages of torch's code those paths execute (measured: 3.7 MB of
    libtorch_cpu.so first touched by SmolLM2's first forward) join the baseline, as the
    interpreter's, instead of reading as the run's memory. Best effort: a family the miniature
    cannot be built for is skipped (the measured peak then reads higher, never lower)."""
    try:
        _warm_family(config.to_json_string(use_diff=False), dtype)
    except Exception as e:   # a config the miniature cannot take: only the baseline is larger
        log.debug("code-path warm-up skipped for %s: %s", type(config).__name__, e)


def head_probe(dtype: torch.dtype, hidden: int) -> int:
    """Run the half-precision head's path probe (``head.choose``, cached per process) now,
    and return the bytes the process kept from it (oneDNN's primitive caches and code for
    those matmuls: 3.8 MB on a toy hidden-128 model here, measured as RSS after trimming
    the heap). Like the workspaces, library state: in the baseline, reported, not budgeted;
    its probe's temporaries are freed before a budget is taken."""
    from ..memory import release_free_heap, rss_bytes
    from . import head

    before = rss_bytes()
    head.choose(dtype, hidden)
    release_free_heap()
    after = rss_bytes()
    return max(0, after - before) if before is not None and after is not None else 0
