"""`offload plan` before any download: a config alone (a preset, a config.json, a checkpoint
directory without weights) on a machine measured here or described in a file."""
from __future__ import annotations

import json

import pytest
import torch

import offload
from offload.errors import HardwareError, ModelError, OffloadError, StoreError
from test_cli import offload_cli

TINY = dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
            tie_word_embeddings=False, max_position_embeddings=512, torch_dtype="float32")


def _llama_params(h, inter, layers, heads, kv_heads, vocab, tied=False) -> dict:
    """Parameter counts of a Llama by hand: per layer the attention (q, o: h x h; k, v:
    h x kv width), the MLP (gate, up, down: h x inter) and two norms; embedding, head, norm."""
    kv = h // heads * kv_heads
    attn, mlp = 2 * h * h + 2 * h * kv, 3 * h * inter
    return {"projections": layers * (attn + mlp), "norms": layers * 2 * h + h,
            "embed_head": vocab * h * (1 if tied else 2)}


@pytest.fixture
def machine(tmp_path):
    path = tmp_path / "machine.json"
    path.write_text(json.dumps({"device": "cpu", "disk_read_bps": 1e9, "compute_bps": 4e9,
                                "description": "a test machine"}))
    return path


def test_a_config_alone_is_planned_as_hand_arithmetic_says(tmp_path, machine):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(TINY))
    d = tmp_path / "offload"
    p = offload.plan(tmp_path / "ckpt", "4MB", profile=machine, max_tokens=16, offload_dir=d)
    n = _llama_params(256, 1024, 4, 4, 2, 4096)
    weights = 4 * sum(n.values())                      # float32, as the config says
    assert p.weight_bytes == weights == 24_126_464
    assert p.compute_s == pytest.approx(weights / 4e9)
    assert p.io_s == pytest.approx(p.streamed_bytes / 1e9)
    # compute and reads overlap, sharing the cores: their 4-norm (placement.overlap)
    assert p.predicted_s == pytest.approx((p.compute_s ** 4 + p.io_s ** 4) ** 0.25)
    assert p.slots > 1
    assert p.bottleneck == "disk" and p.device == "cpu"
    assert p.budget_bytes == 4_000_000 and p.total_bytes <= p.budget_bytes
    assert "hardware profile: described in" in p.table() and "a test machine" in p.table()
    assert not list(d.glob("*.offload")) and not (d / "profile.json").exists()   # nothing


def test_the_families_per_layer_time_is_charged_to_compute(tmp_path, machine):
    """A profile that gives a family's per-layer and per-step time (what a decode step spends
    beyond its weight bytes) adds layers x per-layer + per-step to the compute estimate; one
    measured here has it for the family it planned, from miniatures of that family."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    d = json.loads(machine.read_text())
    d["layer_s"] = {"llama": [0.002, 0.005], "mixtral": [1.0, 1.0]}
    machine.write_text(json.dumps(d))
    p = offload.plan(tmp_path / "config.json", "64MB", profile=machine, max_tokens=16,
                     offload_dir=tmp_path / "offload")
    assert p.overhead_s == pytest.approx(4 * 0.002 + 0.005)
    assert p.compute_s == pytest.approx(p.weight_bytes / 4e9 + 4 * 0.002 + 0.005)
    assert "per-layer work" in p.table()

    from offload.hardware import load_or_measure
    from transformers import AutoConfig

    config = AutoConfig.for_model(**{k: v for k, v in TINY.items() if k != "torch_dtype"})
    measured = load_or_measure(None, tmp_path, torch.device("cpu"), torch.float32, 256,
                               max_bytes=16 << 20, family=config)
    per_layer, per_step = measured.layer_s["llama"]
    assert per_layer > 0 and per_step >= 0
    # the runtime's streaming, at a small Unit and a large one within the 16 MB bound
    sizes = sorted(int(k) for k in measured.stream_reads)
    assert len(sizes) == 2 and sizes[0] < sizes[1] <= (16 << 20) // 8
    assert all(bps > 0 and cpu > 0 for bps, cpu in measured.stream_reads.values())
    assert measured.read_alone_bps > 0
    # a batch-1 plan measures no batch figures (a batched matmul's packing buffers would
    # stay in a batch-1 run's memory); a batch plan measures them once
    assert not measured.batch_compute_bps and "llama@8" not in measured.layer_s
    again = load_or_measure(None, tmp_path, torch.device("cpu"), torch.float32, 256,
                            family=config, batch=8)
    assert tuple(again.layer_s["llama"]) == (per_layer, per_step)   # cached with the profile
    assert again.batch_compute_bps["8"] > 0 and len(again.layer_s["llama@8"]) == 2
    third = load_or_measure(None, tmp_path, torch.device("cpu"), torch.float32, 256,
                            family=config, batch=8)
    assert third.batch_compute_bps == again.batch_compute_bps


def test_a_described_machine_predicts_the_planned_batch(tmp_path, machine):
    """``--batch 8`` on a profile that gives compute and per-layer time at batch 8: the
    prediction is for 8 sequences a step (compute at its batch-8 speed, the same bytes read)
    and the plan says so."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    d = json.loads(machine.read_text())
    d.update(layer_s={"llama": [0.002, 0.005], "llama@8": [0.003, 0.006]},
             batch_compute_bps={"8": 1e9})
    machine.write_text(json.dumps(d))
    plans = {b: offload.plan(tmp_path / "config.json", "64MB", profile=machine, batch=b,
                             max_tokens=16 * b, offload_dir=tmp_path / "offload")
             for b in (1, 8)}
    assert plans[1].compute_s == pytest.approx(plans[1].weight_bytes / 4e9 + 4 * 0.002 + 0.005)
    assert plans[8].compute_s == pytest.approx(plans[8].weight_bytes / 1e9 + 4 * 0.003 + 0.006)
    assert plans[8].batch == 8 and "tok/s at batch 8" in plans[8].table()
    r = offload_cli("plan", tmp_path / "config.json", "--budget", "64MB", "--profile", machine,
                    "--batch", "8", "--max-tokens", "128", "--offload-dir", tmp_path / "o")
    assert r.returncode == 0 and "tok/s at batch 8" in r.stdout, r.stderr[-2000:]


