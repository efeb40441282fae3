"""Bitmap-compressed sparse transfer: the encoding, its kernels, and pruned models end to end."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
import zlib

import pytest
import torch

import offload
from conftest import tiny_model, weight_bytes
from offload.adapters import adapter_for
from offload.errors import HardwareError, OffloadError, StoreError
from offload.kernels import _build, bitmap, cpu
from offload.store.prune import prune_model, prune_rows

SHAPES = [(1,), (63,), (3, 65), (17, 2049), (130, 257)]   # none a multiple of the tile
SPARSITY = [0.0, 0.5, 0.9, 1.0]


def _sparse_tensor(shape, dtype, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    flat = t.view(-1)
    if flat.numel() > 4:   # bit patterns a float compare would lose: all must survive
        flat[1], flat[3] = -0.0, float("nan")
    return t


def _decoders(enc, n, nnz, elem):
    """The reference, then the C++ kernel on every path this CPU runs (AVX-512, AVX2, scalar),
    and threaded on the selected one."""
    yield "torch", lambda out: bitmap.decode_reference(enc, out, n, nnz, elem)
    assert cpu.supported(), "the C++ kernel must build here (g++ is on every CI machine)"
    for isa in cpu.supported():
        yield f"c++ {isa}", lambda out, isa=isa: bitmap.decode_cpu(enc, out, n, nnz, elem, isa=isa)
    yield "c++ 3 threads", lambda out: bitmap.decode_cpu(enc, out, n, nnz, elem, threads=3)


@pytest.mark.parametrize("dtype", bitmap.DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITY)
def test_round_trip_is_bit_exact(dtype, sparsity):
    for i, shape in enumerate(SHAPES):
        t = _sparse_tensor(shape, dtype, sparsity, seed=i)
        enc, nnz = bitmap.encode(t)
        n, elem = t.numel(), dtype.itemsize
        assert nnz == int((t.view(-1).view({2: torch.int16, 4: torch.int32}[elem]) != 0).sum())
        assert enc.numel() == bitmap.encoded_nbytes(n, nnz, elem)
        expect = t.contiguous().view(-1).view(torch.uint8)
        for name, decode in _decoders(enc, n, nnz, elem):
            out = torch.full((n * elem,), 0xA5, dtype=torch.uint8)   # poisoned
            decode(out)
            assert torch.equal(out, expect), (name, shape)


GUARDED = """
import ctypes, mmap, sys, torch
from offload.kernels import bitmap, cpu
libc = ctypes.CDLL(None)
keep = []
def guarded(nbytes):   # nbytes of memory whose last byte is followed by an unmapped page
    total = -(-nbytes // 4096) * 4096 + 4096
    m = mmap.mmap(-1, total)
    keep.append(m)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(ctypes.c_void_p(addr + total - 4096), 4096, 0) == 0
    whole = torch.frombuffer(m, dtype=torch.uint8)
    return whole[total - 4096 - nbytes:total - 4096]
for dtype in (torch.float32, torch.bfloat16):
    for sparsity in (0.0, 0.3, 0.9):
        for n in (4096, 64 * 97 + 5):
            g = torch.Generator().manual_seed(n)
            t = torch.randn(n, generator=g).to(dtype)
            t[torch.rand(n, generator=g) < sparsity] = 0
            enc, nnz = bitmap.encode(t)
            src, out = guarded(enc.numel()), guarded(n * dtype.itemsize)
            src.copy_(enc)
            for isa in cpu.supported():
                out.fill_(0xA5)
                bitmap.decode_cpu(src, out, n, nnz, dtype.itemsize, isa=isa)
                assert torch.equal(out, t.view(torch.uint8)), (isa, dtype, sparsity, n)
print("ok", *cpu.supported())
"""


def test_decoders_never_touch_bytes_past_their_buffers():
    """Every path of the C++ kernel, with the encoded bytes and the output each ending right
    before an unmapped page (a stray load or store would crash the subprocess)."""
    r = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split()[0] == "ok" and "scalar" in r.stdout.split()


def test_cpu_level_comes_from_the_environment(monkeypatch):
    assert cpu.supported()[0] == "scalar" and cpu.best() == cpu.supported()[-1]
    for isa in cpu.supported():
        monkeypatch.setenv("OFFLOAD_CPU_ISA", isa)
        assert cpu.selected() == isa and cpu.level() == cpu.LEVELS.index(isa)
    monkeypatch.setenv("OFFLOAD_CPU_ISA", "auto")
    assert cpu.selected() == cpu.best()
    monkeypatch.setenv("OFFLOAD_CPU_ISA", "sse9")
    with pytest.raises(HardwareError, match="OFFLOAD_CPU_ISA='sse9' is not a CPU kernel level"):
        cpu.selected()
    monkeypatch.setattr(cpu, "best", lambda: "avx2")   # a CPU without AVX-512
    monkeypatch.setenv("OFFLOAD_CPU_ISA", "avx512")
    with pytest.raises(HardwareError, match="its best is avx2"):
        cpu.selected()


def test_fifty_percent_bf16_moves_at_most_057_of_dense():
    w = prune_rows(torch.randn(1024, 2048).bfloat16(), 0.5)
    enc, nnz = bitmap.encode(w)
    assert nnz == 1024 * 1024
    assert enc.numel() <= 0.57 * w.numel() * 2


def test_corrupt_bitmap_is_detected_before_decode():
    t = _sparse_tensor((40, 300), torch.bfloat16, 0.5)
    enc, nnz = bitmap.encode(t)
    bad = enc.clone()
    bad[0] ^= 0x10   # one more (or one fewer) set bit than there are values
    out = torch.zeros(t.numel() * 2, dtype=torch.uint8)
    with pytest.raises(bitmap.CorruptBitmap, match="bits set for"):
        bitmap.decode_cpu(bad, out, t.numel(), nnz, 2)
    with pytest.raises(bitmap.CorruptBitmap):
        bitmap.decode_reference(bad, out, t.numel(), nnz, 2)
    with pytest.raises(bitmap.CorruptBitmap):
        bitmap.validate(enc, t.numel(), nnz + 1)   # the count itself disagrees
    assert not out.any(), "nothing is written before the bitmap is validated"


def test_missing_compiler_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    _build.cpu_library.cache_clear()
    try:
        t = _sparse_tensor((9, 700), torch.float16, 0.5)
        enc, nnz = bitmap.encode(t)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                out = torch.zeros(t.numel() * 2, dtype=torch.uint8)
                bitmap.decode(enc, out, t.numel(), nnz, 2)
                assert torch.equal(out, t.view(-1).view(torch.uint8))
        ours = [w for w in caught if issubclass(w.category, _build.KernelBuildWarning)]
        assert len(ours) == 1 and "no-such-compiler" in str(ours[0].message)
        assert not (tmp_path / "cache" / "ext").exists() or not any(
            (tmp_path / "cache" / "ext").iterdir())
    finally:
        _build.cpu_library.cache_clear()


def test_cuda_source_compiles_with_nvcc(tmp_path):
    """CI's compile-only check of the CUDA kernel (running it is the GPU machine's job)."""
    if shutil.which(_build.nvcc()) is None:
        pytest.skip("no nvcc on this machine")
    cmd = _build.nvcc_command(_build.CSRC / "bitmap_decode.cu", tmp_path / "k.o", "sm_90",
                              compile_only=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


def _prompts(batch, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def _logits_and_tokens(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                do_sample=False, pad_token_id=0)
    return logits, tokens


def _pruned(family, **kw):
    model = tiny_model(family, **kw)
    prune_model(model, 0.5, adapter_for(model.config))
    return model


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("batch", [1, 4])
def test_pruned_model_packed_as_bitmap_is_bitwise(family, batch, tmp_path):
    model = _pruned(family)
    ids, mask = _prompts(batch, model.config.vocab_size)
    ref_logits, ref_tokens = _logits_and_tokens(model, ids, mask)
    seen = set()
    # Encoded Units streamed (decoded every pass), then resident (decoded once at start-up).
    for fraction in ((0.2, 0.45) if family == "llama" else (0.16, 0.45)):
        budget = int(weight_bytes(model) * fraction)
        off = offload.run(model, budget=budget, offload_dir=tmp_path / "cache",
                          max_tokens=batch * 16, sparse="bitmap")
        rt = off._offload_runtime
        encoded = {u.key for u in rt.manifest.units if u.encoded}
        seen |= {"streamed"} if encoded & set(rt.plan.stream) else set()
        seen |= {"resident"} if encoded & set(rt.resident) else set()
        logits, tokens = _logits_and_tokens(off, ids, mask)
        assert torch.equal(logits, ref_logits)
        assert torch.equal(tokens, ref_tokens)
        s = offload.stats(off)
        assert s["accounted_peak_bytes"] <= budget
        offload.close(off)
        model = _pruned(family)   # run() took the weights of the model it was given
    assert seen == {"streamed", "resident"}


def test_bf16_unit_moves_at_most_057_of_dense_bytes_measured(offload_dir):
    model = _pruned("llama", dtype=torch.bfloat16, hidden_size=256, intermediate_size=1024,
                    num_hidden_layers=4)
    budget = int(weight_bytes(model) * 0.25)
    off = offload.run(model, budget=budget, offload_dir=offload_dir, max_tokens=64,
                      sparse="bitmap")
    rt = off._offload_runtime
    streamed = [rt.units[k] for k in rt.plan.stream]
    assert streamed and all(u.encoded for u in streamed if u.group == "layer")
    ids = torch.randint(3, 3000, (1, 8))
    with torch.no_grad():   # drained: each snapshot counts one pass + the same prefetches
        off(input_ids=ids)
        rt.pipeline.drain()
        before = offload.stats(off)
        off(input_ids=ids[:, :1])
        rt.pipeline.drain()
        after = offload.stats(off)
    moved = after["bytes_read"]["disk"] - before["bytes_read"]["disk"]
    dense = sum(-(-u.nbytes // 4096) * 4096 for u in streamed)
    stored = sum(-(-u.stored_bytes // 4096) * 4096 for u in streamed)
    assert 0 <= moved - stored <= 2 * 4096   # + the token's embedding row, gathered from disk
    per_unit = [u.stored_bytes / u.nbytes for u in streamed if u.group == "layer"]
    assert max(per_unit) <= 0.57, per_unit
    layers = [u for u in streamed if u.group == "layer"]   # the head is not pruned: dense
    assert sum(u.stored_bytes for u in layers) <= 0.57 * sum(u.nbytes for u in layers)
    assert moved < dense
    sp = after["sparse"]
    assert sp["stored_bytes"] <= 0.57 * sp["dense_bytes"]
    offload.close(off)


def test_pack_prune_equals_pruning_the_model(checkpoint, tmp_path):
    path, model = checkpoint
    store = tmp_path / "pruned"
    m = offload.pack(path, store, sparse="bitmap", prune=0.5, method="magnitude",
                     progress=False)
    assert m.source["pack"] == {"sparse": "bitmap", "prune": 0.5, "method": "magnitude"}
    prune_model(model, 0.5, adapter_for(model.config))
    ids, mask = _prompts(2, model.config.vocab_size)
    ref_logits, _ = _logits_and_tokens(model, ids, mask)
    off = offload.run(store, budget=int(weight_bytes(model) * 0.3), max_tokens=64,
                      offload_dir=tmp_path / "cache")
    logits, _ = _logits_and_tokens(off, ids, mask)
    assert torch.equal(logits, ref_logits)
    offload.close(off)


def test_wanda_prunes_by_calibrated_input_norms(checkpoint, tmp_path):
    from offload.api import _open_store, input_norms, prepare

    path, model = checkpoint
    base = tmp_path / "cache"
    offload.pack(path, tmp_path / "wanda", prune=0.5, method="wanda", offload_dir=base,
                 progress=False)
    norms = input_norms(_open_store(prepare(path, offload_dir=base).manifest.path))
    assert len(norms) == 7 * model.config.num_hidden_layers
    magnitude = tiny_model("llama")
    prune_model(magnitude, 0.5, adapter_for(model.config))
    prune_model(model, 0.5, adapter_for(model.config), input_norms=norms)
    ids, mask = _prompts(1, model.config.vocab_size)
    ref_logits, _ = _logits_and_tokens(model, ids, mask)
    off = offload.run(tmp_path / "wanda", budget=int(weight_bytes(model) * 0.3), max_tokens=64,
                      offload_dir=base)
    logits, _ = _logits_and_tokens(off, ids, mask)
    assert torch.equal(logits, ref_logits)
    assert not torch.equal(logits, _logits_and_tokens(magnitude, ids, mask)[0])
    offload.close(off)


def test_dense_model_keeps_dense_encoding(offload_dir):
    model = tiny_model("llama")
    off = offload.run(model, budget="20%", offload_dir=offload_dir, max_tokens=32,
                      sparse="bitmap")
    rt = off._offload_runtime
    assert not any(u.encoded for u in rt.manifest.units), "no zeros: bitmap would cost bytes"
    assert rt.plan.stored_bytes == rt.plan.weight_bytes and rt.plan.landing_bytes == 0
    offload.close(off)


def test_corrupt_bitmap_in_a_store_names_the_unit(offload_dir, tmp_path):
    model = _pruned("llama")
    m = offload.pack(model, tmp_path / "store", sparse="bitmap", progress=False)
    budget = int(weight_bytes(model) * 0.2)
    # a Unit the plan streams (which ones stay resident depends on this CPU's decode speed)
    streamed = offload.plan(m.path, budget, max_tokens=32, offload_dir=offload_dir).stream
    unit = next(u for u in m.units if u.encoded and u.key in streamed)
    spec = next(t for t in unit.tensors if t.encoding == "bitmap")
    data = bytearray((m.path / "units.bin").read_bytes())
    at = unit.offset + spec.stored_offset
    data[at] ^= 0x01   # one mask bit flipped ...
    (m.path / "units.bin").write_bytes(bytes(data))
    manifest = json.loads((m.path / "manifest.json").read_text())
    for u in manifest["units"]:   # ... and its checksum made to match: only the bitmap is bad
        if u["key"] == unit.key:
            u["checksum"] = zlib.crc32(data[unit.offset:unit.offset + unit.stored_bytes])
    (m.path / "manifest.json").write_text(json.dumps(manifest))
    off = offload.run(m.path, budget=budget, max_tokens=32, offload_dir=offload_dir)
    assert unit.key in off._offload_runtime.plan.stream
    with pytest.raises(StoreError, match=rf"unit {unit.key}, tensor .*corrupt bitmap") as e:
        with torch.no_grad():
            off(input_ids=torch.randint(3, 3000, (1, 5)))
    assert e.value.unit == unit.key
    offload.close(off)


@pytest.mark.parametrize("kw,match", [(dict(sparse="zstd"), "sparse='zstd'"),
                                      (dict(prune=1.5), "prune=1.5"),
                                      (dict(prune=0.5, method="sparsegpt"), "sparsegpt")])
def test_bad_sparse_options_are_refused(kw, match, checkpoint, tmp_path):
    with pytest.raises(OffloadError, match=match):
        offload.pack(checkpoint[0], tmp_path / "x", progress=False, **kw)
