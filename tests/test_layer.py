"""compute="fast" decoder layers (``offload/kernels/layer.py``): a Llama layer's decode step in
two kernel calls where all its weights are there or its streamed parts can be bound together,
part by part otherwise;
the same bits either way, near the layer computed by transformers around the fused products."""
from __future__ import annotations

import ctypes

import pytest
import torch
from transformers import DynamicCache

import offload
from gguf_files import write_llama_gguf
from offload import api
from offload.kernels import cpu, layer, qmatmul
from offload.adapters import kvbuffer

pytestmark = pytest.mark.skipif(not qmatmul.available(), reason="no C++ compiler here")


def _steps(model, ids, mask, steps: int = 3, in_place: bool = False):
    """Logits of a prefill of ``ids`` (left-padded by ``mask``) and ``steps`` greedy decode
    steps through one cache, concatenated: transformers' DynamicCache, or ``in_place`` the
    runtime's cache written in place (whose steps take the kernel's attention)."""
    cache = (kvbuffer.buffered_cache(model.config, 32) if in_place
             else DynamicCache(config=model.config))
    kw = api.runtime_of(model).cache_argument
    out = []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **{kw: cache}, use_cache=True).logits
        out.append(logits[:, -1])
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            logits = model(nxt, attention_mask=mask, **{kw: cache}, use_cache=True).logits
            out.append(logits[:, -1])
    return torch.stack(out, 1)


class Count:
    """Calls of the merged road (the two calls, or the one of a step over a cache written in
    place), of the parts' road (the norms run apart) and of the kernel's attention apart."""

    def __init__(self, monkeypatch):
        self.merged = self.parts = self.attends = 0
        self.runs, self.run_layers = 0, 0   # the model road's calls, and the layers in them
        lib = layer._library()
        runs = lib.offload_llama_layers_step

        def run(*a):
            self.runs += 1
            self.run_layers += a[1]
            return runs(*a)

        monkeypatch.setattr(lib, "offload_llama_layers_step", run)
        cls = layer.DecoderKernels
        merged, step, norm, attend = cls.attn_out_mlp, cls.step, cls.norm, cls.attend

        def counted(f, name):
            def call(kernels, *a):
                setattr(self, name, getattr(self, name) + 1)
                return f(kernels, *a)
            return call

        monkeypatch.setattr(cls, "attn_out_mlp", counted(merged, "merged"))
        monkeypatch.setattr(cls, "step", counted(step, "merged"))
        monkeypatch.setattr(cls, "norm", counted(norm, "parts"))
        monkeypatch.setattr(cls, "attend", counted(attend, "attends"))


@pytest.mark.parametrize("qtype,in_place", [("Q4_1", False), ("Q4_K", False),
                                             ("Q4_1", True), ("Q4_K", True)])
