"""MoE experts as Units: exactness, bytes, the expert cache, prediction, bad input."""
from __future__ import annotations

import json
import threading

import pytest
import torch

import offload
from conftest import MOE_FAMILIES, tiny_model, weight_bytes
from offload.errors import BudgetError, ModelError, OffloadError
from offload.units import align


def _prompts(batch: int, vocab: int = 3000, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:   # left padding on one row
        ids[1, :3] = 0
        mask[1, :3] = 0
    return ids, mask


def _reference(model, ids, mask, new_tokens=6):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0)
    return logits, tokens


def _run(model, fraction, offload_dir, **kw):
    budget = int(weight_bytes(model) * fraction)
    kw.setdefault("max_tokens", 64)
    return offload.run(model, budget=budget, offload_dir=offload_dir, **kw), budget


def _heat_run(model, offload_dir, ids, new_tokens: int):
    """Run ``model`` at 60% with its experts cached, generate ``new_tokens`` after ``ids`` and
    close it (which saves the measured heat beside the store): ``(store, budget, decode
    steps)``."""
    off, budget = _run(model, 0.6, offload_dir)
    store = off._offload_runtime.manifest.path
    with torch.no_grad():
        off.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    steps = off._offload_runtime.experts.decode_forwards
    offload.close(off)
    return store, budget, steps


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("batch", [1, 4])
def test_moe_families_bitwise_at_20_percent(family, batch, offload_dir):
    model = tiny_model(family)
    ids, mask = _prompts(batch)
    ref_logits, ref_tokens = _reference(model, ids, mask)
    off, budget = _run(model, 0.20, offload_dir, predict=True)
    plan = off._offload_runtime.plan
    assert plan.experts.mode == "cache" and plan.experts.slots >= 2
    assert all(tier == "disk" for k, tier, _ in plan.homes if k.startswith("expert."))
    assert off._offload_runtime.device_tier.allocated_bytes == (   # the plan is what is held
        plan.resident_bytes + plan.slots * plan.slot_bytes
        + plan.experts.slots * plan.experts.slot_bytes) and plan.total_bytes <= budget
    logits, tokens = _reference(off, ids, mask)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = offload.stats(off)
    assert s["accounted_peak_bytes"] <= budget
    assert s["experts"]["bytes_read"] > 0 and s["experts"]["on_demand"] > 0
    offload.close(off)


@pytest.mark.parametrize("options", [dict(experts="stream"), dict(expert_cache="lfu"),
                                     dict(predict=True),
                                     dict(predict=True, predict_depth=2, predict_width=3)])
def test_moe_options_stay_bitwise(options, offload_dir):
    model = tiny_model("mixtral", seed=3)
    ids, mask = _prompts(4)
    ref_logits, ref_tokens = _reference(model, ids, mask)
    off, budget = _run(model, 0.45, offload_dir, **options)
    plan = off._offload_runtime.plan
    if options.get("experts") == "stream":
        assert any(k.startswith("experts.") for k in plan.stream)
    logits, tokens = _reference(off, ids, mask)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert offload.stats(off)["accounted_peak_bytes"] <= budget
    offload.close(off)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_moe_bitwise(family, offload_dir):
    model = tiny_model(family, seed=14, dtype=torch.bfloat16)
    ids, mask = _prompts(4)
    ref_logits, ref_tokens = _reference(model, ids, mask, 5)
    off, _ = _run(model, 0.3, offload_dir, predict=True, batch=4, logits="all")
    logits, tokens = _reference(off, ids, mask, 5)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    offload.close(off)


def test_eager_experts_implementation_is_mirrored(offload_dir):
    model = tiny_model("olmoe", seed=2)
    model.config._experts_implementation = "eager"
    ids, mask = _prompts(4)
    ref_logits, ref_tokens = _reference(model, ids, mask)
    off, _ = _run(model, 0.20, offload_dir)
    logits, tokens = _reference(off, ids, mask)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    offload.close(off)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_expert_checkpoint_packs_exactly(family, tmp_path):
    """save_pretrained writes one tensor per expert (Mixtral's w1/w2/w3, Qwen's gate/up/down
    _proj): each expert Unit concatenates them into the fused layout."""
    model = tiny_model(family, seed=4)
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask = _prompts(1)
    ref_logits, _ = _reference(model, ids, mask, 1)
    off = offload.run(tmp_path / "ckpt", budget="25%", offload_dir=tmp_path / "off",
                      max_tokens=32)
    with torch.no_grad():
        assert torch.equal(off(input_ids=ids, attention_mask=mask).logits, ref_logits)
    offload.close(off)


