"""GPU path: pinned bounce buffers, a copy stream and events. Skips where no GPU is present."""
from __future__ import annotations

import pytest
import torch

import offload
from conftest import FAMILIES, tiny_model, weight_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_reference(resident, ids):
    """Logits and 6 greedy tokens of ``resident`` run whole on the GPU (then freed)."""
    resident = resident.cuda()
    with torch.no_grad():
        ref = resident(ids.cuda()).logits
        ref_tokens = resident.generate(ids.cuda(), max_new_tokens=6, do_sample=False,
                                       pad_token_id=0)
    del resident
    torch.cuda.empty_cache()
    return ref, ref_tokens


def _check_bitwise_under_budget(off, ids, ref, ref_tokens, budget: int) -> None:
    """Logits and 6 greedy tokens equal the GPU reference; the runtime's buffers plus the
    forward's peak CUDA allocations stay under ``budget``."""
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        logits = off(ids.cuda()).logits
        tokens = off.generate(ids.cuda(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref) and torch.equal(tokens, ref_tokens)
    runtime_bytes = off._offload_runtime.device_tier.allocated_bytes
    assert runtime_bytes + torch.cuda.max_memory_allocated() - base <= budget


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_offload_is_bitwise_and_under_budget(family, offload_dir):
    model = tiny_model(family)
    ids = torch.randint(3, 3000, (4, 9))
    ref, ref_tokens = _gpu_reference(tiny_model(family), ids)
    budget = int(weight_bytes(model) * 0.2)
    off = offload.run(model, budget=budget, offload_dir=offload_dir, device="cuda",
                      max_tokens=64)
    _check_bitwise_under_budget(off, ids, ref, ref_tokens, budget)
    s = offload.stats(off)
    assert s["bytes_read"]["host_to_device"] > 0
    offload.close(off)


def test_gpu_host_tier_is_bitwise(offload_dir):
    model = tiny_model("llama")
    ids = torch.randint(3, 3000, (2, 9))
    with torch.no_grad():
        ref = tiny_model("llama").cuda()(ids.cuda()).logits
    wb = weight_bytes(model)
    off = offload.run(model, budget=int(wb * 0.2), offload_dir=offload_dir, device="cuda",
                      host_budget=int(wb * 0.5), max_tokens=64)
    plan = off._offload_runtime.plan
    assert any(t == "host" for _, t, _ in plan.homes)
    with torch.no_grad():
        assert torch.equal(off(ids.cuda()).logits, ref)
    s = offload.stats(off)
    assert s["host_bytes"] > 0 and s["bytes_read"]["host_to_device"] > 0
    offload.close(off)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_bitmap_decode_matches_the_reference(dtype):
    from offload.kernels import bitmap

    device = torch.device("cuda")
    assert bitmap.cuda_kernel(device) is not None, "nvcc must build the kernel on a GPU machine"
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (63,), (3, 65), (17, 2049), (1000, 4099)]:
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            t = torch.randn(shape, generator=g).to(dtype)
            t[torch.rand(shape, generator=g) < sparsity] = 0
            enc, nnz = bitmap.encode(t)
            out = torch.full((t.numel() * dtype.itemsize,), 0xA5, dtype=torch.uint8,
                             device=device)
            bitmap.decode(enc.to(device), out, t.numel(), nnz, dtype.itemsize)
            assert torch.equal(out.cpu(), t.reshape(-1).view(torch.uint8)), (shape, sparsity)
    assert bitmap.device_errors(device) == 0