def test_decode_steps_give_the_same_bits_merged_or_part_by_part(qtype, in_place, tmp_path,
                                                               monkeypatch):
    """Resident, every layer takes the two-call road for steps of few rows (one call for a
    decode step over a cache written in place); with its parts streamed as Units of their own
    and no more of them than the slots, a layer binds them and takes it too; at the minimum
    budget (one slot) or with a user's hook on a part, it goes part by part (the hooks bind
    each part as it is called; the kernel's attention apart over a cache written in place).
    The logits of a padded batch's prefill and decode steps are bitwise the same on every
    road. All are near what transformers computes around the same fused products (the layers'
    own forwards), and not equal to it (another computation really ran)."""
    path = write_llama_gguf(tmp_path / f"{qtype}.gguf", hidden=256, layers=3, intermediate=512,
                            heads=4, kv_heads=2, vocab=512, qtype=qtype)
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0   # the second row left-padded
    count = Count(monkeypatch)
    got = {}
    # a one-shot prefill's reserve: the budgets below stream the parts they are sized to
    # (the planner's own choice could be chunks that keep more resident)
    kw = dict(compute="fast", offload_dir=tmp_path / "o", max_tokens=32, prefill_chunk=32)
    tight = offload.plan(str(path), "100%", **kw).minimum_bytes + (64 << 10)
    runs = (("resident", "100%"), ("held", int(tight * 1.3)), ("hooked", int(tight * 1.3)),
            ("parts", tight), ("resident-hooked", "100%"), ("no-model-road", "100%"))
    for name, budget in runs:
        monkeypatch.setattr(layer, "MODEL_ROAD", name != "no-model-road")
        model = offload.run(str(path), budget=budget, progress=False, **kw)
        runtime = api.runtime_of(model)
        assert runtime.fast_layers == 3
        streamed = [sum(k.startswith(f"layer.{i}.") for k in runtime.plan.stream)
                    for i in range(3)]
        if name in ("held", "hooked"):   # every layer streams parts, no more than the slots
            assert min(streamed) > 0 and max(streamed) <= runtime.plan.slots
        if name == "parts":
            assert max(streamed) > runtime.plan.slots
        if name in ("hooked", "resident-hooked"):   # a user's hook on a part of layer 1
            model.model.layers[1].post_attention_layernorm.register_forward_hook(
                lambda *a: None)
        count.merged = count.parts = count.attends = count.runs = count.run_layers = 0
        got[name] = _steps(model, ids, mask, in_place=in_place)
        got[name, "counts"] = (count.merged, count.parts)
        got[name, "runs"] = (count.runs, count.run_layers)
        got[name, "attends"] = count.attends
        got[name, "resyncs"] = offload.stats(model)["resyncs"]
        offload.close(model)
    # the prefill (2 x 6 rows, within the kernel's INT_ROWS) and 3 decode steps, 3 layers;
    # over a cache in place, the model road takes the decode steps: the three layers all
    # resident in one call a step, a layer whose parts stream in a call of its own with its
    # parts bound, and around a hooked layer 1 (part by part) layers 0 and 2 in a call each
    road = 3 if in_place else 0
    assert got["resident", "counts"] == (4 * 3 - 3 * road, 0)
    assert got["resident", "runs"] == (road, 3 * road)
    assert got["held", "counts"] == (4 * 3 - 3 * road, 0)
    assert got["held", "runs"] == (3 * road, 3 * road)
    for name in ("resident-hooked", "hooked"):   # layer 1's two norms ran apart
        assert got[name, "counts"] == (4 * 2 - 2 * road, 4 * 2), name
        assert got[name, "runs"] == (2 * road, 2 * road), name
    assert got["no-model-road", "counts"] == (4 * 3, 0)
    assert got["no-model-road", "runs"] == (0, 0)
    assert got["parts", "counts"][1] > 0               # some layer's norms ran apart
    assert got["held", "resyncs"] == got["hooked", "resyncs"] == got["parts", "resyncs"] == 0
    # the kernel's attention apart: the parts' road's decode steps over a cache in place
    assert got["resident", "attends"] == got["held", "attends"] == 0
    assert got["hooked", "attends"] == got["resident-hooked", "attends"] == road
    assert (got["parts", "attends"] > 0) == in_place
    for name in ("held", "hooked", "parts", "resident-hooked", "no-model-road"):
        assert torch.equal(got["resident"], got[name]), name

    monkeypatch.setattr(layer, "eligible", lambda module: False)   # transformers' layers
    model = offload.run(str(path), budget="100%", compute="fast", offload_dir=tmp_path / "o",
                        max_tokens=32, progress=False)
    assert api.runtime_of(model).fast_layers == 0
    theirs = _steps(model, ids, mask, in_place=in_place)
    offload.close(model)
    assert not torch.equal(got["resident"], theirs)
    # float32 norms and SiLU in another order shift a few activations by one 8-bit step: far
    # below the spread of the logits; a wrong rotary, mask or residual is of its order
    assert (got["resident"] - theirs).abs().max() < 0.05 * theirs.std()