def _capture_routing(model) -> tuple[dict, list]:
    chosen: dict[int, set] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            def hook(module, args, out, i=i):
                chosen.setdefault(i, set()).update(out[2].reshape(-1).tolist())
            handles.append(layer.mlp.gate.register_forward_hook(hook))
    return chosen, handles


@pytest.mark.parametrize("batch", [1, 4])
def test_expert_bytes_equal_the_selected_experts(batch, offload_dir):
    """Prediction off, cache emptied: a decode step reads exactly the experts the routers
    selected, each once per layer however many tokens of the batch chose it."""
    model = tiny_model("mixtral", seed=5)
    off, _ = _run(model, 0.6, offload_dir, predict=False)
    rt = off._offload_runtime
    ex = rt.experts
    assert ex.cache is not None and len(ex.cache.slots) >= 8 and not ex.cache.resident
    ids, _ = _prompts(batch)
    with torch.no_grad():
        out = off(input_ids=ids, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        ex.cache.clear()
        chosen, handles = _capture_routing(off)
        before, disk_before = ex.cache.stats.bytes_read, ex.disk.bytes_read
        off(input_ids=step, cache=out.past_key_values, use_cache=True)
        ex.cache.drain()
    for h in handles:
        h.remove()
    expert_bytes = align(rt.units["expert.0.0"].nbytes, 4096)
    selected = sum(len(v) for v in chosen.values()) * expert_bytes
    assert selected > 0
    assert ex.cache.stats.bytes_read - before == selected
    assert ex.disk.bytes_read - disk_before == selected        # what the disk tier really read
    assert ex.cache.stats.refetches == 0
    offload.close(off)


def test_wrong_guesses_are_counted_in_bytes(offload_dir, monkeypatch):
    model = tiny_model("qwen3_moe", seed=6)
    off, _ = _run(model, 0.6, offload_dir, predict=True)
    ex = off._offload_runtime.experts
    cache = ex.cache
    # A tiny random router rarely guesses right, and its disk is rarely idle: read every guess.
    ex.predictor.gate.min_precision, cache.idle = 0.0, None
    reads: list[tuple[int, int, bool]] = []   # (layer, expert, predicted)
    real_fetch = cache._fetch

    def fetch(key, **kw):
        slot = real_fetch(key, **kw)
        if slot is not None:
            reads.append((*key, kw.get("evict_protected") is False))   # False: a guess
        return slot

    cancelled = set()   # wrong guesses dropped before their read started: never read
    from offload.tiers.base import Ticket

    real_cancel = Ticket.cancel

    def cancel(ticket):
        ok = real_cancel(ticket)
        if ok:
            _, layer, e = ticket.key.split(".")
            cancelled.add((int(layer), int(e)))
        return ok

    monkeypatch.setattr(Ticket, "cancel", cancel)
    cache._fetch = fetch
    ids, _ = _prompts(1)
    with torch.no_grad():
        out = off(input_ids=ids, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        cache.clear()
        reads.clear()
        chosen, handles = _capture_routing(off)
        s0 = dict(vars(cache.stats))
        off(input_ids=step, cache=out.past_key_values, use_cache=True)
    for h in handles:
        h.remove()
    eb = align(off._offload_runtime.units["expert.0.0"].nbytes, 4096)
    guessed = [(l, e) for l, e, p in reads if p and (l, e) not in cancelled]
    wrong = [(l, e) for l, e in guessed if e not in chosen[l]]
    s = cache.stats
    assert guessed, "the predictor read something"
    assert s.prefetched - s0["prefetched"] == len(guessed)
    assert s.wrong_guess_bytes - s0["wrong_guess_bytes"] == len(wrong) * eb
    assert s.bytes_read - s0["bytes_read"] == (len(guessed) + len(
        [r for r in reads if not r[2]])) * eb
    on_demand = {(l, e) for l, e, p in reads if not p}
    assert on_demand == {(l, e) for l, es in chosen.items() for e in es} - set(guessed)
    st = offload.stats(off)["experts"]
    assert 0 <= st["precision"] <= 1 and 0 <= st["recall"] <= 1
    offload.close(off)


def test_cache_hits_and_stats(offload_dir):
    model = tiny_model("mixtral", seed=7)
    off, _ = _run(model, 0.6, offload_dir, predict=True)
    rt = off._offload_runtime
    assert rt.plan.experts.protected >= 1
    ids, _ = _prompts(1)
    with torch.no_grad():
        off.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    s = offload.stats(off)["experts"]
    assert s["hits"] > 0 and 0 < s["hit_rate"] <= 1
    assert s["accesses"] == s["hits"] + s["on_demand"]
    assert s["bytes_per_token"] > 0 and s["precision"] is not None
    assert "expert cache" in rt.plan.table() and "prediction depth 1" in rt.plan.table()
    offload.close(off)


def test_measured_heat_makes_hot_experts_resident(offload_dir):
    model = tiny_model("mixtral", seed=8)
    ids, _ = _prompts(1)
    with torch.no_grad():
        ref = model(ids).logits
    store, budget, _ = _heat_run(model, offload_dir, ids, 10)
    assert (store / "expert_heat.json").is_file()
    again = offload.run(store, budget=budget, max_tokens=64)
    plan = again._offload_runtime.plan
    resident = [k for k, t, _ in plan.homes if k.startswith("expert.") and t == "device"]
    assert resident, "hot experts are kept resident on the next run"
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    assert offload.stats(again)["experts"]["resident_hits"] > 0
    offload.close(again)


def test_budget_below_attention_plus_top_k_is_refused(offload_dir):
    model = tiny_model("mixtral", seed=9)
    with pytest.raises(BudgetError) as e:
        offload.run(model, budget="400KB", offload_dir=offload_dir, max_tokens=16)
    err = e.value
    assert "top-k" in str(err) and err.minimum_bytes > err.budget_bytes
    off = offload.run(model, budget=err.minimum_bytes, offload_dir=offload_dir, max_tokens=16)
    assert off._offload_runtime.plan.experts.slots == 2
    with torch.no_grad():
        off(torch.tensor([[5, 6, 7]]))
    offload.close(off)


def _io_threads(rt) -> list[threading.Thread]:
    """The I/O threads of one runtime (its transport's); other runtimes left open by other
    tests have their own."""
    return rt.transport.threads


def test_router_out_of_range_is_an_error_and_shuts_down_cleanly(offload_dir):
    model = tiny_model("mixtral", seed=10)
    ids, _ = _prompts(1)
    with torch.no_grad():
        ref = model(ids).logits
    off, _ = _run(model, 0.3, offload_dir)
    gate = off.model.layers[2].mlp.gate

    def bad_router(module, args, out):
        logits, scores, idx = out
        return logits, scores, torch.full_like(idx, 8)

    h = gate.register_forward_hook(bad_router)
    with pytest.raises(ModelError, match="router of layer 2 selected expert 8"):
        with torch.no_grad():
            off.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    h.remove()
    with torch.no_grad():          # the runtime is still usable afterwards
        assert torch.equal(off(ids).logits, ref)
    threads = _io_threads(off._offload_runtime)
    assert threads and any(t.is_alive() for t in threads)
    offload.close(off)
    assert not any(t.is_alive() for t in threads)


def test_generation_that_raises_leaves_no_threads(offload_dir, monkeypatch):
    model = tiny_model("olmoe", seed=11)
    off, _ = _run(model, 0.2, offload_dir)
    import offload.adapters.experts_compute as compute

    calls = {"n": 0}
    real = compute.FORWARDS["grouped_mm"]

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("simulated failure inside the experts")
        return real(*a, **kw)

    monkeypatch.setitem(compute.FORWARDS, "grouped_mm", flaky)
    rt = off._offload_runtime
    for i, module in rt.adapter.expert_points(off).items():   # forwards bind FORWARDS early
        module.forward = rt.experts._forward(i, module)
    with pytest.raises(RuntimeError, match="simulated"):
        with torch.no_grad():
            off.generate(_prompts(1)[0], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert all(e.pins == 0 for e in rt.experts.cache._entry.values())
    threads = _io_threads(rt)
    assert threads and any(t.is_alive() for t in threads)
    offload.close(off)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("bad, says", [
    (dict(experts="sometimes"), r"experts='sometimes': use 'cache'.*or 'stream'"),
    (dict(expert_cache="fifo"), r"expert_cache='fifo': use 'lru' or 'lfu'"),
    (dict(predict_width=9), r"predict_width=9: use an int from 1 to 8 \(default: top-k = 2\)"),
    (dict(predict_depth=0), r"predict_depth=0: use an int >= 1")])
def test_bad_expert_options(bad, says, offload_dir):
    model = tiny_model("mixtral", seed=12)
    with pytest.raises(OffloadError, match=says):
        offload.run(model, budget="50%", offload_dir=offload_dir, **bad)


def test_unmirrored_experts_implementation_is_refused(offload_dir):
    model = tiny_model("mixtral", seed=13)
    model.config._experts_implementation = "batched_mm"
    with pytest.raises(ModelError, match="grouped_mm"):
        offload.run(model, budget="50%", offload_dir=offload_dir)


MOE_RSS = """
import gc, json, sys, tempfile, torch
import offload
sys.path.insert(0, sys.argv[3])
from conftest import tiny_model
store, budget = sys.argv[1], int(sys.argv[2])
# Warm the interpreter on a tiny MoE through the same code paths, so that the growth measured
# next is the runtime's own memory (imports, kernels and allocator pools are not).
warm = offload.run(tiny_model("mixtral", hidden_size=64, num_hidden_layers=2, vocab_size=512,
                              intermediate_size=64), budget="90%", offload_dir=tempfile.mkdtemp(),
                   max_tokens=32, predict=True)
with torch.no_grad():
    warm.generate(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
offload.close(warm)
del warm
gc.collect()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")     # reset the peak RSS (VmHWM)
base = status("VmRSS")
model = offload.run(store, budget=budget, max_tokens=64, predict=True)
ids = torch.randint(3, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
print(json.dumps({"growth": status("VmHWM") - base, "stats": offload.stats(model)}))
"""


def test_rss_stays_under_budget_moe(tmp_path):
    """Cross-check the accounting with the OS: a fresh process running a Mixtral (112 MB of
    float32 weights) at 20% grows its peak RSS by no more than the budget, the first run's
    hardware profile (measured in that process, within the budget) included."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    model = tiny_model("mixtral", hidden_size=256, num_hidden_layers=4, vocab_size=4096,
                       intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)
    budget = int(weight_bytes(model) * 0.20)
    store = offload.pack(model, offload_dir=tmp_path, progress=False).path
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", MOE_RSS, str(store), str(budget), tests],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    s = r["stats"]
    assert s["accounted_peak_bytes"] <= budget
    assert s["experts"]["bytes_read"] > 0                 # it really fetched experts
    # measured: the peak RSS since run() began above its baseline (skeleton, kernels' workspaces;
    # the growth from before run() includes them and is printed beside it)
    measured = s["measured_peak_bytes"]
    print(f"measured peak {measured >> 10} KiB above a {s['baseline_bytes'] >> 10} KiB baseline "
          f"({r['growth'] >> 10} KiB from before run()), budget {budget >> 10} KiB")
    assert s["allocated_bytes"] <= measured <= budget, s


def test_cache_cancels_a_queued_wrong_guess_and_rechecks_it_later():
    """Unit test of the cache alone: a wrong guess still queued when its layer runs is dropped
    (not read, not counted, its first-read checksum still due), pinned experts are never
    evicted, and on-demand misses take room from unpinned ones."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from offload.prefetch.experts import ExpertCache
    from offload.tiers.base import Ticket
    from offload.tiers.slots import Slot
    from offload.units import TensorSpec, Unit

    gate = threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(gate.wait)              # the disk is busy until the gate opens: reads queue
    spec = (TensorSpec("gate_up", "float32", (2, 2), 0, 16),
            TensorSpec("down", "float32", (2, 1), 256, 8))
    units = {(0, e): Unit(f"expert.0.{e}", "expert", "expert", 0, 0, 264, 0, spec, expert=e)
             for e in range(4)}
    slots = [Slot(i, torch.zeros(4096, dtype=torch.uint8)) for i in range(3)]
    cancelled = []
    cache = ExpertCache(units, {}, slots, lambda u, s: Ticket(u.key, u.nbytes,
                                                              pool.submit(lambda: 0.0)),
                        lambda s, use: (s.buffer[:16].view(torch.float32), None),
                        layers=(0,), on_cancel=cancelled.append)
    cache.prefetch(0, [3])                      # a guess for layer 0, queued behind the gate
    assert cache.stats.prefetched == 1
    cache.begin(0, [0, 1])                      # layer 0 needs 0 and 1: the guess was wrong
    assert cancelled == [units[(0, 3)]] and cache.stats.cancelled == 1
    assert cache.stats.prefetched == 0 and cache.stats.wrong_guess_bytes == 0
    assert cache.stats.bytes_read == 2 * 4096   # only the two on-demand reads
    gate.set()
    cache.get(0)                                # pinned while in use
    third = cache._fetch((0, 2), evict_protected=True)          # takes the free slot
    third.ticket.wait()
    # 0 is pinned, 1 is still wanted by the running layer: only 2 may go
    assert cache._victim(evict_protected=True) is third
    cache.done(0)
    cache.end()
    pool.shutdown()


@pytest.mark.parametrize("policy, evicted", [("lru", 0), ("lfu", 1)])
def test_cache_policy_evicts_in_its_order(policy, evicted):
    """Unit test of the cache alone, three slots: expert 0 used three times, then 1, then 2
    once each; a fourth expert evicts the least recently used (0) under ``lru`` and the least
    often used, the older of a tie (1), under ``lfu``. Then, used again, the evicted one is
    read again (a miss) and the survivors hit."""
    from concurrent.futures import Future

    from offload.prefetch.experts import ExpertCache
    from offload.tiers.base import Ticket
    from offload.tiers.slots import Slot
    from offload.units import TensorSpec, Unit

    def submit(u, s):
        done = Future()
        done.set_result(0.0)
        return Ticket(u.key, u.nbytes, done)

    spec = (TensorSpec("gate_up", "float32", (2, 2), 0, 16),)
    units = {(0, e): Unit(f"expert.0.{e}", "expert", "expert", 0, 0, 16, 0, spec, expert=e)
             for e in range(4)}
    slots = [Slot(i, torch.zeros(4096, dtype=torch.uint8)) for i in range(3)]
    cache = ExpertCache(units, {}, slots, submit, lambda s, use: (s.buffer[:16], None),
                        layers=(0,), policy=policy)

    def step(*experts):
        cache.begin(0, sorted(experts))
        for e in experts:
            cache.get(e)
            cache.done(e)
        cache.end()

    for e in (0, 0, 0, 1, 2):
        step(e)
    assert cache.stats.on_demand == 3 and cache.stats.hits == 2
    step(3)
    cached = {e for (_, e) in cache._where}
    assert cached == {0, 1, 2, 3} - {evicted}, (policy, cached)
    misses = cache.stats.on_demand
    step(evicted)
    assert cache.stats.on_demand == misses + 1
    hits = cache.stats.hits
    step(3)
    assert cache.stats.hits == hits + 1


def _gated_cache(slots: int = 3):
    """An expert cache of two MoE layers x 4 experts whose reads finish at once, and a
    predictor that guesses layer 1's expert from layer 0's hidden state (a one-hot vector: the
    router of layer 1 is the identity, so the guess is the hot coordinate)."""
    from concurrent.futures import Future

    from offload.prefetch.experts import ExpertCache, Predictor
    from offload.tiers.base import Ticket
    from offload.tiers.slots import Slot
    from offload.units import TensorSpec, Unit

    def submit(u, s):
        done = Future()
        done.set_result(0.0)
        return Ticket(u.key, u.nbytes, done)

    spec = (TensorSpec("gate_up", "float32", (2, 2), 0, 16),)
    units = {(layer, e): Unit(f"expert.{layer}.{e}", "expert", "expert", layer, 0, 16, 0, spec,
                              expert=e) for layer in (0, 1) for e in range(4)}
    cache = ExpertCache(units, {}, [Slot(i, torch.zeros(4096, dtype=torch.uint8))
                                    for i in range(slots)],
                        submit, lambda s, use: (s.buffer[:16], None), layers=(0, 1))
    routers = {0: torch.eye(4), 1: torch.eye(4) * 8}
    return cache, Predictor(cache, routers, depth=1, width=1)


def _gated_step(cache, predictor, guess: int, used: int) -> None:
    """One decode step: layer 0 (expert 0) predicts ``guess`` for layer 1, which uses ``used``."""
    for layer, needed, hidden in ((0, 0, guess), (1, used, 0)):
        cache.begin(layer, [needed])
        predictor(layer, torch.nn.functional.one_hot(torch.tensor([hidden]), 4).float())
        cache.get(needed)
        cache.done(needed)
        cache.end()


def test_prediction_stops_reading_when_its_guesses_are_wrong_and_resumes_when_right():
    """The read gate: a predictor that is always wrong has one guess read (before anything is
    known), then none while it stays wrong, each guess still scored; once its guesses turn
    right, its reads resume and every one of them is used."""
    cache, predictor = _gated_cache()
    for step in range(1, 21):
        _gated_step(cache, predictor, guess=(step + 1) % 4, used=step % 4)
    assert cache.stats.prefetched == 1, "reads after the first wrong guess was scored"
    assert predictor.gate.withheld == 19 and not predictor.gate.open(0)
    # layer 0's expert once, then every layer-1 use but step 2's (step 1's wrong read of it)
    assert cache.stats.on_demand == 1 + 19
    before = cache.stats.prefetched
    for step in range(21, 41):
        _gated_step(cache, predictor, guess=step % 4, used=step % 4)
    # right guesses are scored while the rank is closed, until its share of right ones is
    # back at 0.5 (from 0.5 * (15/16)^20: 9 of them); every later guess is read, and used
    assert predictor.gate.withheld == 19 + 9 and predictor.gate.open(0)
    assert cache.stats.prefetched - before == 20 - 9
    assert cache.stats.tp == 20 - 9 and cache.stats.fp == 1
    assert cache.stats.wrong_guess_bytes == 4096   # the one wrong read, before the gate knew


def test_prediction_that_is_always_right_reads_every_guess():
    cache, predictor = _gated_cache()
    for step in range(1, 21):
        _gated_step(cache, predictor, guess=step % 4, used=step % 4)
    assert cache.stats.prefetched == 20 and predictor.gate.withheld == 0
    assert cache.stats.on_demand == 1     # layer 0's expert; layer 1's were all read ahead
    assert cache.stats.tp == 20 and cache.stats.fp == 0
    assert predictor.gate.stats()["precision_by_rank"][0] > 0.85   # 1 - 0.5 * (15/16)^20


def test_read_arbiter_keeps_the_arm_whose_steps_stall_less():
    """Reads on and off alternate while exploring; after it, the arm with the lower measured
    stall runs until the next exploration, which can reverse the choice."""
    from offload.prefetch.experts import ReadArbiter

    arb = ReadArbiter(explore=4, exploit=6, alpha=0.5, margin=0.1)
    seen = []
    for _ in range(10):                          # reads cost: 0.3 s a step on, 0.1 off
        seen.append(arb.arm())
        arb.observe(0.3 if seen[-1] else 0.1)
    assert seen == [True, True, False, False] + [False] * 6
    assert arb.reads is False and arb.switches == 1
    for _ in range(10):                          # now reads pay: 0.05 on, 0.2 off
        on = arb.arm()
        arb.observe(0.05 if on else 0.2)
    assert arb.reads is True and arb.switches == 2
    st = arb.stats()
    assert st["stall_per_step_reads_on"] < st["stall_per_step_reads_off"]


def test_runtime_feeds_each_decode_steps_stall_to_the_arbiter(offload_dir):
    model = tiny_model("mixtral", seed=3)
    off, _ = _run(model, 0.6, offload_dir, predict=True)
    ids, _ = _prompts(1)
    off.generate(ids, max_new_tokens=5, do_sample=False)
    arb = off._offload_runtime.experts.predictor.arbiter
    assert arb.steps == 4    # the decode steps (the first token comes from prefill)
    st = offload.stats(off)["experts"]["prediction_arbiter"]
    assert st["decode_steps"] == 4 and st["stall_per_step_reads_off"] is not None
    offload.close(off)


def test_heat_is_kept_per_token_whatever_batch_measured_it(offload_dir, tmp_path):
    """A run saves the share of decode steps that used each expert and its steps' batch; the
    next plan reads a token's share back (a step of b sequences used an expert with share s:
    1 - (1 - s) ** (1 / b)), an expert used in every step counted as used in all but half a
    step (else a batch's share could not be inverted)."""
    from offload.store.heat import load_heat, save_heat

    save_heat(tmp_path, 10, {"expert.0.1": 0.75, "expert.0.2": 1.0}, batch=2.0)
    heat = load_heat(tmp_path)
    assert heat["expert.0.1"] == pytest.approx(0.5)                 # 1 - 0.25 ** (1/2)
    assert heat["expert.0.2"] == pytest.approx(1 - 0.05 ** 0.5)     # 1 - 1/(2 x 10) steps
    model = tiny_model("mixtral", seed=8)
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    store, _, _ = _heat_run(model, offload_dir, ids, 10)
    saved = json.loads((store / "expert_heat.json").read_text())
    assert saved["batch"] == 2 and saved["decode_steps"] >= 8


def test_a_run_keeps_the_experts_each_decode_step_used_and_the_next_plan_replays_them(
        offload_dir):
    """The heat file keeps, per MoE layer, the experts each decode step used, in order (at
    most ``TRACE_STEPS``); the next plan at the same batch replays its cache's share over them
    (``from_trace``: the bytes a step reads predicted from it); at another batch it
    falls back to the shares (a batch of 3 reuses experts otherwise than one)."""
    from offload.planner.experts import _step_reads, step_rates
    from offload.prefetch.experts import TRACE_STEPS
    from offload.store.heat import load_heat

    model = tiny_model("mixtral", seed=8)
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(0))
    store, budget, steps = _heat_run(model, offload_dir, ids, 12)
    heat = load_heat(store)
    top_k, layers = model.config.num_experts_per_tok, model.config.num_hidden_layers
    assert heat.trace is not None and sorted(heat.trace) == list(range(layers))
    for used in heat.trace.values():
        assert len(used) == min(steps, TRACE_STEPS)
        assert all(len(step) == top_k and len(set(step)) == top_k for step in used)
    again = offload.run(store, budget=budget, max_tokens=64)
    plan, units = again._offload_runtime.plan, again._offload_runtime.manifest.units
    offload.close(again)
    ex = plan.experts
    assert ex.from_trace
    experts = [u for u in units if u.kind == "expert"]
    resident = {k for k, t, _ in plan.homes if k.startswith("expert.") and t == "device"}
    rates = step_rates(experts, heat, top_k / model.config.num_local_experts, 1)
    reads = _step_reads(experts, resident, ex.slots, rates, top_k, layers, heat.trace)
    assert ex.bytes_per_step == int(reads * ex.slot_bytes)
    other = offload.plan(store, budget=budget, max_tokens=64, batch=3)
    assert other.experts.from_heat is False and other.experts.from_trace is False


def test_trace_replay_sees_reuse_that_shares_alone_cannot():
    """An LRU share replayed over recorded steps, hand arithmetic: three experts in a round
    robin with two slots miss every step (LRU's worst case), with three none; the same three
    each used three steps running with one slot miss once per run of three. Shares alone
    (each expert a third of the steps, ``lru_misses``) predict a third and two thirds."""
    from offload.planner.experts import lru_misses, trace_misses

    cycle = [[0], [1], [2]] * 4
    assert trace_misses(cycle, 2) == 1.0
    assert trace_misses(cycle, 3) == 0.0
    assert trace_misses(cycle, 2.5) == pytest.approx(0.5)   # between its neighbours
    runs = [[0]] * 3 + [[1]] * 3 + [[2]] * 3
    assert trace_misses(runs, 1) == pytest.approx(1 / 3)
    assert trace_misses(runs, 1, resident=frozenset({2})) == pytest.approx(2 / 9)
    assert lru_misses([1 / 3] * 3, 2) == pytest.approx(1 / 3)
    assert lru_misses([1 / 3] * 3, 1) == pytest.approx(2 / 3)
