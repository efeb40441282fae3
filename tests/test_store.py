"""The packed store: aligned Units, checksums, atomic writes, reuse and rebuild."""
from __future__ import annotations

import json
import os
import zlib

import pytest
import torch

import offload
from offload.errors import StoreError
from offload.store.format import BLOCK, read_manifest
from offload.tiers.device import aligned_host
from offload.tiers.disk import DiskTier
from offload.tiers.transport import Transport
from offload.units import TENSOR_ALIGN


def test_units_are_aligned_and_checksummed(checkpoint, tmp_path):
    path, model = checkpoint
    m = offload.pack(path, tmp_path / "store", progress=False)
    data = (m.path / "units.bin").read_bytes()
    assert len(data) == m.data_bytes and m.data_bytes % BLOCK == 0
    state = model.state_dict()
    for u in m.units:
        assert u.offset % BLOCK == 0
        assert zlib.crc32(data[u.offset:u.offset + u.nbytes]) == u.checksum
        for t in u.tensors:
            assert t.offset % TENSOR_ALIGN == 0
    # every weight byte lands where the manifest says
    layer = m.unit("layer.3.attn")
    q = layer.tensors[[t.name for t in layer.tensors].index("q_proj.weight")]
    raw = data[layer.offset + q.offset: layer.offset + q.offset + q.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(q.shape),
                       state["model.layers.3.self_attn.q_proj.weight"])
    head = [u for u in m.units if u.group == "head"]
    assert [u.rows for u in head] == [(0, 1024), (1024, 2048), (2048, 3000)]


def test_disk_reads_at_odd_sizes_and_thread_counts(tmp_path):
    """Reads around 4096 boundaries x thread counts land exactly; untouched bytes stay put."""
    from offload.units import Unit

    blob = os.urandom(5 * BLOCK * 1024 + 4096)
    f = tmp_path / "units.bin"
    f.write_bytes(blob)
    for threads in (1, 3):
        tier, transport = DiskTier(f), Transport(threads)
        try:
            for off, n in [(0, 1), (0, 4095), (BLOCK, 4096), (2 * BLOCK, 4097),
                           (BLOCK, (8 << 20) + 1), (0, 5 * BLOCK * 1024)]:
                u = Unit("u", "layer", "layer", 0, off, n, zlib.crc32(blob[off:off + n]), ())
                buf = aligned_host(n + 2 * BLOCK)
                buf.fill_(7)
                transport.read(tier, u, buf.numpy(), verify=True, consumer="test").wait()
                got = buf.numpy()
                assert bytes(got[:n]) == blob[off:off + n]
                aligned_n = (n + BLOCK - 1) // BLOCK * BLOCK
                assert (got[aligned_n:] == 7).all()
        finally:
            transport.close()
            tier.close()


def test_store_reused_then_rebuilt_when_source_changes(checkpoint, offload_dir):
    path, _ = checkpoint
    m1 = offload.pack(path, offload_dir=offload_dir, progress=False)
    mtime = (m1.path / "units.bin").stat().st_mtime_ns
    m2 = offload.pack(path, offload_dir=offload_dir, progress=False)
    assert (m2.path / "units.bin").stat().st_mtime_ns == mtime     # reused
    from safetensors.torch import load_file, save_file
    st = path / "model.safetensors"
    tensors = load_file(st)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, st, metadata={"format": "pt"})
    m3 = offload.pack(path, offload_dir=offload_dir, progress=False)
    assert m3.source["fingerprint"] != m1.source["fingerprint"]
    assert m3.unit("norm").checksum != m1.unit("norm").checksum


def test_a_model_named_like_another_warns_that_it_packs_over_its_store(checkpoint, tmp_path,
                                                                      offload_dir, caplog):
    path, _ = checkpoint
    twin = tmp_path / "other" / path.name    # another model whose directory has the same name
    twin.parent.mkdir()
    import shutil
    shutil.copytree(path, twin)
    from safetensors.torch import load_file, save_file
    tensors = load_file(twin / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, twin / "model.safetensors", metadata={"format": "pt"})
    m1 = offload.pack(path, offload_dir=offload_dir, progress=False)
    with caplog.at_level("WARNING", logger="offload"):
        m2 = offload.pack(twin, offload_dir=offload_dir, progress=False)
    assert m2.path == m1.path and m2.source["fingerprint"] != m1.source["fingerprint"]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("another model" in s and str(path.absolute()) in s and "offload_dir" in s
               for s in said), said
    caplog.clear()
    with caplog.at_level("WARNING", logger="offload"):   # its own source changed: no warning
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
        save_file(tensors, twin / "model.safetensors", metadata={"format": "pt"})
        offload.pack(twin, offload_dir=offload_dir, progress=False)
    assert not [r for r in caplog.records if "another model" in r.getMessage()]