def test_rms_norm_and_silu_match_their_definitions():
    """The C norm and gating the layer road uses, against float64 arithmetic."""
    lib = layer._library()
    x = torch.randn(5, 96, dtype=torch.float32) * 3
    w = torch.rand(96) + 0.5
    out = torch.empty_like(x)
    lib.offload_rms_norm(x.data_ptr(), 5, 96, w.data_ptr(), ctypes.c_float(1e-5),
                         out.data_ptr())
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert torch.allclose(out.double(), want, rtol=2e-6, atol=1e-7)
    g, u = torch.randn(333) * 4, torch.randn(333)
    want = (g.double() * torch.sigmoid(g.double())) * u.double()
    lib.offload_silu_mul(g.data_ptr(), u.data_ptr(), 333)
    assert torch.allclose(g.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch,masked", [(1, False), (3, False), (3, True)])
def test_the_model_road_gives_the_layers_bits_at_any_batch(batch, masked, tmp_path,
                                                           monkeypatch):
    """A greedy generate() (its cache written in place) at batch 1 and 3, with and without an
    attention mask of ones: the model road takes every decode step, and its tokens and
    logits are bitwise those of the layers' own roads (``MODEL_ROAD`` off)."""
    path = write_llama_gguf(tmp_path / "m.gguf", hidden=128, layers=2, intermediate=256,
                            heads=4, kv_heads=2, vocab=256, qtype="Q8_0")
    ids = torch.randint(0, 256, (batch, 5), generator=torch.Generator().manual_seed(batch))
    extra = {"attention_mask": torch.ones_like(ids)} if masked else {}
    count = Count(monkeypatch)
    got = {}
    for road in (True, False):
        monkeypatch.setattr(layer, "MODEL_ROAD", road)
        model = offload.run(str(path), budget="100%", compute="fast",
                            offload_dir=tmp_path / "o", max_tokens=16, progress=False)
        count.runs = 0
        with torch.no_grad():
            got[road] = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                       output_logits=True, return_dict_in_generate=True,
                                       **extra)
        got[road, "runs"] = count.runs
        offload.close(model)
    assert got[True, "runs"] == 3 and got[False, "runs"] == 0   # the 3 steps after prefill
    assert torch.equal(got[True].sequences, got[False].sequences)
    assert all(torch.equal(a, b) for a, b in zip(got[True].logits, got[False].logits))


def test_a_layer_road_refusal_names_the_layer():
    """A width the kernel refuses (head_dim odd) is an error naming the layer and its shapes,
    not a wrong result."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=96, intermediate_size=128, num_attention_heads=32,
                         num_key_value_heads=32, head_dim=3)
    block = LlamaDecoderLayer(config, 0)
    assert layer.eligible(block)
    kernels = layer.DecoderKernels(block, None, {id(m): "Q8_0" for m in layer.linears(block)})
    ws = [torch.zeros(m.out_features, m.in_features // 32 * 34, dtype=torch.uint8)
          for m in layer.linears(block)] + [torch.ones(96), torch.ones(96)]
    with pytest.raises(ValueError, match="refused layer 0 .*head_dim 3"):
        kernels.attn_in(ws, torch.randn(1, 96), torch.ones(1, 3), torch.zeros(1, 3))


def test_the_plan_prices_the_fast_road_where_every_layer_takes_it():
    """The framework's per-step seconds: the fast road's figure where every layer's seven
    linears are fused and the profile measured it, the layers' own otherwise."""
    from offload.planner.make import step_overhead
    from offload.planner.profile import HardwareProfile

    profile = HardwareProfile("cpu", 1e9, 1e9, 1e9, "float32",
                              layer_s={"llama": (1e-3, 2e-3), "llama/fast": (1e-4, 3e-4)})
    assert step_overhead(profile, "llama", 30, 1, 7 * 30) == pytest.approx(30 * 1e-4 + 3e-4)
    assert step_overhead(profile, "llama", 30, 1, 7 * 30 - 1) == pytest.approx(30e-3 + 2e-3)
    assert step_overhead(profile, "llama", 30, 1, 0) == pytest.approx(30e-3 + 2e-3)
    assert step_overhead(profile, "mistral", 30, 1, 7 * 30) == 0.0   # not measured
    own = HardwareProfile("cpu", 1e9, 1e9, 1e9, "float32", layer_s={"llama": (1e-3, 2e-3)})
    assert step_overhead(own, "llama", 30, 1, 7 * 30) == pytest.approx(30e-3 + 2e-3)


def test_a_miniature_on_the_fast_road_runs_two_kernel_calls_a_layer(monkeypatch):
    """What the profile times for ``llama/fast``: a miniature whose layers take the merged
    road on every decode step (finite logits; the layer's own forward never runs); over a
    cache written in place (as the profile times it), the model road: a step's layers in one
    call."""
    from transformers import DynamicCache, LlamaConfig

    from offload.kernels.workspace import miniature

    model = miniature(LlamaConfig(num_hidden_layers=3).to_json_string(use_diff=False),
                      torch.float32, 3)
    with qmatmul.Pool(2) as pool:
        assert layer.fuse_miniature(model, pool) == 3
        count = Count(monkeypatch)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
            logits = model(torch.tensor([[4]]), cache=cache, use_cache=True).logits
        assert (count.merged, count.parts) == (2 * 3, 0)
        assert torch.isfinite(logits).all()
        cache = kvbuffer.buffered_cache(model.config, 8)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
            count.merged = 0
            monkeypatch.setattr(layer.DecoderKernels, "attn_in", None)   # the two-call road's
            logits = model(torch.tensor([[4]]), cache=cache, use_cache=True).logits
        assert (count.merged, count.parts) == (0, 0)
        assert (count.runs, count.run_layers) == (1, 3)   # the model road: one call a step
        assert torch.isfinite(logits).all() and cache.get_seq_length() == 4


