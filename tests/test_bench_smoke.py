"""The dense and MoE benches at toy size, so they cannot rot (their figures are not asserted:
noise)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_toy_bench_runs_every_contender(tmp_path):
    out = tmp_path / "bench_dense.json"
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_dense.py"), "--toy",
                        "--quiet", "--wait-quiet", "0", "--work-dir", str(tmp_path / "bench"),
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "targets" in r.stdout and "I/O floor" in r.stdout
    result = json.loads(out.read_text())
    for name in ("resident", "accelerate", "offload-b1", "offload-b8"):
        assert result["contenders"][name]["returncode"] == 0, name
    offload_rows = [row for row in result["rows"] if row.get("contender", "").startswith("offload")]
    assert offload_rows and all(row["tokens_match_resident"] is True for row in offload_rows)


def test_toy_moe_bench_runs_every_contender(tmp_path):
    out = tmp_path / "bench_moe.json"
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_moe.py"), "--toy",
                        "--quiet", "--wait-quiet", "0", "--work-dir", str(tmp_path / "bench"),
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "targets" in r.stdout and "I/O floor" in r.stdout
    result = json.loads(out.read_text())
    for name in ("resident", "accelerate", "offload-layer", "offload-experts", "offload-predict"):
        assert result["contenders"][name]["returncode"] == 0, name
    offload_rows = [row for row in result["rows"] if row["key"].startswith("offload")]
    assert len(offload_rows) == 3
    assert all(row["tokens_match_resident"] is True for row in offload_rows), offload_rows
