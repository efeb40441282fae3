"""The CLI as a new user meets it: run, plan, pack, and clear errors without tracebacks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def offload_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "offload.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_run_default_model_streams_text_and_summary(tmp_path):
    r = offload_cli("run", "--budget", "20%", "--max-new-tokens", "12", "--offload-dir", tmp_path,
                    "--prompt", "What is the capital of France?")
    assert r.returncode == 0, r.stderr[-3000:]
    text, _, summary = r.stdout.partition("placement")
    assert "Paris" in text                       # coherent output from the real model
    for field in ("tokens/s", "I/O stall", "read from disk", "peak memory", "budget"):
        assert field in summary
    # a second run reuses the store: no packing bar, same greedy text
    r2 = offload_cli("run", "--budget", "20%", "--max-new-tokens", "12", "--offload-dir",
                     tmp_path, "--prompt", "What is the capital of France?")
    assert r2.returncode == 0 and "packing" not in r2.stderr
    assert r2.stdout.partition("placement")[0] == text


def test_run_batch_from_a_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\n\nWhat is 2 + 2?\nSay hello.\n")
    r = offload_cli("run", "--budget", "25%", "--max-new-tokens", "6", "--offload-dir",
                    tmp_path, "--prompts", prompts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("--- [") == 3
    assert "18 tokens decoded" in r.stdout or "tokens decoded" in r.stdout


def test_plan_and_pack(checkpoint, tmp_path):
    path, _ = checkpoint
    r = offload_cli("pack", path, tmp_path / "store")
    assert r.returncode == 0, r.stderr
    assert "packed" in r.stdout and (tmp_path / "store" / "manifest.json").is_file()
    assert "packing" in r.stderr          # the progress bar
    r = offload_cli("plan", tmp_path / "store", "--budget", "30%", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    for field in ("device", "disk", "staging", "bottleneck", "predicted per decode step"):
        assert field in r.stdout


@pytest.mark.parametrize("args,message", [
    (("plan", "{ckpt}", "--budget", "lots"), "cannot read budget 'lots'"),
    (("plan", "{ckpt}", "--budget", "1KB"), "minimum working set"),
    (("plan", "/no/such/model"), "no model at /no/such/model"),
])
def test_errors_are_one_line_without_traceback(checkpoint, args, message):
    path, _ = checkpoint
    r = offload_cli(*[a.format(ckpt=path) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bad_flag():
    r = offload_cli("run", "--budgte", "1GB")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