def test_a_described_machine_may_give_its_streaming(tmp_path, machine):
    """``stream_reads`` in a profile file (the runtime's streaming at two Unit sizes) is read
    and prices a plan's small Units: their CPU seconds in compute, their disk rate."""
    from offload.hardware import described

    d = json.loads(machine.read_text())
    d["stream_reads"] = {"524288": [0.5e9, 1e-4], "16777216": [1e9, 4e-4]}
    d["read_alone_bps"] = 0.8e9
    machine.write_text(json.dumps(d))
    prof = described(machine)
    assert prof.read_alone_bps == 0.8e9
    assert prof.stream_reads == {"524288": (0.5e9, 1e-4), "16777216": (1e9, 4e-4)}
    assert prof.disk_seconds(1e6, 524288) == pytest.approx(1e6 / 0.5e9)
    assert prof.read_cpu_seconds(3, 524288) == pytest.approx(3e-4)


def test_a_config_alone_runs_no_head_probe(tmp_path, machine, monkeypatch):
    """A plan from a config alone runs nothing: not the head-chunk probe (a whole-head matmul
    per probed row count: 18 s for Llama-3-70B here), which the run makes; it says so."""
    from offload.kernels import head

    def probe(*args, **kwargs):
        raise AssertionError("a config-only plan probed the head")

    monkeypatch.setattr(head, "chunking_mismatches", probe)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    p = offload.plan(tmp_path / "config.json", "4MB", profile=machine, max_tokens=16,
                     offload_dir=tmp_path / "offload")
    assert not p.head_probed and any(k.startswith("head.") for k in p.stream)
    assert "checked by the run" in p.table()


def test_a_4_bit_config_stores_its_projections_in_blocks(tmp_path, machine):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    p = offload.plan(tmp_path / "config.json", "8MB", dtype="q4_k", profile=machine,
                     max_tokens=16, offload_dir=tmp_path / "offload")
    n = _llama_params(256, 1024, 4, 4, 2, 4096)
    # Q4_K: 144 bytes per 256 weights; norms, embedding and head stay float32
    assert p.stored_bytes == n["projections"] * 144 // 256 + 4 * (n["norms"] + n["embed_head"])
    assert p.weight_bytes == 4 * sum(n.values())   # decoded to float32, as a GGUF's