def test_interrupted_pack_leaves_no_store_and_next_run_rebuilds(checkpoint, offload_dir,
                                                                 monkeypatch):
    path, model = checkpoint
    import offload.store.pack as pack_mod

    calls = {"n": 0}
    real = pack_mod._part_tensor

    def dying(part, load):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated Ctrl-C mid-pack")
        return real(part, load)

    monkeypatch.setattr(pack_mod, "_part_tensor", dying)
    with pytest.raises(KeyboardInterrupt):
        offload.pack(path, offload_dir=offload_dir, progress=False)
    assert not (offload_dir / f"{path.name}.offload").exists()
    assert not list(offload_dir.glob(".*partial*"))
    monkeypatch.setattr(pack_mod, "_part_tensor", real)
    m = offload.pack(path, offload_dir=offload_dir, progress=False)
    assert read_manifest(m.path).data_bytes == m.data_bytes


def test_stale_partial_from_a_dead_process_is_cleaned(checkpoint, offload_dir):
    path, _ = checkpoint
    stale = offload_dir / f".{path.name}.offload.partial-999999999-deadbeef"
    stale.mkdir()
    (stale / "units.bin").write_bytes(b"half")
    offload.pack(path, offload_dir=offload_dir, progress=False)
    assert not stale.exists()


def test_store_of_another_version_is_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    m = offload.pack(path, tmp_path / "store", progress=False)
    d = json.loads((m.path / "manifest.json").read_text())
    d["version"] = 99
    (m.path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(StoreError, match="version 99"):
        read_manifest(m.path)
    # ...and offload.pack rebuilds it rather than misreading it
    m2 = offload.pack(path, tmp_path / "store", progress=False)
    assert read_manifest(m2.path).units == m2.units


def test_two_runtimes_in_one_process_do_not_interfere(offload_dir):
    from conftest import tiny_model, weight_bytes

    a, b = tiny_model("llama", seed=1), tiny_model("qwen2", seed=2)
    ids = torch.randint(3, 3000, (1, 7))
    with torch.no_grad():
        ra, rb = a(ids).logits, b(ids).logits
    budget_a, budget_b = int(weight_bytes(a) * 0.2), int(weight_bytes(b) * 0.3)
    oa = offload.run(a, budget=budget_a, offload_dir=offload_dir, max_tokens=16)
    ob = offload.run(b, budget=budget_b, offload_dir=offload_dir, max_tokens=16)
    with torch.no_grad():
        for _ in range(2):   # interleaved passes
            assert torch.equal(oa(ids).logits, ra)
            assert torch.equal(ob(ids).logits, rb)
    offload.close(oa)
    offload.close(ob)


def test_pack_never_replaces_a_directory_that_is_not_a_store(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(StoreError, match="not a packed store"):
        offload.pack(path, path, progress=False)
    assert (path / "config.json").is_file()
    # with the checkpoint inside the offload dir, the store lands beside it, not on it
    m = offload.pack(path, offload_dir=path.parent, progress=False)
    assert m.path != path and (path / "config.json").is_file()


def test_a_filesystem_that_refuses_o_direct_gets_buffered_reads(checkpoint, tmp_path,
                                                                 monkeypatch, caplog):
    """Where the filesystem refuses O_DIRECT (EINVAL: some overlays, older tmpfs), the disk
    tier reads buffered, says so once, and ``stats()["direct_io"]`` is False; the streamed
    model's logits are the resident's, bitwise, and the bytes counted are those it read."""
    import errno
    import logging

    import offload.tiers.disk as disk

    path, model = checkpoint
    ids = torch.randint(3, 3000, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
    real_open = os.open

    def refusing_open(p, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", p)
        return real_open(p, flags, *args)

    monkeypatch.setattr(disk.os, "open", refusing_open)
    with caplog.at_level(logging.WARNING, logger="offload.tiers.disk"):
        off = offload.run(path, budget="30%", offload_dir=tmp_path, max_tokens=32,
                          progress=False)
    assert "O_DIRECT refused" in caplog.text
    s = offload.stats(off)
    assert s["direct_io"] is False and off._offload_runtime.plan.stream
    with torch.no_grad():
        assert torch.equal(off(ids).logits, ref)
    s = offload.stats(off)
    assert s["bytes_read"]["disk"] >= sum(
        off._offload_runtime.manifest.unit(k).nbytes for k in off._offload_runtime.plan.stream)
    offload.close(off)

    monkeypatch.setattr(disk.os, "open", real_open)   # the same store, O_DIRECT allowed
    off = offload.run(path, budget="30%", offload_dir=tmp_path, max_tokens=32, progress=False)
    assert offload.stats(off)["direct_io"] is True
    offload.close(off)
