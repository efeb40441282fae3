"""GPU path: pinned bounce buffers, a copy stream and events. Skips where no GPU is present."""
from __future__ import annotations

import pytest
import torch

import offload
from conftest import FAMILIES, tiny_model, weight_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_offload_is_bitwise_and_under_budget(family, offload_dir):
    model = tiny_model(family)
    ids = torch.randint(3, 3000, (4, 9))
    resident = tiny_model(family).cuda()
    with torch.no_grad():
        ref = resident(ids.cuda()).logits
        ref_tokens = resident.generate(ids.cuda(), max_new_tokens=6, do_sample=False,
                                       pad_token_id=0)
    del resident
    torch.cuda.empty_cache()
    budget = int(weight_bytes(model) * 0.2)
    off = offload.run(model, budget=budget, offload_dir=offload_dir, device="cuda",
                      max_tokens=64)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        logits = off(ids.cuda()).logits
        tokens = off.generate(ids.cuda(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref) and torch.equal(tokens, ref_tokens)
    runtime_bytes = off._offload_runtime.device_tier.allocated_bytes
    assert runtime_bytes + torch.cuda.max_memory_allocated() - base <= budget
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
