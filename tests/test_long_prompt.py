"""Any prompt length through generate(): a prompt whose one-shot prefill does not fit the
reserve is prefilled in chunks that do, and a context whose cache outgrows the reserve moves to
a paged cache spilled to disk (kv="auto"). Tokens equal the resident model's one-shot run, and
logits are bitwise the resident model's fed the same chunks (transformers' own chunked prefill,
``prefill_chunk_size``)."""
from __future__ import annotations

import copy

import pytest
import torch

import offload
from conftest import tiny_model, weight_bytes
from offload.errors import BudgetError
from offload.planner.options import DEFAULT_MAX_TOKENS


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                              **kw)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("times", [3, 10])
def test_long_prompt_generates_within_the_default_reserve(batch, times, offload_dir):
    model = tiny_model("llama")
    resident = copy.deepcopy(model)
    prompt = times * DEFAULT_MAX_TOKENS
    g = torch.Generator().manual_seed(times + batch)
    ids = torch.randint(3, 3000, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :7], mask[1, :7] = 0, 0   # left padding
    # most of it the reserve: KV and a prefill of 512 positions (3 x 2560: the paged cache's
    # gather buffers and attention's keys over 2566 positions take 16 MB of it)
    budget = int(weight_bytes(model) * (3 if batch * times > 10 else 1.3))
    off = offload.run(model, budget=budget, offload_dir=offload_dir,
                      max_tokens=1024 if batch * times > 10 else 512, progress=False)
    rt = off._offload_runtime
    plan = rt.plan
    # the one-shot prefill's activations alone are over the whole budget
    assert rt.shape.activation_bytes(batch, prompt, prompt, 4, batch) > budget
    out = _generate(off, ids, mask)
    s = offload.stats(off)
    chunk = s["prefill_chunk"]
    assert 0 < chunk < prompt
    assert s["accounted_peak_bytes"] <= budget
    dynamic_kv = 2 * 12 * 2 * 32 * 4 * batch * (prompt + 6)
    if dynamic_kv > plan.reserve_bytes:   # the cache could not fit: paged, spilled to disk
        assert s["kv"]["disk_bytes"] > 0 and s["kv"]["spilled_blocks"] > 0
    ref = _generate(resident, ids, mask, prefill_chunk_size=chunk)
    one_shot = _generate(resident, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    assert torch.equal(out.sequences, one_shot.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, one_shot.logits))
    print(f"prompt {prompt} x {batch}: chunks of {chunk}, max |logit - one-shot| {diff:.2e}")
    assert diff < 1e-4
    offload.close(off)


def test_long_prompt_without_auto_paging_is_refused_with_the_fix(offload_dir):
    model = tiny_model("llama")
    off = offload.run(model, budget=int(weight_bytes(model) * 0.7), offload_dir=offload_dir,
                      kv="dynamic", progress=False)
    ids = torch.randint(3, 3000, (1, 10 * DEFAULT_MAX_TOKENS))
    with pytest.raises(BudgetError, match="max_tokens >= 2566.*kv='auto'"):
        _generate(off, ids, torch.ones_like(ids))
    offload.close(off)


def test_a_paged_plan_prefills_in_chunks_by_itself(offload_dir):
    """kv="paged": generate() gets the runtime's paged cache and a chunk size that fits,
    without the caller feeding the prompt in chunks."""
    model = tiny_model("llama")
    resident = copy.deepcopy(model)
    ids = torch.randint(3, 3000, (2, 300), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    off = offload.run(model, budget=weight_bytes(model), offload_dir=offload_dir,
                      kv="paged", max_context=320, batch=2, prefill_chunk=32, kv_block=32,
                      kv_device_blocks=1, progress=False)
    out = _generate(off, ids, mask)
    s = offload.stats(off)
    assert s["kv"]["spilled_blocks"] > 0 and 0 < s["prefill_chunk"] < 300
    ref = _generate(resident, ids, mask, prefill_chunk_size=s["prefill_chunk"])
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    with pytest.raises(BudgetError, match="max_context=330"):
        with torch.no_grad():
            off.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                         pad_token_id=0)
    offload.close(off)


