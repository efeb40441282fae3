"""The Accelerate integration: take over a dispatched model, dispatch_model, infer_device_map."""
from __future__ import annotations

import os

import pytest
import torch

import offload
from conftest import tiny_model, weight_bytes
from offload.errors import HardwareError, ModelError, StoreError
from offload.integrations import accelerate as hook

# Layers on "cpu" and on "disk", the head on disk too.
MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
       **{f"model.layers.{i}": ("disk" if i % 3 else "cpu") for i in range(12)},
       "lm_head": "disk"}


def _ids(batch=2):
    return torch.randint(3, 3000, (batch, 9), generator=torch.Generator().manual_seed(1))


def _accelerate_leftovers(model) -> list[str]:
    """Modules still carrying anything Accelerate's hooks attach: the hook, the saved forward,
    a forward of its own in the instance (offload's row-chunked embedding and head aside),
    or the device-moving overrides dispatch_model adds."""
    try:   # accelerate < 1.16 lists the overrides; later ones mark each one
        from accelerate.hooks import _accelerate_added_attributes as listed
    except ImportError:
        listed = ()

    rows = {id(m) for m, _ in model._offload_runtime.adapter.row_points(model).values()}
    return [name for name, m in model.named_modules()
            if hasattr(m, "_hf_hook") or hasattr(m, "_old_forward")
            or ("forward" in m.__dict__ and id(m) not in rows
                and not getattr(m.__dict__["forward"], "offload_wrapper", False))
            or any(a in m.__dict__ for a in listed)
            or any(getattr(v, "_accelerate_added_attribute", False) for v in m.__dict__.values())]