def _attention_reference(q, kb, vb, n, heads, mask):
    """float64 softmax(q k^T * scale) v over the first n positions of the buffers
    ([b, kv_heads, capacity, d]), grouped heads reading their KV head; mask [b, n] or None."""
    b, kv, _, d = kb.shape
    k = kb[:, :, :n].double().repeat_interleave(heads // kv, 1)    # [b, heads, n, d]
    v = vb[:, :, :n].double().repeat_interleave(heads // kv, 1)
    s = torch.einsum("bhd,bhnd->bhn", q.double().view(b, heads, d), k) / d ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", s.softmax(-1), v).reshape(b, heads * d)


@pytest.mark.parametrize("b,heads,kv,d,pos", [(1, 9, 3, 64, 0), (3, 6, 2, 40, 36),
                                              (2, 4, 4, 17, 300), (1, 8, 1, 128, 15)])
def test_the_step_attention_kernel_against_float64(b, heads, kv, d, pos):
    """offload_llama_attend: the new keys and values written at ``pos`` and nothing else
    touched; the output within float32 rounding of the float64 attention (grouped heads, a
    padded row's mask, head sizes off the 16-lane width, one position to hundreds); the same
    bits at every CPU level this machine runs and on the thread pool (300 positions: split)."""
    g = torch.Generator().manual_seed(b * 1000 + pos)
    cap = pos + 5
    kb, vb = (torch.randn(b, kv, cap, d, generator=g) for _ in range(2))
    q = torch.randn(b, heads * d, generator=g) * 3   # scores of a few units: a peaked softmax
    k, v = (torch.randn(b, kv * d, generator=g) for _ in range(2))
    mask = torch.ones(b, pos + 1, dtype=torch.bool)
    if b > 1:
        mask[1, : pos // 2] = False   # a left-padded row
    flags = layer.step_mask(mask[:, None, None, :], b, pos + 1)
    lib = layer._library()
    outs = []
    with qmatmul.Pool(2) as pool:
        for isa in cpu.supported():
            for handle in (None, pool.handle):
                kc, vc, out = kb.clone(), vb.clone(), torch.empty(b, heads * d)
                assert lib.offload_llama_attend(
                    q.data_ptr(), k.data_ptr(), v.data_ptr(), b, heads, kv, d, kc.data_ptr(),
                    vc.data_ptr(), kc.stride(0), kc.stride(1), pos, flags[0].data_ptr(),
                    flags[1], ctypes.c_float(d ** -0.5), out.data_ptr(), handle,
                    cpu.level(isa)) == 0
                outs.append(out)
    want_k, want_v = kb.clone(), vb.clone()
    want_k[:, :, pos] = k.view(b, kv, d)
    want_v[:, :, pos] = v.view(b, kv, d)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    want = _attention_reference(q, want_k, want_v, pos + 1, heads, mask)
    # a float32 dot of d terms and a sum of n weights: a few units in the last place of the
    # values' scale, far below one value's change (a lost position or a wrong head)
    assert (outs[0].double() - want).abs().max() < 1e-5 * vb.abs().max()
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_the_step_attention_refuses_heads_its_kv_heads_do_not_divide():
    """Heads not a multiple of the KV heads: refused (code -3), nothing written."""
    lib = layer._library()
    kb = torch.zeros(1, 2, 4, 8)
    q, k, out = torch.randn(1, 24), torch.ones(1, 16), torch.empty(1, 24)
    assert lib.offload_llama_attend(q.data_ptr(), k.data_ptr(), k.data_ptr(), 1, 3, 2, 8,
                                    kb.data_ptr(), kb.data_ptr(), kb.stride(0), kb.stride(1), 0,
                                    None, 0, ctypes.c_float(0.3), out.data_ptr(), None, 0) == -3
    assert not kb.any()
