"""The summary ``run`` and ``chat`` print when they end: placement, speed, I/O, memory measured
beside the budget, and where the start-up's seconds went."""
from __future__ import annotations

from ..sizes import format_bytes


def summary(runtime, timings: dict, first_token=(None, None), pack=(None, 0, False)) -> str:
    s = runtime.stats()
    plan = runtime.plan
    rows = [
        ("placement", _placement_line(plan, s)),
        ("tokens/s", f"{s['tokens_per_s']:.2f} ({s['decode_tokens']} tokens decoded, "
                     f"{s['prefill_tokens']} prefilled)"),
        ("vs the plan", _prediction_line(s)),
        ("I/O stall", f"{s['stall_seconds']:.2f} s of {s['forward_seconds']:.2f} s in forward; "
                      f"overlap {s['overlap'] * 100:.0f}%"),
        ("read from disk", f"{format_bytes(s['bytes_read']['disk'])} "
                           f"({'O_DIRECT' if s['direct_io'] else 'buffered'})"),
        ("peak memory", _memory_line(s, *pack)),
        ("compute", "fast: " + f"{plan.fused_tensors} quantized weights multiplied from their "
                    "GGUF blocks (lossy: 8-bit activations)" if plan.compute == "fast" else
                    "exact (bitwise transformers' float32 model)"),
        ("start-up", _startup_line(timings, *first_token, pack[2])),
    ]
    kv = s.get("kv")
    if kv:
        rows.insert(3, ("KV cache", f"paged: {format_bytes(kv['device_bytes'])} in memory, "
                                    f"{format_bytes(kv['disk_bytes'])} spilled to disk, "
                                    f"{format_bytes(kv['bytes_read'])} read back, stall "
                                    f"{kv['stall_seconds']:.2f} s"))
    ex = s.get("experts")
    if ex and ex.get("mode") == "cache":
        guess = ("" if ex["precision"] is None else
                 f"; prediction precision {ex['precision'] * 100:.0f}%, recall "
                 f"{ex['recall'] * 100:.0f}%, {format_bytes(ex['wrong_guess_bytes'])} "
                 "of wrong guesses")
        rows.insert(3, ("experts", f"hit rate {(ex['hit_rate'] or 0) * 100:.0f}% of "
                                   f"{ex['accesses']} fetches needed, {ex['on_demand']} "
                                   f"on demand, {format_bytes(ex['bytes_per_token'] or 0)} "
                                   f"per token{guess}"))
    elif ex:
        rows.insert(3, ("experts", "streamed with their layers (every expert, every pass)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _placement_line(plan, s: dict) -> str:
    parts = []
    for tier in ("device", "host", "disk"):
        if any(t == tier for _, t, _ in plan.homes):
            part = f"{tier} {format_bytes(sum(n for _, t, n in plan.homes if t == tier))}"
            if tier == "device" and s.get("held_bytes"):
                part += (f" ({format_bytes(s['held_bytes'])} of it {len(plan.held)} Units as "
                         "stored, decoded at each use)")
            parts.append(part)
    return ", ".join(parts)


def _prediction_line(s: dict) -> str:
    """The plan's prediction per decode step beside what was measured."""
    p, m = s["predicted"], s["measured"]
    step = m["seconds_per_step"]
    measured = (f"measured {step * 1000:.1f} ms per decode step" if step is not None
                else "no decode step measured")
    per_forward = ("" if m["bytes_per_forward"] is None else
                   f"; {format_bytes(m['bytes_per_forward'])} read and "
                   f"{m['stall_per_forward'] * 1000:.1f} ms stalled per forward, predicted "
                   f"{format_bytes(p['bytes_per_step'])}")
    return (f"predicted {p['seconds_per_step'] * 1000:.1f} ms per decode step "
            f"({p['bottleneck']}-bound), {measured}{per_forward}")


def _startup_line(timings: dict, first_token_s: float | None, first_token_at: float | None,
                  packed: bool) -> str:
    """Seconds from the process's start to the first token, and their parts."""
    parts = ", ".join(f"{name} {timings[name]:.2f} s"
                      + (" (packed now)" if name == "store" and packed else "")
                      for name in ("imports", "code", "store", "tokenizer", "plan+load")
                      if name in timings)
    if first_token_at is None:
        return parts
    return (f"first token {first_token_at:.2f} s after the process started: {parts}, "
            f"generate to first token {first_token_s:.2f} s")


def _memory_line(s: dict, pack_peak, interpreter: int, packed: bool = False) -> str:
    """Measured peaks beside the budget: the run's (RSS above the process at ``run``'s start,
    or the CUDA allocator's), the store check or pack's (above the interpreter), and the
    runtime's own accounting."""
    budget, measured = s["budget_bytes"], s["measured_peak_bytes"]
    line = (f"{format_bytes(measured)} measured ({measured / budget * 100:.1f}% of the "
            f"{format_bytes(budget)} budget; above the {format_bytes(s['baseline_bytes'])} the "
            "process held when the run began)" if measured is not None else
            f"not measurable here; budget {format_bytes(budget)}")
    if pack_peak is not None:
        line += (f"; {'packing' if packed else 'checking'} the store: "
                 f"{format_bytes(pack_peak)} above the interpreter's {format_bytes(interpreter)}")
    return line + f"; accounted {format_bytes(s['accounted_peak_bytes'])}"
