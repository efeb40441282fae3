"""``offload serve``: the OpenAI-compatible server, driven by the official ``openai`` client
against a server on 127.0.0.1 over the real SmolLM2 at 40% of its weights."""
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

import offload
from offload.serve import Engine, create_app

KEY = "sk-offload-test"
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Write a haiku about disks:",
           "def fibonacci(n):"]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    import uvicorn

    path, tok, _ = smollm2
    model = offload.run(str(path), budget="40%", offload_dir=tmp_path_factory.mktemp("serve"),
                        max_tokens=4 * 128, batch=4, kv="dynamic", progress=False)
    engine = Engine(model, tok, "smollm2", max_batch=4, context=128, queue=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=KEY), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    base = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(base=base, engine=engine, model=model,
                          client=openai.OpenAI(base_url=base + "/v1", api_key=KEY,
                                               max_retries=0, timeout=120))
    srv.should_exit = True
    thread.join(timeout=30)
    engine.close()
    offload.close(model)


def _greedy(smollm2, ids: list[int], n: int) -> list[int]:
    """The resident float32 model's greedy continuation of ``ids``."""
    _, tok, model = smollm2
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, len(ids):].tolist()


def _text(tok, tokens: list[int]) -> str:
    if tokens and tokens[-1] == tok.eos_token_id:
        tokens = tokens[:-1]
    return tok.decode(tokens, skip_special_tokens=True)


def test_chat_and_completion_at_temperature_0_are_the_resident_models_tokens(server, smollm2):
    _, tok, _ = smollm2
    c = server.client
    r = c.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    ids = tok(PROMPTS[1]).input_ids
    assert r.choices[0].text == _text(tok, _greedy(smollm2, ids, 8))
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 8
    messages = [{"role": "user", "content": "Name a color."}]
    r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=8,
                                  temperature=0)
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert r.choices[0].message.content == _text(tok, _greedy(smollm2, ids, 8))
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens == len(ids)


