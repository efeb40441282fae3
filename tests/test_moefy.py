"""The MoE bench's trained fixture (benches/moefy.py): SmolLM2's MLPs split into experts."""
import sys
from pathlib import Path

import pytest
import torch

import offload
from conftest import require_smollm2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import moefy  # noqa: E402


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    """Two-layer mixtures (4 experts, top-2, float32) of SmolLM2's first layers: plain and
    with every expert widened 2x."""
    require_smollm2()
    root = tmp_path_factory.mktemp("moefy")
    out = {}
    for widen in (1, 2):
        out[widen] = root / f"w{widen}"
        moefy.build(out[widen], experts=4, top_k=2, widen=widen, dtype="float32", layers=2,
                    calib_tokens=512, log=lambda m: None)
    return out


def _text_ids(model_dir: Path, n: int = 24) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(moefy.PROMPT, return_tensors="pt").input_ids[:, :n]


def test_fixture_is_a_mixtral_checkpoint_with_its_neurons_split(fixture_dirs):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(fixture_dirs[1],
                                                       output_loading_info=True)
    assert isinstance(model, MixtralForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    cfg = model.config
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (4, 2, 2)
    meta = __import__("json").loads((fixture_dirs[1] / "moefy.json").read_text())
    for groups, shared in zip(meta["groups"], meta["shared_neurons"]):
        # every neuron of the dense MLP is in exactly one expert or shared by all
        assert sorted(sum(groups, []) + shared) == list(range(1536))
        assert len({len(g) for g in groups}) == 1
    # the split keeps most of the model: its first two layers' next-token guesses on text
    dense, _ = moefy.dense_model(layers=2)
    ids = _text_ids(fixture_dirs[1])
    with torch.no_grad():
        agree = (model(ids).logits.argmax(-1) == dense(ids).logits.argmax(-1)).float().mean()
    assert agree > 0.5, agree


def test_widened_neurons_are_inert(fixture_dirs):
    """The random neurons that widen each expert change neither the routing nor (beyond
    float32 rounding) the logits."""
    from transformers import AutoModelForCausalLM

    ids = _text_ids(fixture_dirs[1])
    got = {}
    for w, path in fixture_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.intermediate_size == \
            AutoModelForCausalLM.from_pretrained(fixture_dirs[1]).config.intermediate_size * w
        picks = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: picks.append(o[2]))
                 for layer in model.model.layers]
        with torch.no_grad():
            logits = model(ids).logits
        for h in hooks:
            h.remove()
        got[w] = logits, picks
    assert all(torch.equal(a, b) for a, b in zip(got[1][1], got[2][1]))
    torch.testing.assert_close(got[1][0], got[2][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("predict", [False, True])
def test_offload_on_the_fixture_is_bitwise_the_resident_model(fixture_dirs, offload_dir,
                                                              predict):
    from transformers import AutoModelForCausalLM

    path = fixture_dirs[2]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = _text_ids(path)
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    off = offload.run(str(path), budget=int(weights * 0.6), offload_dir=offload_dir,
                      max_tokens=64, experts="cache", predict=predict, progress=False)
    try:
        assert off._offload_runtime.plan.experts.mode == "cache"
        with torch.no_grad():
            assert torch.equal(off(ids).logits, ref)
            assert torch.equal(off.generate(ids, max_new_tokens=6, do_sample=False), ref_tokens)
        st = offload.stats(off)["experts"]
        assert st["on_demand"] > 0
        assert (st["prediction_gate"] is not None) == predict
    finally:
        offload.close(off)
