"""Bad input gets a clear error naming the problem and the fix; nothing is left half-written."""
from __future__ import annotations

import builtins
from collections import namedtuple

import pytest
import torch

import offload
from conftest import tiny_model, weight_bytes
from offload.errors import BudgetError, HardwareError, ModelError, StoreError


def test_budget_below_minimum_states_the_minimum(checkpoint, offload_dir):
    path, _ = checkpoint
    with pytest.raises(BudgetError) as e:
        offload.run(path, budget="100KB", offload_dir=offload_dir)
    err = e.value
    assert err.minimum_bytes and err.minimum_bytes > err.budget_bytes == 100_000
    assert "minimum working set" in str(err) and "at least" in str(err)
    # the stated minimum is really enough
    model = offload.run(path, budget=err.minimum_bytes, offload_dir=offload_dir)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    offload.close(model)


@pytest.mark.parametrize("budget", ["lots", "12 parsecs", "-1GB", "0%"])
def test_malformed_budget(checkpoint, offload_dir, budget):
    path, _ = checkpoint
    with pytest.raises(BudgetError, match="budget"):
        offload.run(path, budget=budget, offload_dir=offload_dir)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(StoreError, match="no model at"):
        offload.run(tmp_path / "nope", budget="1GB")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="config.json"):
        offload.run(tmp_path / "empty", budget="1GB")


def test_truncated_checkpoint(checkpoint, offload_dir):
    path, _ = checkpoint
    st = path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated or corrupt"):
        offload.run(path, budget="50%", offload_dir=offload_dir)
    assert not any(offload_dir.iterdir())   # nothing written


@pytest.mark.parametrize("unit", ["layer.4.up", "norm"])   # streamed, resident
def test_store_checksum_mismatch_names_the_unit(checkpoint, offload_dir, unit):
    path, _ = checkpoint
    m = offload.pack(path, offload_dir=offload_dir, progress=False)
    u = m.unit(unit)
    with open(m.path / "units.bin", "r+b") as f:
        f.seek(u.offset + 100)
        byte = f.read(1)
        f.seek(u.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    model = None
    with pytest.raises(StoreError, match=f"checksum mismatch in unit {unit}") as e:
        model = offload.run(path, budget="20%", offload_dir=offload_dir, max_tokens=16)
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
    assert e.value.unit == unit
    if model is not None:   # streamed: the model refuses every later forward too
        with pytest.raises(StoreError, match="checksum mismatch"):
            with torch.no_grad():
                model(torch.tensor([[5, 6, 7]]))


def test_unsupported_architecture_lists_the_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100))
    with pytest.raises(ModelError) as e:
        offload.run(model, budget="50%", offload_dir=tmp_path)
    assert "gpt2" in str(e.value)
    for name in ("llama", "mistral", "qwen2"):
        assert name in str(e.value)


def test_offload_dir_not_writable(checkpoint, tmp_path):
    path, _ = checkpoint
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(HardwareError, match="offload dir") as e:
        offload.run(path, budget="50%", offload_dir=blocker / "cache")
    assert "--offload-dir" in str(e.value)


def test_offload_dir_full_before_writing(checkpoint, offload_dir, monkeypatch):
    path, _ = checkpoint
    import offload.store.pack as pack_mod

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pack_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 12345))
    with pytest.raises(HardwareError, match="needs") as e:
        offload.run(path, budget="50%", offload_dir=offload_dir)
    assert e.value.free_bytes == 12345 and e.value.needed_bytes > 0
    assert not any(offload_dir.iterdir())


def test_disk_full_mid_pack_cleans_up(checkpoint, offload_dir, monkeypatch):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    path, _ = checkpoint
    import offload.store.pack as pack_mod

    real_open = builtins.open

    def full_open(file, mode="r", *a, **kw):
        if str(file).endswith("units.bin") and "w" in mode:
            return real_open("/dev/full", mode, *a, **kw)
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(pack_mod, "open", full_open, raising=False)
    with pytest.raises(HardwareError, match="ran out of space"):
        offload.pack(path, offload_dir=offload_dir, progress=False)
    assert not any(offload_dir.iterdir())


def test_forward_beyond_the_reserve_is_refused(offload_dir):
    model = tiny_model("llama")
    off = offload.run(model, budget=int(weight_bytes(model) * 0.5), offload_dir=offload_dir,
                      max_tokens=8)
    with pytest.raises(BudgetError, match="max_tokens"):
        with torch.no_grad():
            off(torch.randint(3, 3000, (2, 30)))
    # the pipeline recovers: a forward within the reserve still works after the refusal
    with torch.no_grad():
        off(torch.randint(3, 3000, (1, 4)))
    offload.close(off)


def test_bad_device(checkpoint, offload_dir):
    path, _ = checkpoint
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")   # the check is about GPU-less machines
    with pytest.raises(HardwareError, match="no CUDA GPU"):
        offload.run(path, budget="50%", offload_dir=offload_dir, device="cuda")