@pytest.fixture
def resident_and_checkpoint(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "ckpt"
    model.save_pretrained(path, safe_serialization=True)
    with torch.no_grad():
        ref = model(_ids()).logits
    return ref, path


def test_from_accelerate_from_pretrained_with_cpu_and_disk(resident_and_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    ref, path = resident_and_checkpoint
    acc = AutoModelForCausalLM.from_pretrained(path, device_map=MAP, dtype=torch.float32,
                                               offload_folder=tmp_path / "acc")
    assert _hooked(acc), "Accelerate must have hooked the model"
    model = offload.from_accelerate(acc, max_tokens=64, progress=False)
    assert model is acc
    assert _accelerate_leftovers(model) == []
    assert not hasattr(model, "hf_device_map")
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref)
    rt = model._offload_runtime
    assert rt.plan.stream, "the disk part streams"
    assert str(rt.manifest.path).startswith(str(tmp_path / "acc")), "store beside Accelerate's"
    offload.close(model)


def test_from_accelerate_reads_accelerates_dat_files(tmp_path):
    """accelerate.dispatch_model with offload_dir writes .dat files: they are the source."""
    from accelerate import dispatch_model

    model = tiny_model("llama")
    with torch.no_grad():
        ref = model(_ids()).logits
    acc = dispatch_model(model, MAP, offload_dir=str(tmp_path / "dat"))
    assert any(p.suffix == ".dat" for p in (tmp_path / "dat").iterdir())
    out = offload.from_accelerate(acc, budget=int(weight_bytes(tiny_model("llama")) * 0.3),
                                  max_tokens=64, progress=False)
    assert _accelerate_leftovers(out) == []
    with torch.no_grad():
        assert torch.equal(out(_ids()).logits, ref)
    offload.close(out)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_from_accelerate_takes_cpu_offload_and_disk_offload(how, tmp_path):
    """Accelerate's whole-model offloads: ``cpu_offload`` (weights in a CPU state dict, every
    parameter on meta) and ``disk_offload`` (weights in ``.dat`` files) are sources too; the
    model, taken over at 30% of its weights, gives the resident logits bitwise."""
    import accelerate

    model = tiny_model("llama")
    with torch.no_grad():
        ref = model(_ids()).logits
    if how == "cpu_offload":
        acc = accelerate.cpu_offload(model, execution_device="cpu")
    else:
        acc = accelerate.disk_offload(model, str(tmp_path / "dat"), execution_device="cpu")
        assert any(p.suffix == ".dat" for p in (tmp_path / "dat").iterdir())
    assert _hooked(acc) and any(p.device.type == "meta" for p in acc.parameters())
    budget = int(weight_bytes(tiny_model("llama")) * 0.3)
    out = offload.from_accelerate(acc, budget=budget, offload_dir=tmp_path / "store",
                                  max_tokens=64, progress=False)
    assert _accelerate_leftovers(out) == []
    assert out._offload_runtime.plan.stream, "at 30% of the weights, layers stream"
    with torch.no_grad():
        assert torch.equal(out(_ids()).logits, ref)
    offload.close(out)


def test_dispatch_model_takes_accelerates_arguments(tmp_path):
    from accelerate.utils import offload_state_dict

    model = tiny_model("llama")
    with torch.no_grad():
        ref = model(_ids()).logits
    disk = {k: v for k, v in model.state_dict().items()
            if hook._entry_for(MAP, k)[1] == "disk"}
    offload_state_dict(str(tmp_path / "folder"), disk)
    out = hook.dispatch_model(model, device_map=MAP, offload_folder=str(tmp_path / "folder"),
                              max_tokens=64, progress=False)
    with torch.no_grad():
        assert torch.equal(out(_ids()).logits, ref)
    s = offload.stats(out)
    assert s["budget_bytes"] == hook._map_bytes(tiny_model("llama"), MAP, torch.device("cpu"))
    assert s["accounted_peak_bytes"] <= s["budget_bytes"]
    offload.close(out)


def test_infer_device_map_is_accelerates_format(resident_and_checkpoint, tmp_path):
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    ref, path = resident_and_checkpoint
    dm = offload.infer_device_map(path, "40%", offload_dir=tmp_path / "stores", max_tokens=32)
    assert set(dm.values()) <= {"cpu", "disk"} and "disk" in dm.values()
    plan = offload.plan(path, "40%", offload_dir=tmp_path / "stores", max_tokens=32)
    resident_layers = {k for k, t, _ in plan.homes if t == "device" and k.startswith("layer.")}
    assert (dm["model.layers.0.self_attn"] == "cpu") == ("layer.0.attn" in resident_layers)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hook.check_device_map(model, dm)   # covers every module with weights
    acc = dispatch_model(model, dm, offload_dir=str(tmp_path / "acc"))   # Accelerate takes it
    with torch.no_grad():
        assert torch.equal(acc(_ids()).logits, ref)


def test_a_device_that_does_not_exist_is_named(tmp_path):
    model = tiny_model("llama")
    bad = {**MAP, "model.layers.2": "cuda:7"}
    with pytest.raises(HardwareError, match=r"model\.layers\.2 on 'cuda:7'"):
        hook.dispatch_model(model, bad, offload_folder=str(tmp_path))
    with pytest.raises(HardwareError, match=r"model\.norm on 'npu'"):
        hook.check_device_map(model, {**MAP, "model.norm": "npu"})


def test_a_module_missing_from_the_device_map_is_named(tmp_path):
    model = tiny_model("llama")
    bad = {k: v for k, v in MAP.items() if k != "model.layers.5"}
    with pytest.raises(ModelError, match=r"module model\.layers\.5\.\S+ holds weights but is "
                                         "missing from the device_map"):
        hook.dispatch_model(model, bad, offload_folder=str(tmp_path))
    with pytest.raises(ModelError, match="model.layers.99"):
        hook.check_device_map(model, {**MAP, "model.layers.99": "cpu"})


def test_weights_missing_from_the_offload_folder_are_named(tmp_path):
    from accelerate import dispatch_model

    model = tiny_model("llama")
    with pytest.raises(StoreError, match=r"module model\.layers\.1\.\S+ is mapped to 'disk'"):
        hook.dispatch_model(tiny_model("llama"), MAP, offload_folder=str(tmp_path / "empty"))
    acc = dispatch_model(model, MAP, offload_dir=str(tmp_path / "dat"))
    os.remove(tmp_path / "dat" / "model.layers.4.mlp.up_proj.weight.dat")
    with pytest.raises(StoreError, match=r"module model\.layers\.4\.mlp\.up_proj: weight "
                                         r"model\.layers\.4\.mlp\.up_proj\.weight is missing"):
        offload.from_accelerate(acc, budget="40%", max_tokens=64, progress=False)
    assert _hooked(acc), "a failed take-over leaves Accelerate's model as it was"


def test_a_model_without_accelerate_hooks_is_refused():
    with pytest.raises(ModelError, match="no Accelerate hooks"):
        offload.from_accelerate(tiny_model("llama"))


def _hooked(model) -> bool:
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def test_the_example_runs(resident_and_checkpoint, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, path = resident_and_checkpoint
    example = Path(__file__).resolve().parents[1] / "examples" / "accelerate_one_line.py"
    r = subprocess.run([sys.executable, str(example), str(path), "--budget", "60%",
                        "--offload-folder", str(tmp_path / "acc")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16 tokens in" in r.stdout and "'tokens_per_s'" in r.stdout