def test_concurrent_requests_share_forwards_and_keep_their_tokens(server, smollm2):
    """Four requests at once decode together (fewer forwards than tokens) and each gets the
    tokens the resident model gives its prompt alone."""
    _, tok, _ = smollm2
    before = offload.stats(server.model)["forwards"]
    got: dict[int, str] = {}

    def ask(i):
        got[i] = server.client.completions.create(model="smollm2", prompt=PROMPTS[i],
                                                  max_tokens=12, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    forwards = offload.stats(server.model)["forwards"] - before
    assert forwards < 4 * 12, forwards      # one forward served several sequences
    for i, prompt in enumerate(PROMPTS):
        assert got[i] == _text(tok, _greedy(smollm2, tok(prompt).input_ids, 12)), i


def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch(server):
    """``seed``: a sampled request (temperature 1) with a seed gives the same text alone and
    while three unseeded requests decode beside it; another seed gives another text. The
    unseeded ones still sample (from the manager's own generator)."""
    def ask(seed, prompt=PROMPTS[2]):
        return server.client.completions.create(model="smollm2", prompt=prompt, max_tokens=24,
                                                temperature=1.0, seed=seed).choices[0].text

    alone = ask(11)
    got: dict[int, str] = {}

    def busy(i):
        got[i] = ask(None, PROMPTS[i])

    threads = [threading.Thread(target=busy, args=(i,)) for i in (0, 1, 3)]
    for t in threads:
        t.start()
    beside = ask(11)
    for t in threads:
        t.join()
    assert beside == alone and len(got) == 3
    assert ask(12) != alone and ask(13) != alone   # 24 tokens at temperature 1: two misses


def test_streaming_chat_sends_the_same_text_in_chunks(server):
    c = server.client
    messages = [{"role": "user", "content": "Count to five."}]
    full = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=10,
                                     temperature=0).choices[0].message.content
    chunks = list(c.chat.completions.create(model="smollm2", messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == full and len([d for d in deltas if d]) > 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10


def test_stop_strings_cut_the_text(server):
    r = server.client.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=12,
                                         temperature=0, stop=["7"])
    assert "7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in server.client.models.list().data] == ["smollm2"]
    assert httpx.get(server.base + "/health").json()["status"] == "ok"   # no key needed


@pytest.mark.parametrize("kw, error, says", [
    (dict(model="gpt-4"), openai.NotFoundError, "model 'gpt-4' does not exist"),
    (dict(max_tokens=500), openai.BadRequestError, "plus max_tokens (500) is"),
    (dict(logprobs=2), openai.BadRequestError, "parameter 'logprobs' is not supported"),
    (dict(n=2), openai.BadRequestError, "n must be 1"),
    (dict(temperature=3), openai.BadRequestError, "temperature=3"),
    (dict(seed=-1), openai.BadRequestError, "seed=-1"),
])
def test_bad_requests_get_openai_errors(server, kw, error, says):
    args = {"model": "smollm2", "prompt": PROMPTS[0], "max_tokens": 4, **kw}
    with pytest.raises(error) as e:
        server.client.completions.create(**args)
    assert says in str(e.value)


def test_malformed_json_is_a_400_with_an_error_body(server):
    r = httpx.post(server.base + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_client_that_leaves_mid_stream_frees_its_sequence(server):
    engine = server.engine
    cancelled = engine.metrics.cancelled
    body = {"model": "smollm2", "prompt": PROMPTS[2], "max_tokens": 100, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.base + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert json.loads(line[6:])["choices"]
                break
    deadline = time.time() + 30
    while (engine.in_flight or engine.metrics.cancelled == cancelled) \
            and time.time() < deadline:
        time.sleep(0.1)
    assert engine.metrics.cancelled == cancelled + 1 and engine.in_flight == 0


def test_requests_beyond_the_queue_get_503_and_the_rest_complete(server):
    """4 decode and 2 wait; of 9 at once, the extra ones are refused with Retry-After and every
    admitted one gets its full answer."""
    status: list[int] = []
    lengths: list[int] = []

    def ask():
        r = httpx.post(server.base + "/v1/completions", timeout=120,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "smollm2", "prompt": PROMPTS[0], "max_tokens": 16,
                             "temperature": 0.8})
        status.append(r.status_code)
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
        else:
            lengths.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=ask) for _ in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(status)) == [200, 503] and status.count(200) == 6, status
    assert all(0 < n <= 16 for n in lengths)
    metrics = httpx.get(server.base + "/metrics").text
    assert "offload_requests_rejected_total" in metrics and "offload_bytes_read_total" in metrics
    assert server.engine.in_flight == 0


def test_a_prompt_longer_than_the_context_is_refused_with_its_length(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="smollm2", prompt="word " * 400, max_tokens=4)
    assert "the prompt is" in str(e.value) and "plans 128 per sequence" in str(e.value)


def test_32_prompts_in_changing_batches_against_the_resident_model(server, smollm2):
    """32 prompts sent 6 at a time to a server that decodes 4 together: sequences join and
    leave the running batch mid-way, so each is computed beside different others than a
    left-padded batch would put it. At temperature 0 every answer must equal the resident
    model's greedy answer to its prompt alone; the count that differs is the figure README
    quotes (0 of 32 measured)."""
    _, tok, _ = smollm2
    prompts = [f"Q{i}: name one use of {w}." for i, w in enumerate(
        ["salt", "glass", "copper", "paper", "wool", "clay", "rope", "wax"] * 4)]
    got: dict[int, str] = {}

    def ask(i):
        got[i] = server.client.completions.create(model="smollm2", prompt=prompts[i],
                                                  max_tokens=8, temperature=0).choices[0].text

    for wave in range(0, 32, 6):   # 4 decode, 2 wait (the server's queue), then they join
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(wave, min(wave + 6, 32))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    differ = [i for i, p in enumerate(prompts)
              if got[i] != _text(tok, _greedy(smollm2, tok(p).input_ids, 8))]
    assert not differ, f"{len(differ)} of 32 differ: {differ}"


