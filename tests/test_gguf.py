"""GGUF-quantized Units: decoders bitwise the gguf package's dequantize on every CPU path, the
quantized store of the default model, and bad GGUF files refused before any work."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import offload
from conftest import require_smollm2, smollm2_path
from gguf_files import edge_blocks, write_llama_gguf, write_moe_gguf
from offload.errors import ModelError, StoreError
from offload.kernels import cpu
from offload.kernels import gguf as G
from offload.units import align

@pytest.mark.parametrize("name", list(G.TYPES))
def test_decoder_is_bitwise_gguf_dequantize_on_every_path(name):
    """Every block type, every CPU path (threaded, and into a destination not 32-byte aligned:
    ordinary stores instead of streaming ones), against the gguf package itself, bit for bit
    (NaN payloads included), rows not a multiple of anything."""
    raw = edge_blocks(name, 203, seed=len(name))
    with np.errstate(all="ignore"):
        want = G.reference(raw, name).view(np.uint32)
    src = torch.from_numpy(raw.reshape(-1).copy())
    assert cpu.supported(), "the C++ kernel must build here"
    for isa in cpu.supported():
        for threads, shift in ((1, 0), (3, 0), (1, 4)):   # shift 4: a destination not 32-aligned
            buf = torch.full((want.size * 4 + 64,), 0xA5, dtype=torch.uint8)   # poisoned
            at = -buf.data_ptr() % 64 + shift
            out = buf[at:at + want.size * 4]
            G.dequantize(src, out, name, want.size, threads=threads, isa=isa)
            got = out.numpy().view(np.uint32)
            bad = np.nonzero(got != want)[0]
            assert not bad.size, (isa, threads, shift, bad[:5], got[bad[:1]], want[bad[:1]])
            assert (buf[at + want.size * 4:] == 0xA5).all(), "wrote past the destination"


def test_cuda_decoders_compile_to_unfused_kernels(tmp_path):
    """The CUDA decoders (every GGUF type, both bitmap widths) and the fused matmul compile with
    the command offload builds them with, and its --fmad=false keeps every multiply and add
    rounded on its own as the gguf package's numpy does (and the matmul's CPU emulation):
    no fused multiply-add in the PTX, where the same source built without the flag has them.
    (Bitwise equality on a GPU: tests/test_gpu.py, tests/test_qmatmul_cuda.py.)"""
    import shutil
    import subprocess

    from offload.kernels import _build, cuda

    if shutil.which(_build.nvcc()) is None:
        pytest.skip("no nvcc on this machine")
    ptx = {}
    for name, kernels in {**cuda.SOURCES, **cuda.MATMUL}.items():
        cmd = _build.nvcc_command(_build.CSRC / f"{name}.cu", tmp_path / f"{name}.ptx", "sm_90",
                                  ptx=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        ptx[name] = (tmp_path / f"{name}.ptx").read_text()
        for kernel in kernels:
            assert f".entry {kernel}(" in ptx[name], kernel
    assert "fma.rn.f32" not in ptx["gguf_dequant"] and "fma.rn.f32" not in ptx["gguf_matmul"]
    fused = [c for c in _build.nvcc_command(_build.CSRC / "gguf_dequant.cu",
                                            tmp_path / "fused.ptx", "sm_90", ptx=True)
             if c != "--fmad=false"]
    assert subprocess.run(fused, capture_output=True).returncode == 0
    assert "fma.rn.f32" in (tmp_path / "fused.ptx").read_text(), "the check above cannot fail"


def test_cuda_decoders_compile_with_nvrtc():
    """NVRTC (CuPy's, the run-time path on a GPU machine without a toolkit) compiles the CUDA
    sources with offload's options, every kernel present, no fused multiply-add. Needs no GPU,
    only CuPy's NVRTC library (the ``cuda`` extra)."""
    from offload.kernels import _build, cuda

    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc",
                                reason="CuPy (the cuda extra) is not installed")
    try:
        nvrtc.getVersion()
    except Exception as e:   # CuPy without its NVRTC library: the GPU path falls back to nvcc
        pytest.skip(f"CuPy is installed but not its NVRTC library ({type(e).__name__})")
    for name, kernels in {**cuda.SOURCES, **cuda.MATMUL}.items():
        prog = nvrtc.createProgram((_build.CSRC / f"{name}.cu").read_text(), f"{name}.cu", [], [])
        try:
            nvrtc.compileProgram(prog, [*cuda.OPTIONS, f"-I{_build.CSRC}", "-arch=compute_90"])
        except Exception as e:
            pytest.fail(f"{name}.cu: {e}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        assert all(f".entry {k}(" in ptx for k in kernels) and "fma.rn.f32" not in ptx


def test_a_store_of_too_few_bytes_is_refused():
    with pytest.raises(ValueError, match="need"):
        G.dequantize(torch.zeros(10, dtype=torch.uint8), torch.zeros(128, dtype=torch.uint8),
                     "Q4_0", 32)
    with pytest.raises(ValueError, match="whole Q4_K blocks"):
        G.stored_bytes("Q4_K", 100)


def test_missing_compiler_falls_back_to_the_reference(tmp_path, monkeypatch):
    from offload.kernels import _build

    monkeypatch.setenv("OFFLOAD_CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    _build.cpu_library.cache_clear()
    G._library.cache_clear()
    try:
        raw = edge_blocks("Q6_K", 9, seed=1)
        with pytest.warns(_build.KernelBuildWarning):
            out = torch.empty(9 * 256 * 4, dtype=torch.uint8)
            G.dequantize(torch.from_numpy(raw.reshape(-1).copy()), out, "Q6_K", 9 * 256)
        assert np.array_equal(out.numpy().view(np.uint32), G.reference(raw, "Q6_K").view(np.uint32))
    finally:
        _build.cpu_library.cache_clear()
        G._library.cache_clear()


def test_default_model_store_keeps_the_files_blocks(tmp_path):
    """The SmolLM2 store holds its Q4_1/Q8_0 tensors as the file's blocks: at most 1.2x the
    file, and every quantized tensor keeps its GGUF encoding."""
    path = require_smollm2()
    m = offload.pack(path, offload_dir=tmp_path, progress=False)
    encodings = {t.encoding for u in m.units for t in u.tensors}
    assert {"gguf.Q4_1", "gguf.Q8_0"} <= encodings
    assert m.data_bytes <= 1.2 * path.stat().st_size, (m.data_bytes, path.stat().st_size)


def test_default_model_is_bitwise_transformers_on_the_quantized_store(smollm2, tmp_path):
    """float32 logits of the offloaded quantized store, streamed at 20%, bitwise the logits of
    transformers' model loaded from the same GGUF; greedy tokens equal."""
    path, tok, resident = smollm2
    enc = tok(["The capital of France is", "Write a haiku about disks."], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        ref = resident(**enc).logits
        ref_tokens = resident.generate(**enc, max_new_tokens=8, do_sample=False,
                                       pad_token_id=tok.pad_token_id)
    off = offload.run(path, budget="20%", offload_dir=tmp_path, max_tokens=64, progress=False)
    rt = off._offload_runtime
    assert rt.plan.stream and any(u.encoded for u in rt.manifest.units)
    # At 20% the plan holds quantized Units as stored (decoded at each use), streams others.
    assert rt.plan.held and set(rt.plan.held) < set(rt.plan.stream)
    assert offload.stats(off)["held_bytes"] == sum(
        align(rt.units[k].stored_bytes, 4096) for k in rt.plan.held)
    with torch.no_grad():
        logits = off(**enc).logits
        tokens = off.generate(**enc, max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    assert torch.equal(logits, ref)
    assert torch.equal(tokens, ref_tokens)
    offload.close(off)


def test_a_corrupt_unit_held_as_stored_is_refused_at_load_naming_it(tmp_path):
    """A Unit held as stored is checksummed when it is loaded, as a decoded resident one is."""
    path = smollm2_path()
    m = offload.pack(path, offload_dir=tmp_path, progress=False)
    held = offload.plan(path, "20%", offload_dir=tmp_path, max_tokens=64).held
    assert held
    u = m.unit(held[len(held) // 2])
    with open(m.path / "units.bin", "r+b") as f:
        f.seek(u.offset + 7)
        byte = f.read(1)
        f.seek(u.offset + 7)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(StoreError, match=f"checksum mismatch in unit {u.key}"):
        offload.run(path, budget="20%", offload_dir=tmp_path, max_tokens=64, progress=False)


def _reference_config(path):
    """What transformers itself loads as the config of ``path``, as offload computes it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


@pytest.mark.parametrize("kind", ["default", "llama", "mistral"])
def test_the_header_reader_gives_transformers_config_and_the_gguf_readers_table(kind,
                                                                                tmp_path):
    """offload reads a GGUF's header itself (the gguf package's reader builds two numpy views
    per vocabulary entry): every scalar and numeric-array key and every tensor's type, shape
    and offset are what ``gguf.GGUFReader`` reads, string arrays their lengths, and the config
    is the one ``AutoConfig`` loads from the file (a Llama file named ``mistral`` included)."""
    from gguf import GGUFReader, GGUFValueType

    from offload.store.gguf_source import GGUFFile
    from offload.store.sources import gguf_config

    path = smollm2_path() if kind == "default" else write_llama_gguf(
        tmp_path / f"{kind}.gguf", hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2,
        vocab=256, name="mistral" if kind == "mistral" else "random-llama")
    ours, ref = GGUFFile(path), GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY and field.types[1] == GGUFValueType.STRING:
            want = len(field.data)
        elif field.types[0] == GGUFValueType.ARRAY:
            want = [field.parts[i].tolist()[0] for i in field.data]
        else:
            want = field.contents()
        assert ours.metadata[key] == want, key
    assert len(ours.metadata) == len([k for k in ref.fields if not k.startswith("GGUF.")])
    assert [(t.name, t.qtype, t.dims, t.offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset),
         int(t.n_bytes)) for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors):
        assert np.array_equal(ours.data(t), r.data), t.name
    config = gguf_config(ours)
    assert config.model_type == ("mistral" if kind == "mistral" else "llama")
    got = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    assert got == _reference_config(path)


def test_the_default_models_tokenizer_is_autotokenizers(tmp_path):
    """The tokenizer offload builds for a GGUF (its class picked from the config offload read,
    not by AutoTokenizer re-reading the file through the gguf package) is AutoTokenizer's:
    class, ids, special tokens and chat template."""
    from transformers import AutoTokenizer

    from offload.store.gguf_source import GGUFFile
    from offload.store.sources import gguf_config, gguf_tokenizer

    path = smollm2_path()
    ours = gguf_tokenizer(path, gguf_config(GGUFFile(path)).model_type)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(ours) is type(ref)
    texts = ["What is the capital of France?", "  déjà vu\n\tx <|im_start|>user", "1234567"]
    assert [ours(t).input_ids for t in texts] == [ref(t).input_ids for t in texts]
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.chat_template == ref.chat_template and ours.chat_template


def test_a_gguf_header_that_is_cut_short_or_not_gguf_is_refused(tmp_path):
    data = smollm2_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200_000])   # inside the vocabulary
    with pytest.raises(StoreError, match="header ends early; the file is truncated"):
        offload.pack(cut, offload_dir=tmp_path / "c", progress=False)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:4096])
    with pytest.raises(StoreError, match="does not start with the GGUF magic"):
        offload.pack(other, offload_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


PACK_PEAK = """
import json, sys, torch, offload
from offload.cli.warmup import load_code
from offload.memory import PeakMeter
load_code(sys.argv[1])   # the interpreter: the code a run executes, loaded
meter = PeakMeter(torch.device("cpu"))
meter.start()
offload.pack(sys.argv[1], offload_dir=sys.argv[2], progress=False)
print(json.dumps({"peak": meter.peak()}))
"""


def test_a_packs_memory_is_bounded_by_its_largest_tensor(tmp_path):
    """Packing a GGUF holds a few tensors at a time, in a fresh process: its measured peak
    above the interpreter is under one copy of the largest tensor (a Q8_0 embedding of 35 MB,
    written in row-chunks: each chunk's rows are copied, not the whole tensor per chunk) plus
    32 MiB, for a file 3x that tensor."""
    from offload.store.gguf_source import GGUFFile

    path = write_llama_gguf(tmp_path / "wide.gguf", hidden=1024, layers=4, intermediate=2816,
                            heads=8, kv_heads=4, vocab=32000, qtype="Q8_0")
    largest = max(t.n_bytes for t in GGUFFile(path).tensors)
    assert path.stat().st_size > 2.5 * largest
    r = subprocess.run([sys.executable, "-c", PACK_PEAK, str(path), str(tmp_path / "store")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    print(f"pack peak {peak / 1e6:.1f} MB above the interpreter; largest tensor "
          f"{largest / 1e6:.1f} MB; file {path.stat().st_size / 1e6:.1f} MB")
    assert peak <= largest + (32 << 20), (peak, largest)


def test_a_truncated_gguf_is_refused_naming_the_tensor(tmp_path):
    path = require_smollm2()
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(StoreError, match="ends inside tensor .* truncated"):
        offload.pack(cut, offload_dir=tmp_path / "c", progress=False)
    assert not any((tmp_path / "c").glob("*.offload")), "nothing is written half"


def test_an_unsupported_block_type_is_refused_before_packing(tmp_path, monkeypatch):
    """A tensor of a type offload cannot decode (IQ*, TQ*, MXFP4 ...): one line naming the
    tensor, its type and what to do; no store is written."""
    path = require_smollm2()
    monkeypatch.setattr(G, "TYPES", {k: v for k, v in G.TYPES.items() if k != "Q4_1"})
    with pytest.raises(ModelError, match=r"blk\.\d+\..* is Q4_1, which offload cannot decode"):
        offload.pack(path, offload_dir=tmp_path, progress=False)
    assert not any(tmp_path.glob("*.offload"))


def test_a_gguf_of_an_architecture_offload_does_not_run_is_refused(tmp_path):
    import gguf

    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = subprocess.run([sys.executable, "-m", "offload.cli", "pack", str(p),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("offload: error:")]
    assert len(errors) == 1 and "unsupported architecture 'gpt2'" in errors[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_experts_in_a_file_that_declares_none_are_refused_before_packing(tmp_path):
    """A Llama-architecture file with fused experts but no ``llama.expert_count`` (how many
    are routed is unknown; transformers would silently drop them): one error naming the
    tensor and the way out, before anything is written."""
    path = write_llama_gguf(tmp_path / "moe.gguf", hidden=64, layers=1, intermediate=128,
                            heads=2, kv_heads=2, vocab=256, fused_experts=4)
    with pytest.raises(ModelError, match=r"blk\.0\.ffn_gate_exps\.weight .* declares no "
                       r"experts \(llama\.expert_count\).*safetensors"):
        offload.pack(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_experts_whose_gate_and_up_differ_in_type_are_refused_before_packing(tmp_path):
    path = write_moe_gguf(tmp_path / "mixed.gguf", qtype="Q8_0", up_qtype="Q4_0")
    with pytest.raises(ModelError, match=r"blk\.0\.ffn_gate_exps\.weight and "
                       r"blk\.0\.ffn_up_exps\.weight .* are Q8_0 and Q4_0"):
        offload.pack(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _moe_budget(path, out, slots: int) -> int:
    """The minimum budget of ``path``'s MoE model plus ``slots`` more cached experts."""
    from offload.errors import BudgetError

    with pytest.raises(BudgetError) as e:
        offload.run(path, budget="1MB", offload_dir=out, progress=False)
    manifest = offload.pack(path, offload_dir=out, progress=False)
    stored = max(align(u.stored_bytes, 4096) for u in manifest.units if u.kind == "expert")
    return e.value.minimum_bytes + slots * stored


@pytest.mark.parametrize("arch, qtype", [("qwen3moe", "Q8_0"), ("qwen2moe", "Q4_0")])
def test_a_moe_gguf_keeps_its_experts_quantized_and_is_bitwise_transformers(arch, qtype,
                                                                          tmp_path):
    """Qwen-MoE GGUFs (experts fused per layer, gate and up in two tensors, as llama.cpp
    writes them): each expert is packed as its rows of blocks (the store holds the file's
    expert bytes), cached as stored and decoded at each use, or streamed with its layer;
    float32 logits and greedy tokens bitwise transformers' loading of the same file. Random
    weights."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    path = write_moe_gguf(tmp_path / f"{arch}.gguf", arch=arch, qtype=qtype,
                          down_qtype="Q8_0", layers=3, experts=6)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    want_tokens = ref.generate(ids, max_new_tokens=6, do_sample=False)

    out = tmp_path / "out"
    budget = _moe_budget(path, out, slots=3)
    manifest = offload.pack(path, offload_dir=out, progress=False)
    experts = [u for u in manifest.units if u.kind == "expert"]
    assert len(experts) == 3 * 6
    assert all({t.name: t.encoding for t in u.tensors} == {"gate_up": f"gguf.{qtype}",
                                                           "down": "gguf.Q8_0"} for u in experts)
    file_bytes = sum(int(t.n_bytes) for t in GGUFReader(path).tensors if "_exps" in t.name)
    assert sum(u.stored_bytes for u in experts) == file_bytes
    # a plan from the header alone (``offload plan``) plans on the Units the pack wrote
    import dataclasses

    from offload.adapters import adapter_for
    from offload.api import open_source
    from offload.store.pack import units_as_packed

    source = open_source(path)
    specs, _ = adapter_for(source.config).unit_specs(source.config, source.shapes())
    assert [dataclasses.replace(u, checksum=0) for u in manifest.units] == \
        units_as_packed(specs, source.row_bytes())

    for options in (dict(), dict(predict=True), dict(experts="stream")):
        stream = options.get("experts") == "stream"
        off = offload.run(path, budget=budget * (3 if stream else 1), offload_dir=out,
                          progress=False, **options)
        with torch.no_grad():
            got = off(ids).logits
        assert torch.equal(got, want), (options, (got - want).abs().max())
        assert torch.equal(off.generate(ids, max_new_tokens=6, do_sample=False), want_tokens)
        ex = offload.stats(off)["experts"]
        if not stream:   # really cached as stored: fewer slots than experts, reads, decodes
            assert 2 <= ex["slots"] < len(experts) and ex["on_demand"] > 0
            assert ex["expert_decoded_bytes"] > 0
            # the cache reads the stored bytes (4 KiB-aligned) of each expert it fetches
            assert ex["bytes_read"] == ex["disk_bytes"] > 0
            assert ex["bytes_read"] % align(experts[0].stored_bytes, 4096) == 0
        offload.close(off)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_a_random_gguf_with_grouped_kv_heads_is_bitwise_transformers(qtype, tmp_path):
    """A Llama GGUF of random blocks whose k projection has fewer heads than q (transformers
    permutes both by rows at load: here whole rows of blocks are permuted at pack): float32
    logits and greedy tokens bitwise transformers', layers streamed."""
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(tmp_path / f"r{qtype}.gguf", hidden=256, layers=3,
                            intermediate=512, heads=8, kv_heads=2, vocab=2048, qtype=qtype)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
        want_tokens = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    off = offload.run(path, budget="30%", offload_dir=tmp_path / "o", max_tokens=32,
                      progress=False)
    assert any(k.startswith("layer.") for k in off._offload_runtime.plan.stream)
    with torch.no_grad():
        assert torch.equal(off(ids).logits, want) and torch.isfinite(want).all()
        assert torch.equal(off.generate(ids, max_new_tokens=4, do_sample=False,
                                        pad_token_id=0), want_tokens)
    offload.close(off)


CAPPED_RUN = """
import json, sys, threading, time, torch, offload
path, store, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
anon, done = [status("RssAnon:")], threading.Event()
def sample():   # the kernel keeps no high-water mark of anonymous memory: sample it
    while not done.is_set():
        anon.append(status("RssAnon:"))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
model = offload.run(path, budget=budget, offload_dir=store, max_tokens=32, progress=False)
with torch.no_grad():
    out = model.generate(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), max_new_tokens=3,
                         do_sample=False, pad_token_id=0)
done.set()
print(json.dumps({"rss_peak": status("VmHWM:"), "anon_peak": max(anon), "anon_start": anon[0],
                  "tokens": out.shape[1], "stats": offload.stats(model)}))
"""


def test_packs_and_runs_a_gguf_4x_the_cap_in_one_capped_process(tmp_path):
    """A 2.2 GB-in-float32 Llama GGUF (Q4_0, 312 MB) packed and run by one fresh process in a
    memory cgroup capped at budget + the idle interpreter + 64 MB, page cache included: it
    completes (never killed at the cap), and its anonymous memory (sampled) stays under the
    cap. (Its VmHWM counts library pages charged to other cgroups, so it is reported, not
    compared.)"""
    from pathlib import Path

    memlimit = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "memlimit.sh"
    if not memlimit.is_file():
        pytest.fail(f"{memlimit} is missing: the capped run needs ../shared/tools")
    path = write_llama_gguf(tmp_path / "big.gguf", hidden=2048, layers=10, intermediate=5632,
                            heads=16, kv_heads=4, vocab=32000, qtype="Q4_0")
    dense = 4 * (10 * (2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 2048 * 5632) + 2 * 32000 * 2048)
    idle = _idle_rss()
    budget = 160 << 20
    cap = budget + idle + (64 << 20)
    assert dense >= 4 * cap, (dense, cap)
    r = subprocess.run(["bash", str(memlimit), str(cap), sys.executable, "-c", CAPPED_RUN,
                        str(path), str(tmp_path / "store"), str(budget)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 11 and res["stats"]["bytes_read"]["disk"] > 0
    print(f"cap {cap >> 20} MiB (idle RSS {idle >> 20}), anonymous memory {res['anon_start'] >> 20}"
          f" -> peak {res['anon_peak'] >> 20} MiB, VmHWM {res['rss_peak'] >> 20} MiB, float32 "
          f"weights {dense >> 20} MiB; {r.stderr.strip().splitlines()[-1]}")
    assert res["anon_peak"] <= cap


def _idle_rss() -> int:
    code = ("import torch, transformers, accelerate, offload, gc; gc.collect(); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')][0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return int(r.stdout.strip().splitlines()[-1]) * 1024


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_1"])
def test_quantize_at_pack_is_the_gguf_quantizer_then_exact(qtype, checkpoint, tmp_path):
    """LOSSY, opt-in ``pack --quantize``: every decoder projection stored in the GGUF block
    type the gguf package's quantizer gives, recorded in the manifest; the offloaded model is
    then bitwise the resident model whose projections are those blocks dequantized."""
    import gguf

    from offload.adapters import adapter_for
    from offload.store.format import read_manifest

    path, model = checkpoint
    m = offload.pack(path, tmp_path / qtype, quantize=qtype, progress=False)
    assert m.source["pack"]["quantize"] == qtype
    stored = read_manifest(m.path)
    encodings = {t.encoding for u in stored.units if u.kind == "layer" for t in u.tensors
                 if len(t.shape) == 2}
    assert encodings == {G.encoding(qtype.upper())}
    dense = offload.pack(path, tmp_path / "dense", progress=False)
    assert m.data_bytes < 0.5 * dense.data_bytes
    adapter = adapter_for(model.config)
    q = gguf.GGMLQuantizationType[qtype.upper()]
    with torch.no_grad():
        for name, module in adapter.prunable_modules(model).items():
            w = module.weight.detach().numpy()
            module.weight.copy_(torch.from_numpy(
                gguf.dequantize(gguf.quantize(w, q), q).reshape(w.shape)))
    ids = torch.randint(0, model.config.vocab_size, (2, 9),
                        generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
    off = offload.run(m.path, budget="30%", max_tokens=32, offload_dir=tmp_path / "o",
                      progress=False)
    assert any(k.startswith("layer.") for k in off._offload_runtime.plan.stream)
    with torch.no_grad():
        assert torch.equal(off(ids).logits, want)
    offload.close(off)


def test_quantize_refuses_what_it_cannot_do(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(offload.OffloadError, match="q4_0"):
        offload.pack(path, tmp_path / "x", quantize="q3_k", progress=False)
    with pytest.raises(offload.OffloadError, match="choose one"):
        offload.pack(path, tmp_path / "y", quantize="q8_0", sparse="bitmap", progress=False)
    g = write_llama_gguf(tmp_path / "q.gguf", hidden=64, layers=1, intermediate=128, heads=2,
                         kv_heads=2, vocab=256)
    with pytest.raises(offload.OffloadError, match="is a GGUF"):
        offload.pack(g, tmp_path / "z", quantize="q4_0", progress=False)
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def test_a_qwen_moe_gguf_of_other_expert_widths_runs(tmp_path):
    """transformers (5.x) reads no expert width from a Qwen-MoE GGUF and refuses a file whose
    widths differ from its config defaults; offload reads them (``expert_feed_forward_length``
    and the shared expert's) and is bitwise transformers given the config the file states."""
    from transformers import AutoModelForCausalLM

    from offload.store.gguf_source import GGUFFile
    from offload.store.sources import gguf_config

    path = write_moe_gguf(tmp_path / "w.gguf", arch="qwen2moe", expert_ff=256, shared_ff=512,
                          qtype="Q4_0", experts=8)
    config = gguf_config(GGUFFile(path))
    assert (config.moe_intermediate_size, config.shared_expert_intermediate_size) == (256, 512)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, config=config,
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
    out = tmp_path / "out"
    off = offload.run(path, budget=_moe_budget(path, out, slots=1), offload_dir=out,
                      progress=False)
    with torch.no_grad():
        got = off(ids).logits
    assert torch.equal(got, want)
    ex = offload.stats(off)["experts"]
    assert 2 <= ex["slots"] < 16 and ex["expert_decoded_bytes"] > 0   # cached as stored
    offload.close(off)


def _mixtral_reference(path, config):
    """transformers' MixtralForCausalLM holding a Mixtral GGUF's weights as transformers loads
    a Llama GGUF (``gguf.dequantize`` to float32, its Llama q/k row permutation), the experts
    stacked as its fused parameters: transformers itself reads such a file as a dense Llama."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config=config.to_dict())
    names = {"token_embd": "model.embed_tokens.weight", "output": "lm_head.weight",
             "output_norm": "model.norm.weight", "attn_norm": "input_layernorm.weight",
             "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
             "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
             "ffn_norm": "post_attention_layernorm.weight", "ffn_gate_inp": "mlp.gate.weight"}
    state, experts = {}, {}
    for t in GGUFReader(path).tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        w = processor.process(weights=w, name=t.name).weights
        parts = t.name.split(".")
        if parts[0] != "blk":
            state[names[parts[0]]] = torch.from_numpy(np.array(w))
            continue
        layer, what = f"model.layers.{parts[1]}.", parts[2]
        if what in names:
            state[layer + names[what]] = torch.from_numpy(np.array(w))
        else:   # ffn_gate_exps [E, I, H] or ffn_gate.<e> [I, H]
            role = what.split("_")[1]
            w = torch.from_numpy(np.array(w))
            experts.setdefault((layer, role), []).append(w if w.ndim == 3 else w[None])
    for (layer, role), ws in experts.items():
        experts[(layer, role)] = torch.cat(ws)
    for layer in {k[0] for k in experts}:
        state[layer + "mlp.experts.gate_up_proj"] = torch.cat(
            [experts[(layer, "gate")], experts[(layer, "up")]], dim=1)
        state[layer + "mlp.experts.down_proj"] = experts[(layer, "down")]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=True)   # every parameter, nothing else
    return model


@pytest.mark.parametrize("per_expert", [False, True], ids=["fused", "per-expert"])
def test_a_mixtral_gguf_runs_as_mixtral_with_quantized_experts(per_expert, tmp_path):
    """llama.cpp writes Mixtral as a Llama file with experts (fused ``ffn_*_exps``, or one
    tensor per expert in files converted before 2024); transformers reads it as a dense Llama
    and drops them. offload reads it as Mixtral, experts kept quantized and cached as stored:
    float32 logits and greedy tokens bitwise transformers' Mixtral holding the file's weights
    as transformers dequantizes them (its q/k permutation applied). Random weights."""
    from offload.store.gguf_source import GGUFFile
    from offload.store.sources import gguf_config

    path = write_moe_gguf(tmp_path / "mixtral.gguf", arch="llama", qtype="Q4_0",
                          down_qtype="Q8_0", experts=8, layers=3, per_expert=per_expert)
    config = gguf_config(GGUFFile(path))
    assert (config.model_type, config.num_local_experts, config.num_experts_per_tok) == \
        ("mixtral", 8, 2)
    ref = _mixtral_reference(path, config)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits
    want_tokens = ref.generate(ids, max_new_tokens=6, do_sample=False)
    out = tmp_path / "out"
    off = offload.run(path, budget=_moe_budget(path, out, slots=4), offload_dir=out,
                      progress=False)
    with torch.no_grad():
        got = off(ids).logits
    assert torch.equal(got, want), (got - want).abs().max()
    assert torch.equal(off.generate(ids, max_new_tokens=6, do_sample=False), want_tokens)
    ex = offload.stats(off)["experts"]
    assert 2 <= ex["slots"] < 24 and ex["expert_decoded_bytes"] > 0
    offload.close(off)
