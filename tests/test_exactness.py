"""Offloaded float32 logits are bitwise the resident model's; greedy tokens are identical."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import offload
from conftest import FAMILIES, tiny_model, weight_bytes
from offload.adapters.dense import ROW_QUANTUM
from offload.hooks import linear_forward
from offload.kernels import head


def _prompts(batch: int, vocab: int, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:   # left padding on one row: the batch path must honour the mask
        ids[1, :3] = 0
        mask[1, :3] = 0
    return ids, mask


def _reference(model, ids, mask, new_tokens):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 4])
def test_random_families_bitwise(family, batch, offload_dir):
    model = tiny_model(family)
    ids, mask = _prompts(batch, model.config.vocab_size)
    ref_logits, ref_tokens = _reference(model, ids, mask, 6)
    budget = int(weight_bytes(model) * 0.20)
    off = offload.run(model, budget=budget, offload_dir=offload_dir, max_tokens=batch * 16)
    plan = off._offload_runtime.plan
    assert plan.stream, "at 20% the layers must stream from disk"
    assert any(k.startswith("layer.") for k in plan.stream)
    logits, tokens = _reference(off, ids, mask, 6)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = offload.stats(off)
    assert s["accounted_peak_bytes"] <= budget
    assert s["bytes_read"]["disk"] > 0
    offload.close(off)


@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_bitwise(smollm2, batch, tmp_path):
    path, tok, resident = smollm2
    tok.padding_side = "left"
    texts = ["The capital of France is", "Write a haiku about disks.", "2 + 2 =",
             "Name three colours:"][:batch]
    enc = tok(texts, return_tensors="pt", padding=True)
    ref_logits, ref_tokens = _reference(resident, enc["input_ids"], enc["attention_mask"], 8)
    off = offload.run(copy.deepcopy(resident), budget="20%", offload_dir=tmp_path,
                      max_tokens=batch * 32)
    assert off._offload_runtime.plan.budget_bytes == int(weight_bytes(resident) * 0.20)
    logits, tokens = _reference(off, enc["input_ids"], enc["attention_mask"], 8)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = offload.stats(off)
    assert s["accounted_peak_bytes"] <= s["budget_bytes"]
    offload.close(off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6144, 576), (21504, 2048)])
def test_half_head_gives_torchs_bits_on_strided_input(shape, dtype):
    """generate's strided h[:, -1:, :] through offload's chunked head (the path chosen on this
    CPU) gives the bits of the model's own call, F.linear on the whole weight, on any CPU."""
    torch.manual_seed(0)
    rows, hidden = shape
    w = torch.randn(rows, hidden).to(dtype)
    cut = rows // 2 // ROW_QUANTUM * ROW_QUANTUM
    chunks = [("a", (0, cut)), ("b", (cut, rows))]
    views = {"a": {"weight": w[:cut]}, "b": {"weight": w[cut:]}}
    out = linear_forward(chunks, rows, views.__getitem__, lambda k: None, fold=False)
    paths = head.choose(dtype, hidden)
    assert paths.single in head.PATHS and paths.batched in head.PATHS
    for batch in (1, 2, 4, 8):
        for new in (1, 3):
            h = torch.randn(batch, 9, hidden).to(dtype)[:, -new:, :]
            assert torch.equal(out(h), F.linear(h, w)), (batch, new, paths)


def test_half_head_choice_falls_back_when_a_path_is_not_exact(monkeypatch, caplog):
    """The probe takes the cheapest exact path in PATHS order, for one batch row and several
    apart: on a CPU where the paths it found round otherwise (simulated), it takes the next,
    and where none is exact, torch's own call (and a warning)."""
    real = head.linear
    off = set()

    def linear(h, weight, path, out=None):   # a CPU on which the paths in ``off`` round otherwise
        res = real(h, weight, path, out)
        return res + 1 if path in off else res

    monkeypatch.setattr(head, "linear", linear)
    probe = head.choose.__wrapped__   # uncached
    assert probe(torch.float32, 64) is None
    seen = []
    while True:
        paths = probe(torch.bfloat16, 64)
        seen.append(paths.batched)
        if paths.batched == "direct":
            break
        off.add(paths.batched)
    assert seen == sorted(seen, key=head.PATHS.index) and len(set(seen)) == len(seen)
    assert "no copy-free path" in caplog.text and seen[-1] == "direct"
    assert probe(torch.float16, 64) == head.HalfPaths("direct", "direct")


