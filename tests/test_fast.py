"""compute="fast": GGUF-quantized linear weights multiplied from their blocks by the fused
kernel. Opt-in and lossy (8-bit activations): its quality on the real SmolLM2 against exact,
its plan (Units kept as stored, priced by the kernel), offloaded == resident under it, and
its refusals."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import offload
from conftest import require_smollm2
from gguf_files import write_llama_gguf
from offload import api
from offload.errors import HardwareError, OffloadError
from offload.kernels import qmatmul

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from bench_quant import teacher_forced  # noqa: E402  (the bench's measure, 512 tokens here)


@pytest.mark.parametrize("road", ["chunks", "decode"])
def test_fast_agrees_with_exact_on_smollm2(road, tmp_path):
    """2,048 tokens of README.md, teacher-forced (the issue's measure, as the bench takes it):
    greedy tokens of fast agree with exact's on at least 95% of positions, and perplexity
    within 1%; fed 16 positions per forward through transformers' cache (``chunks``), and one
    per forward through the cache written in place (``decode``: the road a fast run decodes
    on, the layer kernel's one call with its attention). (A 512-token window is too short a
    sample: its agreement measured 94.7% on an AVX-512 machine whose 2,048 tokens agree on
    96.3%.)"""
    path = require_smollm2()
    tok = api.tokenizer(str(path))
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :2048]
    assert ids.shape[1] == 2048
    got = {}
    for mode in ("exact", "fast"):
        model = offload.run(str(path), budget="800MB", compute=mode, offload_dir=tmp_path,
                            max_tokens=2056, logits="all", progress=False)
        assert api.runtime_of(model).plan.compute == mode
        got[mode] = (teacher_forced(model, ids, 1, in_place=True)
                     if mode == "fast" and road == "decode"
                     else teacher_forced(model, ids, qmatmul.INT_ROWS))
        offload.close(model)
    agree = (got["exact"][0] == got["fast"][0]).float().mean().item()
    ppl = {m: math.exp(v[1]) for m, v in got.items()}
    print(f"agreement {agree:.4f}, perplexity exact {ppl['exact']:.3f} fast {ppl['fast']:.3f}")
    assert agree >= 0.95
    assert abs(ppl["fast"] / ppl["exact"] - 1) <= 0.01
    assert agree < 1.0 or ppl["fast"] != ppl["exact"]   # it really ran another computation


def test_fast_offloaded_is_bitwise_fast_resident(tmp_path):
    """The fused kernel's result does not depend on where a Unit lives: SmolLM2 streamed at
    15% (layers read into slots) gives the logits and greedy tokens of the whole model
    resident, bitwise; embedding rows kept as blocks decode as rows gathered from disk do."""
    path = require_smollm2()
    tok = api.tokenizer(str(path))
    enc = tok(["The capital of France is", "Write a haiku about disks."], return_tensors="pt",
              padding=True)
    out = {}
    for budget in ("100%", "15%"):
        model = offload.run(str(path), budget=budget, compute="fast", offload_dir=tmp_path,
                            max_tokens=64, progress=False)
        rt = api.runtime_of(model)
        with torch.no_grad():
            out[budget] = (model(**enc).logits,
                           model.generate(**enc, max_new_tokens=8, do_sample=False,
                                          pad_token_id=tok.pad_token_id))
        if budget == "15%":
            assert any(k.startswith("layer.") for k in rt.plan.stream)
            assert offload.stats(model)["bytes_read"]["disk"] > 0
        else:   # embedding rows gathered from disk (a chunk not resident) decode the same
            rows = torch.tensor([7, 1000, 3])
            blocks = rt.resident["embed.0"]["weight"]
            assert blocks.dtype == torch.uint8
            assert torch.equal(rt._gather("embed.0", rows),
                               rt._rows_decoder([("embed.0", (0, 1024))])(blocks[rows]))
        offload.close(model)
    assert torch.equal(out["100%"][0], out["15%"][0])
    assert torch.equal(out["100%"][1], out["15%"][1])


def test_fast_plan_keeps_linear_weights_as_stored(tmp_path):
    """The plan of fast places the Units as stored: every decoder projection and the tied
    embedding/head in their blocks (fewer bytes than exact's decoded float32), the budget
    still a share of the decoded weights, and the table says which mode it plans."""
    path = require_smollm2()
    exact = offload.plan(str(path), "20%", offload_dir=tmp_path)
    fast = offload.plan(str(path), "20%", offload_dir=tmp_path, compute="fast")
    assert exact.compute == "exact" and fast.compute == "fast"
    chunks = sum(1 for k, _, _ in fast.homes if k.startswith("embed."))
    assert fast.fused_tensors == 30 * 7 + chunks   # q k v o gate up down x 30, the embedding
    assert fast.budget_bytes == exact.budget_bytes
    assert fast.weight_bytes < exact.weight_bytes / 4
    assert f"compute: fast: {30 * 7 + chunks} quantized weights" in fast.table()
    assert "compute: exact" in exact.table()
    assert fast.predicted_s < exact.predicted_s


def test_fast_plan_trades_a_one_shot_prefill_for_weights(tmp_path):
    """Where a fast plan streams, its reserve is sized for prefill chunks when that keeps
    more weights in memory and the decode step is predicted faster (SmolLM2 at 20% for 384
    positions: the one-shot prefill of all of them is what prefill_chunk=384 asks for; its
    reserve 41 MB, chunks of 128 29 MB, their decode steps included: 16% faster predicted
    here); a fast plan that holds everything, and an exact one, stay one-shot. A longer prompt
    through generate() is prefilled in chunks that fit, and its tokens are the resident fast
    model's fed the same chunks. (At 256 positions the chunks' gain is now at the 2% the plan
    asks: the reserve holds every decode step since 6eefa59, 3.6 MB less room gained.)"""
    from offload.planner.make import AUTO_CHUNKS

    path = require_smollm2()
    kw = dict(offload_dir=tmp_path, compute="fast", max_tokens=384)
    chosen = offload.plan(str(path), "20%", **kw)
    one_shot = offload.plan(str(path), "20%", prefill_chunk=384, **kw)
    assert one_shot.kv.prefill_chunk == 0 and one_shot.streamed_bytes > 0
    assert chosen.kv.prefill_chunk in AUTO_CHUNKS
    assert f"prefill in chunks of {chosen.kv.prefill_chunk}" in chosen.table()
    assert chosen.reserve_bytes < one_shot.reserve_bytes
    assert chosen.streamed_bytes < one_shot.streamed_bytes
    assert chosen.predicted_s < one_shot.predicted_s
    assert offload.plan(str(path), "100%", **kw).kv.prefill_chunk == 0
    assert offload.plan(str(path), "20%", offload_dir=tmp_path).kv.prefill_chunk == 0

    tok = api.tokenizer(str(path))
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :360]
    out = {}
    for budget in ("20%", "100%"):
        model = offload.run(str(path), budget=budget, progress=False, **kw)
        chunk = {} if budget == "20%" else dict(prefill_chunk_size=out["chunk"])
        with torch.no_grad():
            out[budget] = model.generate(ids, max_new_tokens=6, do_sample=False, **chunk)
        if budget == "20%":
            out["chunk"] = offload.stats(model)["prefill_chunk"]
            assert 0 < out["chunk"] < ids.shape[1]   # chunked (the largest that fits)
        offload.close(model)
    assert torch.equal(out["20%"], out["100%"])


INT_CHUNKS = textwrap.dedent("""
    import json, sys, torch
    import offload
    from offload import api
    from offload.kernels import qmatmul
    path, work, prompt, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(2)
    prefill_road = []   # the dequantizing road's calls, and whether a scratch was held
    by_chunks = qmatmul._by_chunks

    def counted(x2, blocks, qtype, y2, scratch):
        prefill_road.append(scratch is not None)
        return by_chunks(x2, blocks, qtype, y2, scratch)

    qmatmul._by_chunks = counted
    model = offload.run(path, budget=budget, compute="fast", max_tokens=84, offload_dir=work,
                        progress=False)
    plan = api.runtime_of(model).plan
    ids = torch.randint(3, 40000, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=84 - prompt, min_new_tokens=84 - prompt,
                             do_sample=False)
    s = offload.stats(model)
    print(json.dumps(dict(chunk=plan.kv.prefill_chunk, streamed=plan.streamed_bytes,
                          scratch=plan.kv.fused_scratch_bytes, tokens=out.shape[1],
                          used_chunk=s["prefill_chunk"], road=len(prefill_road),
                          budget=plan.budget_bytes, table=plan.table(),
                          **{k: s[k] for k in ("measured_peak_bytes", "allocated_bytes")})))
""")


def test_fast_plan_in_integer_chunks_holds_every_weight_and_its_budget(tmp_path):
    """Where the larger chunks still stream, a fast plan may prefill in chunks of
    ``INT_ROWS`` positions: every forward then takes the integer kernel, which needs no
    prefill scratch, so the reserve holds none (4 MB) and, where that is what it takes, every
    weight stays in memory (SmolLM2 at 20% for 84 positions streamed 12 of its 30 down
    projections in chunks of 64). SmolLM2 at the least budget that holds every weight in
    chunks of 16 (106.8 MB on an AVX-512 EPYC: 20% is 107.6): chosen, where chunks of 64 stream.
    Run in a fresh process from a 40-token prompt to 84 (the store packed before it, so the
    run's peak is its own): chunks of 16, nothing streamed, no call on the dequantizing road,
    and the measured peak within the budget."""
    path = offload.pack(str(require_smollm2()), tmp_path / "smollm2", progress=False).path
    kw = dict(offload_dir=tmp_path, compute="fast", max_tokens=84)
    whole = offload.plan(str(path), "100%", prefill_chunk=qmatmul.INT_ROWS, **kw)
    assert whole.streamed_bytes == 0
    budget = whole.total_bytes + (64 << 10)
    chosen = offload.plan(str(path), budget, **kw)
    by_64 = offload.plan(str(path), budget, prefill_chunk=64, **kw)
    assert by_64.streamed_bytes > 0 and by_64.kv.fused_scratch_bytes > 0
    assert "the fused kernel's prefill scratch" in by_64.table()
    assert chosen.kv.prefill_chunk == qmatmul.INT_ROWS
    assert chosen.streamed_bytes == 0 and chosen.kv.fused_scratch_bytes == 0
    assert chosen.reserve_bytes <= by_64.reserve_bytes - by_64.kv.fused_scratch_bytes
    # at 100% nothing streams one-shot: no chunks
    assert offload.plan(str(path), "100%", **kw).kv.prefill_chunk == 0

    r = subprocess.run([sys.executable, "-c", INT_CHUNKS, str(path), str(tmp_path), "40",
                        str(budget)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print({k: v for k, v in res.items() if k != "table"})
    assert res["chunk"] == qmatmul.INT_ROWS and res["streamed"] == 0, res["table"]
    assert res["tokens"] == 84 and res["used_chunk"] == qmatmul.INT_ROWS
    assert res["road"] == 0   # every forward on the integer kernel
    assert res["allocated_bytes"] <= res["measured_peak_bytes"] <= res["budget"], res


def test_fast_prefill_scratch_is_held_only_through_large_forwards(tmp_path):
    """The fused kernel's prefill scratch is mapped for a forward of more than ``INT_ROWS``
    rows (the dequantizing road's every call gets it) and let go at the next forward of
    fewer; the runtime's check counts it for exactly those forwards."""
    from offload.planner.reserve import forward_bytes

    path = write_llama_gguf(tmp_path / "m.gguf", hidden=256, layers=2, intermediate=512,
                            heads=4, kv_heads=2, vocab=512, qtype="Q4_0")
    model = offload.run(str(path), budget="100%", compute="fast", offload_dir=tmp_path / "o",
                        max_tokens=64, progress=False)
    rt = api.runtime_of(model)
    scratch = rt._fused_scratch
    assert scratch.nbytes > 0 and scratch.buffer is None   # nothing mapped at start
    seen = []
    by_chunks = qmatmul._by_chunks

    def counted(x2, blocks, qtype, y2, buf):
        seen.append(buf is not None and buf is scratch.buffer)
        return by_chunks(x2, blocks, qtype, y2, buf)

    try:
        qmatmul._by_chunks = counted
        ids = torch.randint(0, 512, (1, qmatmul.INT_ROWS + 4))
        with torch.no_grad():
            out = model(ids, use_cache=True)
            assert seen and all(seen) and scratch.buffer is not None
            n = len(seen)
            model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
            assert len(seen) == n and scratch.buffer is None
    finally:
        qmatmul._by_chunks = by_chunks
        offload.close(model)
    shape, size, s = rt.shape, rt.itemsize, scratch.nbytes
    for new, held in ((qmatmul.INT_ROWS, 0), (qmatmul.INT_ROWS + 1, s)):
        kw = dict(batch=1, new=new, total=new, logits_rows=1, kv_bytes=0)
        assert forward_bytes(shape, size, fused_scratch=s, **kw) == \
            forward_bytes(shape, size, **kw) + held
    # the runtime's check: rows over all sequences (2 x 8 = INT_ROWS, 2 x 9 above it)
    for new, held in ((qmatmul.INT_ROWS // 2, 0), (qmatmul.INT_ROWS // 2 + 1, s)):
        assert rt._forward_need(2, new, 30, 2, 0) == forward_bytes(
            shape, size, batch=2, new=new, total=30, logits_rows=2, kv_bytes=0,
            head_copy=rt._head_copy(2)) + held


def test_fast_runs_k_quants_end_to_end_and_streams(tmp_path):
    """A random Llama GGUF of Q4_K (and one of Q6_K) blocks, untied head: fast streamed at
    its minimum budget gives fast resident's logits bitwise, and exact's within a fraction of
    their spread."""
    for qtype in ("Q4_K", "Q6_K"):
        path = write_llama_gguf(tmp_path / f"{qtype}.gguf", hidden=256, layers=4,
                                intermediate=1024, heads=4, kv_heads=2, vocab=1024, qtype=qtype)
        ids = torch.randint(0, 1024, (2, 5), generator=torch.Generator().manual_seed(1))
        logits = {}
        tight = offload.plan(str(path), "100%", compute="fast", offload_dir=tmp_path / "o",
                             max_tokens=32).minimum_bytes + (64 << 10)   # layers stream
        for mode, budget in (("exact", "100%"), ("fast", "100%"), ("fast", tight)):
            model = offload.run(str(path), budget=budget, compute=mode,
                                offload_dir=tmp_path / "o", max_tokens=32, progress=False)
            if budget == tight:
                assert any(k.startswith("layer.") for k in api.runtime_of(model).plan.stream)
            with torch.no_grad():
                logits[mode, budget] = model(ids).logits
            offload.close(model)
        assert torch.equal(logits["fast", "100%"], logits["fast", tight])
        exact, fast = logits["exact", "100%"], logits["fast", "100%"]
        assert not torch.equal(exact, fast)
        # 8-bit activations through 4 random layers: a few percent (Q4_K) to ~10% (Q6_K) of
        # the logits' spread; a weight bound to the wrong module, or transposed, is ~100%
        assert (fast - exact).abs().max() < 0.25 * exact.std(), qtype


def test_fast_is_refused_where_it_cannot_run(tmp_path):
    """Bad modes before any work; fast on a GPU device with what to do; a store without GGUF
    blocks runs exact, saying so."""
    path = require_smollm2()
    with pytest.raises(OffloadError, match="compute='quick': use 'exact'"):
        offload.run(str(path), budget="20%", compute="quick", offload_dir=tmp_path)
    prep = api.prepare(str(path), offload_dir=tmp_path, progress=False)
    with pytest.raises(HardwareError, match="compute='fast' runs on the CPU for now"):
        api.for_compute(prep, "fast", torch.device("cuda"))
    assert api.for_compute(prep, "exact", torch.device("cpu")) is prep


def test_cli_fast_summary_and_bad_flag(tmp_path):
    path = require_smollm2()
    env = {"OFFLOAD_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "offload.cli", "run", str(path), "--budget", "25%",
                        "--compute", "fast", "--max-new-tokens", "4", "--prompt", "Hello"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compute" in r.stdout and "fast: 258 quantized weights" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "offload.cli", "run", str(path), "--compute", "quick"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "--compute" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])   # llama: a Mixtral file
def test_fast_on_a_moe_gguf_fuses_attention_and_keeps_experts_exact(arch, tmp_path):
    """An MoE GGUF under fast: the attention projections are multiplied from their blocks,
    the experts (the MoE block's own compute) and the float32 routers are not; with the
    expert cache at a budget that streams experts, fast gives fast resident's bits and
    exact's logits within a fraction of their spread."""
    from gguf_files import write_moe_gguf

    path = write_moe_gguf(tmp_path / f"{arch}.gguf", arch=arch, qtype="Q8_0", layers=2,
                          experts=4, hidden=64)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    whole = offload.plan(str(path), "64MB", compute="fast", offload_dir=tmp_path / "o",
                         max_tokens=16)
    tight = whole.minimum_bytes + (32 << 10)
    logits = {}
    for mode, budget in (("exact", "64MB"), ("fast", "64MB"), ("fast", tight)):
        model = offload.run(str(path), budget=budget, compute=mode, offload_dir=tmp_path / "o",
                            max_tokens=16, progress=False)
        rt = api.runtime_of(model)
        if mode == "fast":
            fused = {k for k, u in rt.units.items()
                     if any(qmatmul.type_of(t.encoding) for t in u.tensors)}
            assert any(".attn" in k for k in fused)
            assert not any(u.kind == "expert" for k, u in rt.units.items() if k in fused)
        with torch.no_grad():
            logits[mode, budget] = model(ids).logits
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        offload.close(model)
    assert torch.equal(logits["fast", "64MB"], logits["fast", tight])
    exact, fast = logits["exact", "64MB"], logits["fast", "64MB"]
    assert not torch.equal(exact, fast)
    assert (fast - exact).abs().max() < 0.25 * exact.std()


def test_fast_holds_torch_to_one_thread_between_decode_steps(tmp_path):
    """compute='fast' holds torch to one intra-op thread from a decode step on (an OpenMP
    worker woken between steps spins on the cores the kernel's pool needs), gives the count
    back for a prefill and at close(), and keeps a count the caller set between steps."""
    path = write_llama_gguf(tmp_path / "m.gguf", hidden=256, layers=2, intermediate=512,
                            heads=4, kv_heads=2, vocab=512, qtype="Q4_0")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = offload.run(str(path), budget="100%", compute="fast",
                            offload_dir=tmp_path / "o", max_tokens=64, progress=False)
        ids = torch.randint(0, 512, (1, qmatmul.INT_ROWS + 4))
        with torch.no_grad():
            out = model(ids, use_cache=True)
            assert torch.get_num_threads() == 2   # a prefill keeps torch's threads
            out = model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
            assert torch.get_num_threads() == 1   # held after the step, not only through it
            torch.set_num_threads(3)   # the caller's own change between steps
            cache = out.past_key_values
            model(ids[:, :1], past_key_values=cache, use_cache=True)
            assert torch.get_num_threads() == 1
            model(ids, use_cache=True)   # a large forward gives back the caller's count
            assert torch.get_num_threads() == 3
            model(ids[:, :1], past_key_values=cache, use_cache=True)
            assert torch.get_num_threads() == 1
        offload.close(model)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