# -- kv="batched": the server planned for the manager's cache and forwards ------------------
def test_a_batched_plan_holds_the_managers_cache_where_a_one_shot_reserve_cannot(
        smollm2, tmp_path):
    """At 20% the server's 8 sequences x 128 positions fit as ``kv="batched"``: the reserve
    holds the manager's whole paged cache (1,024 positions) and one forward of 256 tokens,
    not a one-shot prefill of every position (which 20% cannot hold)."""
    from offload.adapters import adapter_for
    from offload.errors import BudgetError
    from offload.planner.reserve import batched_reserve
    from offload.serve import batched_options

    path = smollm2[0]
    plan = offload.plan(str(path), "20%", offload_dir=tmp_path, **batched_options(8, 128))
    assert (plan.kv.mode, plan.kv.batch, plan.kv.max_context, plan.kv.prefill_chunk,
            plan.max_tokens) == ("batched", 8, 128, 256, 1024)
    shape = adapter_for(smollm2[2].config).shape(smollm2[2].config)
    assert plan.kv.device_bytes == shape.kv_bytes(1024 + 2 * 64, 4)   # 2 pages of trash
    assert plan.reserve_bytes >= batched_reserve(shape, 4, positions=1024, chunk=256,
                                                 logits_rows=8, page=64)
    assert plan.total_bytes <= plan.budget_bytes
    assert "batched: 8 sequences x 128 positions in pages of 64, 256 tokens" in plan.table()
    with pytest.raises(BudgetError):
        offload.plan(str(path), "20%", offload_dir=tmp_path, max_tokens=1024, batch=8,
                     kv="dynamic")
    with pytest.raises(offload.OffloadError, match="needs max_context"):
        offload.plan(str(path), "20%", offload_dir=tmp_path, kv="batched")


def test_a_batched_forward_beyond_the_planned_tokens_is_refused_not_chunked(smollm2, tmp_path):
    """A forward needing more than the plan reserved for ``prefill_chunk`` tokens (64 tokens,
    or 16 with every row's logits) names the manager's setting to lower (it is the manager's batch: offload cannot cut it into chunks itself); an Engine
    asked for more sequences than the model was planned for is refused."""
    from offload.errors import BudgetError
    from offload.serve import batched_options

    path, tok, _ = smollm2
    model = offload.run(str(path), budget="30%", offload_dir=tmp_path, progress=False,
                        **{**batched_options(2, 64), "prefill_chunk": 16})
    try:
        with torch.no_grad():
            assert model(torch.arange(16)[None] + 100, logits_to_keep=1).logits.shape[1] == 1
            with pytest.raises(BudgetError, match="max_batch_tokens <= 16"):
                model(torch.arange(64)[None] + 100, logits_to_keep=1)
            with pytest.raises(BudgetError, match="16 rows of logits"):   # 2 were planned
                model(torch.arange(16)[None] + 100)
        with pytest.raises(ValueError, match="planned for 2 sequences x 64"):
            Engine(model, tok, "smollm2", max_batch=4, context=64, queue=1)
    finally:
        offload.close(model)


def test_sixteen_clients_four_requests_each_at_20_percent(tmp_path):
    """The issue's load: ``offload serve --budget 20%`` (8 sequences x 128 positions) in its
    own process, 16 clients x 4 chat requests at once: every request answered in full,
    nothing failed, and the server's measured peak under its budget."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import require_smollm2

    require_smollm2()
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, str(root / "benches" / "bench_serve.py"), "--budget",
                        "20%", "--levels", "16", "--requests", "4", "--max-tokens", "8",
                        "--work-dir", str(tmp_path / "bench"), "--json", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    result = json.loads(out.read_text())
    (level,) = result["levels"]
    assert (level["clients"], level["requests"], level["answered"]) == (16, 64, 64), level
    assert not level["failures"], level   # a short answer (not max_tokens, no stop) counts
    m = result["metrics"]
    assert 0 < m["offload_measured_peak_bytes"] <= m["offload_budget_bytes"], m