def test_llama_3_70b_on_the_shipped_24gb_gpu_profile():
    n = _llama_params(8192, 28672, 80, 64, 8, 128256)
    bf16 = offload.plan("llama-3-70b", "20GB", profile="pcie4-nvme-24gb-gpu")
    assert bf16.weight_bytes == 2 * sum(n.values()) == 141_107_412_992
    assert bf16.device.startswith("cuda") and bf16.bottleneck == "disk"
    assert bf16.io_s == pytest.approx(bf16.streamed_bytes / 6.5e9)
    assert bf16.link_s == pytest.approx(bf16.streamed_bytes / 25e9)
    q4 = offload.plan("llama-3-70b", "20GB", dtype="q4_k", profile="pcie4-nvme-24gb-gpu")
    assert q4.stored_bytes == n["projections"] * 144 // 256 + 4 * (n["norms"] + n["embed_head"])
    assert q4.predicted_s < bf16.predicted_s   # 0.33x the bytes per streamed projection


@pytest.mark.parametrize("preset", ["llama-3-8b", "mixtral-8x7b", "qwen2-57b-a14b"])
def test_every_shipped_preset_plans(preset):
    p = offload.plan(preset, "24GB", profile="pcie4-nvme-24gb-gpu")
    assert p.predicted_s > 0 and p.weight_bytes > 10**10
    if preset != "llama-3-8b":
        assert p.experts is not None and p.experts.mode == "cache"


def test_bad_configs_profiles_and_budgets(tmp_path, machine):
    with pytest.raises(StoreError, match="llama-3-8b"):
        offload.plan("llama-4-9000b", "1GB", profile=machine)
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="supported|llama"):
        offload.plan(tmp_path / "gpt2.json", "1GB", profile=machine)
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"device": "cuda", "disk_read_bps": 1e9}))
    with pytest.raises(HardwareError, match="lacks compute_bps, h2d_bps"):
        offload.plan("llama-3-8b", "1GB", profile=half)
    with pytest.raises(HardwareError, match="no hardware profile"):
        offload.plan("llama-3-8b", "1GB", profile="a-machine-nobody-described")
    with pytest.raises(OffloadError, match="minimum working set") as e:
        offload.plan("llama-3-70b", "100MB", profile="pcie4-nvme-24gb-gpu")
    assert e.value.minimum_bytes > 100e6
    with pytest.raises(OffloadError, match="dtype="):
        offload.plan("llama-3-8b", "1GB", dtype="q3_xs", profile=machine)


def test_the_cli_plans_a_preset_without_weights(tmp_path):
    r = offload_cli("plan", "llama-3-70b", "--budget", "20GB", "--dtype", "q4_k",
                    "--profile", "pcie4-nvme-24gb-gpu", "--offload-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hardware profile: described in" in r.stdout and "encoded store" in r.stdout
    r = offload_cli("plan", "llama-3-70b", "--profile", "pcie4-nvme-24gb-gpu", "--device", "cpu")
    assert r.returncode == 2 and "--device and --profile" in r.stderr
    r = offload_cli("run", "llama-3-70b")
    assert r.returncode == 2 and "no model at llama-3-70b" in r.stderr


def test_the_plan_says_what_would_change_it():
    """Llama-3-70B in bf16 at 20 GB on the 24 GB GPU profile is disk-bound; each suggestion's
    figure is the cost model's arithmetic on the plan's own numbers."""
    from offload.sizes import format_bytes

    p = offload.plan("llama-3-70b", "20GB", profile="pcie4-nvme-24gb-gpu")
    lines = p.advice()
    assert lines[1].startswith("what would change it")
    compute = p.weight_bytes / 0.9e12
    assert f"a budget of {format_bytes(p.weight_bytes + p.reserve_bytes)} keeps every Unit" \
        in lines[2] and f"~{1 / compute:.2f} tok/s" in lines[2]
    link = p.streamed_bytes / 25e9
    assert f"a host tier of {format_bytes(p.streamed_bytes)}" in lines[3]
    assert f"~{1 / max(compute, link):.2f} tok/s" in lines[3]
    q4 = p.streamed_bytes * 144 / 256 / 2   # bf16 -> Q4_K
    assert f"~{format_bytes(q4)} a step: ~{1 / max(compute, q4 / 6.5e9):.2f} tok/s" in lines[4]
    assert "\n".join(lines) in p.table()
    small = offload.plan("llama-3-8b", "40GB", profile="pcie4-nvme-24gb-gpu")
    assert small.bottleneck == "compute" and "compute-bound" in small.advice()[1]
