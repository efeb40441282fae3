"""Every bench at toy size, so they cannot rot (their figures are not asserted:
noise)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _toy_run(bench: str, tmp_path, timeout: int, floor: bool = True, extra=()) -> dict:
    """Run ``benches/<bench>.py --toy``; it must succeed and print its targets and (``floor``)
    an I/O floor row of its table: the floor's name, then tok/s as a figure."""
    out = tmp_path / f"{bench}.json"
    r = subprocess.run([sys.executable, str(ROOT / "benches" / f"{bench}.py"), "--toy",
                        "--quiet", "--wait-quiet", "0", "--work-dir", str(tmp_path / "bench"),
                        "--json", str(out), *extra], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "targets" in r.stdout
    if floor:
        rows = re.findall(r"^I/O floor[^\n]*?  +(?:\d+  +)?(\d+\.\d{3})\b", r.stdout, re.M)
        assert rows and all(float(v) > 0 for v in rows), r.stdout[-3000:]
    return json.loads(out.read_text())


def test_toy_bench_runs_every_contender(tmp_path):
    result = _toy_run("bench_dense", tmp_path, timeout=900)
    for name in ("resident", "accelerate", "offload-b1", "offload-b8"):
        assert result["contenders"][name]["returncode"] == 0, name
    offload_rows = [row for row in result["rows"] if row.get("contender", "").startswith("offload")]
    assert offload_rows and all(row["tokens_match_resident"] is True for row in offload_rows)


def test_toy_moe_bench_runs_every_contender(tmp_path):
    result = _toy_run("bench_moe", tmp_path, timeout=600)
    for name in ("resident", "accelerate", "offload-layer", "offload-experts", "offload-predict"):
        assert result["contenders"][name]["returncode"] == 0, name
    offload_rows = [row for row in result["rows"] if row["key"].startswith("offload")]
    assert len(offload_rows) == 3
    assert all(row["tokens_match_resident"] is True for row in offload_rows), offload_rows


def test_toy_moefied_moe_bench_decodes_real_text_at_batch_2(tmp_path):
    """The trained-routing fixture (SmolLM2's first 4 layers split into experts) through the
    MoE bench at batch 2: offload's rows decode the resident model's tokens."""
    from conftest import require_smollm2

    require_smollm2()
    result = _toy_run("bench_moe", tmp_path, timeout=900, floor=False, extra=(
        "--model", "moefied", "--batch", "2",
        "--only", "resident,offload-experts,offload-predict"))
    rows = {row["key"]: row for row in result["rows"]}
    assert {"offload-experts", "offload-predict"} <= set(rows)
    assert all(rows[k]["tokens_match_resident"] is True and rows[k]["batch"] == 2
               for k in ("offload-experts", "offload-predict"))
    assert result["model"]["dims"]["num_hidden_layers"] == 4


def test_toy_serve_bench_answers_every_client(tmp_path):
    from conftest import require_smollm2

    require_smollm2()
    result = _toy_run("bench_serve", tmp_path, timeout=900, floor=False)
    levels = {lv["clients"]: lv for lv in result["levels"]}
    assert set(levels) == {1, 2}
    assert all(lv["answered"] == lv["requests"] and not lv["failures"] for lv in levels.values())
    assert 0 < result["metrics"]["offload_measured_peak_bytes"] <= \
        result["metrics"]["offload_budget_bytes"]


def test_toy_sparse_bench_runs_every_contender(tmp_path):
    result = _toy_run("bench_sparse", tmp_path, timeout=600)
    for name in ("resident", "accelerate", "dense", "bitmap"):
        assert result["contenders"][name]["returncode"] == 0, name
    rows = {row["key"]: row for row in result["rows"]}
    assert all(rows[k]["tokens_match_resident"] is True for k in ("accelerate", "dense", "bitmap"))
    assert rows["bitmap"]["bytes_read_per_step"] < rows["dense"]["bytes_read_per_step"]
    assert result["decode"]["stored_bps"] > 0


def test_toy_accelerate_hook_bench_runs_both_contenders(tmp_path):
    result = _toy_run("bench_accelerate_hook", tmp_path, timeout=600, floor=False)   # no floor:
    # both contenders stream the same bytes
    for name in ("accelerate", "hook"):
        assert result["contenders"][name]["returncode"] == 0, name
    rows = {row["key"]: row for row in result["rows"]}
    assert rows["hook"]["tokens_match"] is True


def test_toy_kv_bench_runs(tmp_path):
    out = tmp_path / "kv.json"
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_kv.py"), "--toy",
                        "--work-dir", str(tmp_path / "w"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert [row["context"] for row in result["speed"]] == [128, 256, 512]
    assert all("tok_s" in row["paged"] for row in result["speed"]), result["speed"]
    assert [b["fraction"] for b in result["quality"]["budgets"]] == [0.5, 0.2]


def test_toy_quant_bench_runs_every_contender(tmp_path):
    """bench_quant at toy size: GGUFs written, both stores packed, every contender ran and
    both offload stores gave transformers' tokens (the llama.cpp row needs the full bench)."""
    result = _toy_run("bench_quant", tmp_path, timeout=900)
    for kind in ("Q4_0", "Q8_0"):
        for name in ("resident", "quant-b1", "quant-b8", "f32-b1", "f32-b8", "accelerate"):
            assert result["contenders"][f"{kind}/{name}"]["returncode"] == 0, (kind, name)
    rows = [r for r in result["rows"] if r["key"] in ("quant", "f32")]
    assert len(rows) == 8 and all(r["tokens_match"] is True for r in rows), rows
    assert set(result["decode_rates"]) >= {"Q4_0", "Q8_0", "Q4_K", "Q6_K"}


def test_toy_plan_bench_compares_each_row_with_its_prediction(tmp_path):
    """``bench_plan.py --toy``: each row runs at batch 1 and 8 and is set against the plan's
    prediction for that batch (the bytes it predicted to read are the bytes read); with
    ``--repeat 2`` each row is run twice and its median (of two, the slower) run is the one
    set against the prediction."""
    out = tmp_path / "bench_plan.json"
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_plan.py"), "--toy",
                        "--quiet", "--wait-quiet", "0", "--rows", "dense,gguf-q4_0",
                        "--repeat", "2",
                        "--work-dir", str(tmp_path / "bench"), "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "every row within 15% of its prediction" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(x["row"], x["batch"]) for x in rows} == {(k, b) for k in ("dense", "gguf-q4_0")
                                                      for b in (1, 8)}
    for x in rows:
        assert x["measured_s"] > 0 and x["predicted_s"] > 0
        assert len(x["measured_s_runs"]) == 2 and x["measured_s"] == max(x["measured_s_runs"])
        predicted = x["streamed_bytes"] + x["expert_bytes"]
        assert abs(x["read_per_step"] - predicted) <= 0.1 * predicted + (1 << 20), x


def test_toy_fast_bench_runs_every_offload_contender(tmp_path):
    """bench_quant.py --fast at toy size (no llama.cpp row: its build takes minutes): exact and
    fast resident and at both budgets, fast twice each (``--repeat 2``: the row is the median
    run, of two the slower), and the quality table over 256 tokens."""
    result = _toy_run("bench_quant", tmp_path, timeout=900, floor=False,
                      extra=("--fast", "--no-llama-cpp", "--repeat", "2"))
    rows = {(row["contender"], row["budget"]) for row in result["rows"]}
    assert rows == {(c, b) for c in ("exact", "fast") for b in ("resident", "20%", "25%")}
    for row in result["rows"]:
        runs = row["tok_s_runs"]
        assert len(runs) == (2 if row["contender"] == "fast" else 1), row
        assert row["tok_s"] == min(runs) > 0, row
        assert all(0 < p <= row["budget_bytes"] for p in row["measured_peak_bytes_runs"]), row
    assert result["quality"]["tokens"] == 256 and 0 < result["quality"]["agreement"] <= 1
