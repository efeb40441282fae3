"""Llama-architecture GGUF files with random quantized blocks, written with the ``gguf``
package's writer: real shapes and bytes, random weights (not a trained model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from offload.kernels import gguf as G

BLOCKS = {"Q4_0": (32, 18), "Q8_0": (32, 34)}

# fp16 bit patterns a scale can hold: zeros, infinities, NaNs (quiet, signalling), the
# smallest subnormal, the largest subnormal, the largest normal.
SPECIAL_HALVES = (0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x03FF, 0x7BFF,
                  0xFBFF)


def edge_blocks(name: str, nblocks: int, seed: int) -> np.ndarray:
    """Random blocks (every bit pattern of the quants), a quarter with realistic scales, and
    one block per special scale value."""
    rng = np.random.default_rng(seed)
    _, _, nbytes = G.TYPES[name]
    raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    for i in range(0, nblocks, 4):   # small normal scales (exponent 0x3000-0x3bff)
        for at in G.SCALE_OFFSETS[name]:
            raw[i, at:at + 2] = np.frombuffer(
                np.uint16(0x3000 + rng.integers(0, 0xBFF)).tobytes(), np.uint8)
    for i, half in enumerate(SPECIAL_HALVES):
        for at in G.SCALE_OFFSETS[name]:
            raw[(2 * i + 1) % nblocks, at:at + 2] = np.frombuffer(np.uint16(half).tobytes(),
                                                                  np.uint8)
    return raw


def random_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """``rows`` rows of random ``qtype`` blocks with small fp16 scales (activations stay
    finite through many layers)."""
    _, block, nbytes = G.TYPES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for at in G.SCALE_OFFSETS[qtype]:
        scales = (rng.random((rows, cols // block)) * 0.01 + 0.002).astype(np.float16)
        if qtype.endswith("_K"):   # times 6-bit (Q6_K: int8, of quants to 31) sub-block scales
            scales = (scales / (512 if qtype == "Q6_K" else 32)).astype(np.float16)
        raw[..., at:at + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, cols // block * nbytes)


def write_llama_gguf(path: Path, *, hidden: int, layers: int, intermediate: int, heads: int,
                     kv_heads: int, vocab: int, qtype: str = "Q4_0", seed: int = 0,
                     fused_experts: int = 0, name: str = "random-llama") -> Path:
    """A Llama GGUF (untied head) whose 2-D weights are random ``qtype`` blocks and whose
    norms are ones; returns ``path``. ``fused_experts``: also a 3-D ``blk.0.ffn_gate_exps``
    tensor of that many experts, as MoE GGUFs hold them. ``name``: ``general.name``
    (transformers reads a Llama file named ``mistral`` as Mistral)."""
    import gguf

    rng = np.random.default_rng(seed)
    q = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    head_dim = hidden // heads

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, random_blocks(rows, cols, qtype, rng), raw_dtype=q)   # byte shape

    def ones(name: str) -> None:
        w.add_tensor(name, np.ones(hidden, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        ones(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        ones(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", intermediate, hidden)
        matrix(f"blk.{i}.ffn_up.weight", intermediate, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, intermediate)
    if fused_experts:
        experts = random_blocks(fused_experts * intermediate, hidden, qtype, rng)
        w.add_tensor("blk.0.ffn_gate_exps.weight",
                     experts.reshape(fused_experts, intermediate, -1), raw_dtype=q)
    ones("output_norm.weight")
    matrix("output.weight", vocab, hidden)
    return _finish(w, path)


def _finish(w, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_moe_gguf(path: Path, *, arch: str = "qwen3moe", hidden: int = 64, layers: int = 2,
                   experts: int = 4, used: int = 2, heads: int = 4, kv_heads: int = 2,
                   vocab: int = 256, expert_ff: int | None = None, qtype: str = "Q8_0",
                   down_qtype: str | None = None, up_qtype: str | None = None,
                   shared_ff: int | None = None, per_expert: bool = False,
                   seed: int = 0) -> Path:
    """An MoE GGUF of random ``qtype`` blocks: ``qwen3moe``, ``qwen2moe`` or ``llama`` (how
    llama.cpp writes Mixtral: a Llama with ``expert_count``). Per layer a float32 router,
    experts fused over the layer as llama.cpp writes them (``ffn_{gate,up,down}_exps``: GGUF
    dims ``[H, I, E]`` and ``[I, H, E]``; ``per_expert``: one tensor per expert,
    ``ffn_gate.<e>``, as Mixtral files converted before 2024 hold them), and for ``qwen2moe``
    a shared expert and its gate. ``expert_ff`` defaults to transformers' config default
    (transformers reads no expert width from a Qwen-MoE GGUF: 768 for Qwen3-MoE, 1408 for
    Qwen2-MoE; 256 for the Llama file); ``down_qtype`` / ``up_qtype`` quantize those
    differently (as llama.cpp's mixes do). Random weights, not a trained model."""
    import gguf

    rng = np.random.default_rng(seed)
    qwen2, mixtral = arch == "qwen2moe", arch == "llama"
    ff = expert_ff or (1408 if qwen2 else 256 if mixtral else 768)
    shared_ff = shared_ff or (5632 if qwen2 else 0)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("random-mixtral" if mixtral else f"random-{arch}")
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if mixtral:
        w.add_rope_dimension_count(head_dim)
    elif not qwen2:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    w.add_expert_feed_forward_length(ff)
    if qwen2:
        w.add_expert_shared_feed_forward_length(shared_ff)

    def matrix(name: str, rows: int, cols: int, q: str = qtype, lead: int = 0) -> None:
        blocks = random_blocks(rows * max(lead, 1), cols, q, rng)
        if lead:
            blocks = blocks.reshape(lead, rows, -1)
        w.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[q])

    def floats(name: str, *shape: int, ones: bool = False) -> None:
        data = np.ones(shape, np.float32) if ones else \
            (rng.standard_normal(shape) * 0.5).astype(np.float32)
        w.add_tensor(name, data)

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}"
        floats(f"{b}.attn_norm.weight", hidden, ones=True)
        matrix(f"{b}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"{b}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"{b}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"{b}.attn_output.weight", hidden, heads * head_dim)
        if qwen2:
            for n in ("attn_q", "attn_k", "attn_v"):
                rows = heads * head_dim if n == "attn_q" else kv_heads * head_dim
                floats(f"{b}.{n}.bias", rows)
        elif not mixtral:
            floats(f"{b}.attn_q_norm.weight", head_dim, ones=True)
            floats(f"{b}.attn_k_norm.weight", head_dim, ones=True)
        floats(f"{b}.ffn_norm.weight", hidden, ones=True)
        floats(f"{b}.ffn_gate_inp.weight", experts, hidden)
        if per_expert:
            for e in range(experts):
                matrix(f"{b}.ffn_gate.{e}.weight", ff, hidden)
                matrix(f"{b}.ffn_down.{e}.weight", hidden, ff, down_qtype or qtype)
                matrix(f"{b}.ffn_up.{e}.weight", ff, hidden, up_qtype or qtype)
        else:
            matrix(f"{b}.ffn_gate_exps.weight", ff, hidden, lead=experts)
            matrix(f"{b}.ffn_up_exps.weight", ff, hidden, up_qtype or qtype, lead=experts)
            matrix(f"{b}.ffn_down_exps.weight", hidden, ff, down_qtype or qtype, lead=experts)
        if qwen2:
            floats(f"{b}.ffn_gate_inp_shexp.weight", hidden)
            matrix(f"{b}.ffn_gate_shexp.weight", shared_ff, hidden)
            matrix(f"{b}.ffn_up_shexp.weight", shared_ff, hidden)
            matrix(f"{b}.ffn_down_shexp.weight", hidden, shared_ff)
    floats("output_norm.weight", hidden, ones=True)
    matrix("output.weight", vocab, hidden)
    return _finish(w, path)