def test_cuda_bitmap_kernel_never_reads_past_a_corrupt_bitmap():
    from offload.kernels import bitmap

    device = torch.device("cuda")
    t = torch.randn(5000).half()
    t[::2] = 0
    enc, nnz = bitmap.encode(t)
    bad = enc.clone()
    bad[:8] = 255   # the first tile claims 64 values: its group disagrees with its offsets
    out = torch.zeros(t.numel() * 2, dtype=torch.uint8, device=device)
    bitmap.decode(bad.to(device), out, t.numel(), nnz, 2)
    torch.cuda.synchronize()
    assert bitmap.device_errors(device) >= 1
    with pytest.raises(bitmap.CorruptBitmap):
        bitmap.validate(bad, t.numel(), nnz)   # what the runtime checks before the copy


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_gpu_pruned_bitmap_model_is_bitwise_and_under_budget(fraction, offload_dir):
    from offload.adapters import adapter_for
    from offload.store.prune import prune_model

    model = tiny_model("llama")
    prune_model(model, 0.5, adapter_for(model.config))
    resident = tiny_model("llama")
    prune_model(resident, 0.5, adapter_for(resident.config))
    ids = torch.randint(3, 3000, (4, 9))
    ref, ref_tokens = _gpu_reference(resident, ids)
    budget = int(weight_bytes(model) * fraction)
    off = offload.run(model, budget=budget, offload_dir=offload_dir, device="cuda",
                      max_tokens=64, sparse="bitmap")
    rt = off._offload_runtime
    if fraction == 0.2:   # at 50% the bitmap Units may all fit resident: bitwise, in budget
        assert any(rt.units[k].encoded for k in rt.plan.stream)
    _check_bitwise_under_budget(off, ids, ref, ref_tokens, budget)
    s = offload.stats(off)
    if fraction == 0.2:
        assert s["sparse"]["units_decoded"] > 0
        assert s["bytes_read"]["host_to_device"] < s["sparse"]["dense_bytes"] + 10 * 4096 * 60
    offload.close(off)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                                  "Q4_K", "Q5_K", "Q6_K"])
def test_cuda_gguf_decoders_are_bitwise_gguf_dequantize(name):
    """Each CUDA GGUF decoder (NVRTC through CuPy where installed, else nvcc) against the gguf
    package's dequantize, bit for bit: random blocks, special fp16 scales (zeros, infinities,
    NaN payloads, subnormals), an odd block count, nothing written past the destination."""
    import numpy as np

    from gguf_files import edge_blocks
    from offload.kernels import cuda, gguf

    device = torch.device("cuda")
    assert cuda.kernels(device) is not None, "CuPy or nvcc must build the decoders on a GPU"
    raw = edge_blocks(name, 4099, seed=len(name))
    with np.errstate(all="ignore"):
        want = torch.from_numpy(gguf.reference(raw, name).view(np.int32).copy())
    src = torch.from_numpy(raw.reshape(-1).copy()).to(device)
    out = torch.full((want.numel() * 4 + 256,), 0xA5, dtype=torch.uint8, device=device)
    gguf.dequantize(src, out, name, want.numel())
    got = out[:want.numel() * 4].cpu().view(torch.int32)
    bad = torch.nonzero(got != want)
    assert not bad.numel(), (bad[:5], got[bad[:1]], want[bad[:1]])
    assert (out[want.numel() * 4:] == 0xA5).all().item(), "wrote past the destination"


def test_gpu_quantized_gguf_is_bitwise_transformers(offload_dir):
    """The default SmolLM2 GGUF on the GPU, its quantized Units streamed as stored and decoded
    there: logits and greedy tokens bitwise transformers' model of the same file on the GPU."""
    from conftest import smollm2_path
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    ids = torch.randint(3, 3000, (2, 9))
    resident = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    ref, ref_tokens = _gpu_reference(resident, ids)
    budget = 120 << 20
    off = offload.run(path, budget=budget, offload_dir=offload_dir, device="cuda",
                      max_tokens=64)
    rt = off._offload_runtime
    assert any(rt.units[k].encoded for k in rt.plan.stream)
    _check_bitwise_under_budget(off, ids, ref, ref_tokens, budget)
    assert offload.stats(off)["sparse"]["units_decoded"] > 0
    offload.close(off)


def test_gpu_moe_gguf_caches_quantized_experts_bitwise(tmp_path):
    """A Qwen3-MoE GGUF on the GPU: experts cached as stored in device slots (through the
    pinned bounce buffers) and decoded on the compute stream at each use; logits and greedy
    tokens bitwise transformers' model of the same file on the GPU. Random weights."""
    from gguf_files import write_moe_gguf
    from transformers import AutoModelForCausalLM

    path = write_moe_gguf(tmp_path / "q3.gguf", qtype="Q4_0", down_qtype="Q8_0", layers=3,
                          experts=8)
    ids = torch.randint(0, 256, (2, 9))
    resident = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    ref, ref_tokens = _gpu_reference(resident, ids)
    budget = 8 << 20   # under the 14 MB of experts decoded: cached as stored (CPU: 24 slots)
    off = offload.run(path, budget=budget, offload_dir=tmp_path / "out", device="cuda",
                      max_tokens=64)
    _check_bitwise_under_budget(off, ids, ref, ref_tokens, budget)
    ex = offload.stats(off)["experts"]
    assert ex["slots"] >= 2 and ex["resident"] == 0 and ex["expert_decoded_bytes"] > 0
    offload.close(off)