HEAD_RSS = """
import sys, torch, torch.nn.functional as F
from offload.hooks import linear_forward
from offload.kernels import head
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def growth(fn):   # peak RSS (VmHWM, reset first) above the RSS before ``fn``
    open("/proc/self/clear_refs", "w").write("5")
    before = rss()
    fn()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 - before
dtype, batch = getattr(torch, sys.argv[1]), int(sys.argv[2])
w = torch.randn(21504, 2048, dtype=dtype)
h = torch.randn(batch, 9, 2048, dtype=dtype)[:, -1:, :]   # not foldable, batch 1 included
paths = head.choose(dtype, 2048)
fwd = linear_forward([("c", (0, 21504))], 21504, lambda k: {"weight": w}, lambda k: None,
                     fold=False, half_paths=paths)
fwd(h[:1].contiguous()); F.linear(h[:1].contiguous(), w)   # warm up (folded: no choice)
out = {}
g_head = growth(lambda: out.setdefault("head", fwd(h)))
ref = F.linear(h, w)
print(paths.for_batch(batch), g_head, head.extra_bytes(paths, batch, 2048, dtype.itemsize,
                                                       21504),
      int(torch.equal(out["head"], ref)))
"""


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_head_runs_without_a_weight_copy(dtype, batch):
    """Measured in a fresh process (peak RSS reset first): the head's strided call on
    the path chosen for this CPU grows the peak by no more than the runtime counts for it
    (plus the logits and 2 MB of allocator slack), far less than one weight, and gives torch's
    bits."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", HEAD_RSS, dtype, str(batch)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    path, growth, counted, same = r.stdout.split()
    weight, logits = 21504 * 2048 * 2, 2 * batch * 21504 * 2
    assert path in ("per_row", "contiguous", "sub_rows"), f"no copy-free exact path ({path})"
    assert int(same) == 1
    assert int(growth) <= int(counted) + logits + (2 << 20), (path, growth, counted)
    assert int(growth) < weight // 4


def test_bf16_model_bitwise(offload_dir):
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids, mask = _prompts(4, model.config.vocab_size)
    ref_logits, ref_tokens = _reference(model, ids, mask, 5)
    off = offload.run(model, budget=int(weight_bytes(model) * 0.4), offload_dir=offload_dir,
                      max_tokens=64, batch=4, logits="all")   # whole-prompt logits at batch 4
    assert any(k.startswith("head.") for k in off._offload_runtime.plan.stream)
    logits, tokens = _reference(off, ids, mask, 5)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    offload.close(off)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_generate_step_logits_bitwise(requires_grad, dtype, offload_dir):
    """generate() keeps the last position's logits only (a strided ``h[:, -1:, :]`` into the
    head): torch computes that with another kernel when the weight requires grad (for every
    dtype), and the offloaded head must follow the model it replaced either way. Here the
    layers stream and the planner can keep the head whole where its chunks would not be
    bitwise on this machine, so the plan owes bitwise logits at every step (at 50%: the
    reserve holds the float16 head's per-row copies of a batch of 4)."""
    model = tiny_model("llama", dtype=dtype).requires_grad_(requires_grad)
    ids, mask = _prompts(4, model.config.vocab_size)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    off = offload.run(model, budget=int(weight_bytes(model) * 0.5), offload_dir=offload_dir,
                      max_tokens=64, batch=4)
    plan = off._offload_runtime.plan
    assert any(k.startswith("layer.") for k in plan.stream) and 4 not in plan.head_inexact_rows
    with torch.no_grad():
        out = off.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    offload.close(off)


@pytest.mark.parametrize("shape", [(3000, 128), (3072, 128), (6000, 576)])
def test_chunking_probe_agrees_with_a_real_weight(shape):
    """The zero-page probe's answer (at which input rows a 1024-row chunk of the head rounds
    otherwise than the whole matrix) is the answer a real random weight gives on this CPU."""
    vocab, hidden = shape
    bounds = tuple((a, min(vocab, a + ROW_QUANTUM)) for a in range(0, vocab, ROW_QUANTUM))
    found = head.chunking_mismatches(vocab, hidden, torch.float32, bounds)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(vocab, hidden, generator=g)
    truth = []
    for m in head.PROBE_ROWS:
        h = torch.randn(m, hidden, generator=g)
        whole = F.linear(h, w)
        if not all(torch.equal(whole[:, a:b], F.linear(h, w[a:b])) for a, b in bounds):
            truth.append(m)
    assert found == tuple(truth)


def test_a_head_whose_chunks_round_otherwise_is_kept_whole(offload_dir, monkeypatch, caplog):
    """On a machine whose matmul rounds a head chunk otherwise than the whole matrix at batch
    4 (simulated here), the planner keeps the head resident and the runtime multiplies it as
    one matrix (bitwise); a budget that cannot hold it streams it, says so in the Plan and
    warns."""
    model = tiny_model("llama")
    ids, mask = _prompts(4, model.config.vocab_size)
    ref_logits, ref_tokens = _reference(model, ids, mask, 4)
    monkeypatch.setattr(head, "chunking_mismatches", lambda *a: (4, 5))
    small = offload.plan(copy.deepcopy(model), int(weight_bytes(model) * 0.2),
                         offload_dir=offload_dir, max_tokens=64)
    assert any(k.startswith("head.") for k in small.stream)
    assert small.head_inexact_rows == (4, 5) and "rounds otherwise" in small.table()
    assert "a budget" in caplog.text and "keeps it resident" in caplog.text
    off = offload.run(model, budget=int(weight_bytes(model) * 0.35), offload_dir=offload_dir,
                      max_tokens=64)
    rt = off._offload_runtime
    assert not any(k.startswith("head.") for k in rt.plan.stream)
    assert not rt.plan.head_inexact_rows
    assert rt._whole_weight([(k, rt.units[k].rows) for k in rt.manifest.groups()["head"]]) \
        is not None
    logits, tokens = _reference(off, ids, mask, 4)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    offload.close(off)