def _chunked_reference(model, ids, mask, chunk: int, keep: int):
    """The resident model fed ``chunk`` positions at a time, keeping the last ``keep``
    positions' logits (each chunk computes only the kept ones, as offload's chunks do)."""
    from transformers import DynamicCache

    n = ids.shape[1]
    cache, kept = DynamicCache(config=model.config), []
    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            want = max(0, e - max(s, n - keep))
            out = model(ids[:, s:e], attention_mask=mask[:, :e], cache=cache, use_cache=True,
                        logits_to_keep=max(want, 1))
            if want:
                kept.append(out.logits[:, -want:])
    return torch.cat(kept, dim=1)


@pytest.mark.parametrize("keep", [1, 0])
def test_a_direct_forward_beyond_the_reserve_runs_in_chunks(keep, offload_dir):
    """``model(ids)`` whose one-shot activations exceed the reserve runs as chunks that fit
    (each a forward of its own, the caller's or a new cache carrying the context): the last
    position's logits (``logits_to_keep=1``) or every position's (the reserve sized for them
    with ``logits='all'``) are bitwise the resident model's fed the same chunks, within 1e-4
    of its one-shot forward, the returned cache holds the whole prompt, and the measured peak
    stays under the budget."""
    model = tiny_model("llama")
    resident = copy.deepcopy(model)
    prompt = 768 if keep else 300
    ids = torch.randint(3, 3000, (2, prompt), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0   # left padding
    budget = int(weight_bytes(model) * (1.3 if keep else 2.5))
    off = offload.run(model, budget=budget, offload_dir=offload_dir, max_tokens=512,
                      logits="last" if keep else "all", progress=False)
    rt = off._offload_runtime
    one_shot_need = rt._forward_need(2, prompt, prompt, 2 * (keep or prompt),
                                     rt.shape.kv_bytes(2 * prompt, 4))
    assert one_shot_need > rt.plan.reserve_bytes, "the one-shot forward must not fit"
    with torch.no_grad():
        out = off(ids, attention_mask=mask, logits_to_keep=keep)
        no_cache = off(ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
    s = offload.stats(off)
    chunk = s["prefill_chunk"]
    assert 0 < chunk < prompt
    assert s["measured_peak_bytes"] <= budget and s["accounted_peak_bytes"] <= budget
    assert out.logits.shape == (2, keep or prompt, 3000)
    assert out.past_key_values.get_seq_length() == prompt and no_cache.past_key_values is None
    assert torch.equal(no_cache.logits, out.logits)
    ref = _chunked_reference(resident, ids, mask, chunk, keep or prompt)
    assert torch.equal(out.logits, ref)
    with torch.no_grad():
        one_shot = resident(ids, attention_mask=mask).logits[:, -(keep or prompt):]
    diff = (out.logits - one_shot).abs().max().item()
    print(f"direct forward of {prompt} x 2, keep {keep or 'all'}: chunks of {chunk}, "
          f"max |logit - one-shot| {diff:.2e}")
    assert diff < 1e-4
    assert torch.equal(out.logits.argmax(-1), one_shot.argmax(-1))
    offload.close(off)


def test_a_direct_forward_whose_logits_alone_do_not_fit_is_refused(offload_dir):
    model = tiny_model("llama")
    off = offload.run(model, budget=int(weight_bytes(model) * 1.3), offload_dir=offload_dir,
                      max_tokens=512, progress=False)
    ids = torch.randint(3, 3000, (2, 768))
    with torch.no_grad(), pytest.raises(BudgetError, match=r"this forward \(batch 2, 768 "
                                        r"positions\) needs .*logits_to_keep=1"):
        off(ids)   # every position's logits: 18 MB, more than the whole reserve
    offload.close(off)
