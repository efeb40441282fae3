"""``offload run`` and ``offload chat``: text in, text out, a summary of where the bytes and
seconds went."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import OffloadError
from .checks import tokenizer_source
from .report import summary

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


class Session:
    """A model made by ``offload.run`` for the command line: the store packed or reused (its
    peak measured above the interpreter), the tokenizer found before that, the runtime, the
    generation settings; ``close`` prints the summary."""

    def __init__(self, args, model_path: Path):
        import torch

        from .. import api
        from ..memory import PeakMeter
        from .warmup import load_code

        self.args, self.timings = args, {"imports": args.imports_s}
        self.started = time.time() - args.imports_s   # the process's start
        t0 = time.perf_counter()
        tok_path = tokenizer_source(model_path, args.tokenizer)   # before anything is packed
        load_code(model_path)
        self.timings["code"] = time.perf_counter() - t0
        meter = PeakMeter(torch.device("cpu"))   # the interpreter, before the store is packed
        meter.start()
        t0 = time.perf_counter()
        self.prep = api.prepare(model_path, offload_dir=args.offload_dir)
        self.pack = (meter.peak(), meter.baseline, self.prep.packed)
        self.timings["store"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.tok = load_tokenizer(tok_path, self.prep)
        self.timings["tokenizer"] = time.perf_counter() - t0
        self.runtime = None
        self.first_token_s: float | None = None   # from generate() to the first new token
        self.first_token_at: float | None = None  # from the process's start

    def start(self, *, max_tokens: int | None, batch: int, **kv) -> None:
        """Plan and load the model for ``batch`` sequences and ``max_tokens`` positions
        (``None``: sized from --max-context, else the default); ``kv``: KV options that
        replace the flags' (``offload serve``'s)."""
        from .. import api

        args = self.args
        t0 = time.perf_counter()
        self.model = api.run_prepared(self.prep, args.budget, api.Request.of(dict(
            device=args.device, host_budget=args.host_budget, prefetch=args.prefetch,
            max_tokens=max_tokens, experts=args.experts, predict=args.predict,
            predict_depth=args.predict_depth, predict_width=args.predict_width,
            expert_cache=args.expert_cache, compute=args.compute,
            **{"kv": args.kv, "max_context": args.max_context, "batch": batch, **kv})))
        self.timings["plan+load"] = time.perf_counter() - t0
        self.runtime = api.runtime_of(self.model)

    def generate(self, ids, mask, *, cache=None, stream: bool):
        """Generate for ``ids``; returns (new ids per row, the cache holding the context)."""
        import torch
        from transformers import TextStreamer

        a, tok = self.args, self.tok
        streamer = _FirstToken(self, TextStreamer(tok, skip_prompt=True,
                                                  skip_special_tokens=True)) if stream else None
        sampling = dict(do_sample=False)
        if a.temperature > 0:
            sampling = dict(do_sample=True, temperature=a.temperature, top_p=a.top_p or 1.0,
                            top_k=a.top_k or 0)
            if a.seed is not None:
                torch.manual_seed(a.seed)
        device = self.runtime.device
        name = self.runtime.cache_argument
        kwargs = {} if cache is None else {name: cache}
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=a.max_new_tokens, streamer=streamer,
                                      pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                                      **sampling, **kwargs)
        cache = out[name] if name in out.keys() else None
        return out.sequences[:, ids.shape[1]:].cpu(), cache

    def close(self) -> None:
        from .. import api

        if self.runtime is None:
            return
        print()
        print(summary(self.runtime, self.timings, (self.first_token_s, self.first_token_at),
                      self.pack))
        api.close(self.model)


class _FirstToken:
    """A streamer that notes when the first new token arrives (the user's wait), then passes
    everything on."""

    def __init__(self, session: Session, inner):
        self.session, self.inner, self.prompt_seen = session, inner, False
        self.t0 = time.perf_counter()

    def put(self, value):
        if self.prompt_seen and self.session.first_token_s is None:
            self.session.first_token_s = time.perf_counter() - self.t0
            self.session.first_token_at = time.time() - self.session.started
        self.prompt_seen = True
        self.inner.put(value)

    def end(self):
        self.inner.end()


def load_tokenizer(path: Path, prep):
    """The tokenizer at ``path`` (``tokenizer_source``), padding on the left for a batch. A
    GGUF's vocabulary is saved beside the store when it is packed: later runs load that."""
    from .. import api

    saved = prep.manifest.path / "tokenizer"
    tok = api.tokenizer(saved if path.suffix == ".gguf" and saved.is_dir() else path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def read_prompts(args) -> list[str]:
    if args.prompts is not None:
        try:
            lines = [ln.strip() for ln in args.prompts.read_text().splitlines()]
        except OSError as e:
            raise OffloadError(f"cannot read --prompts {args.prompts}: {e.strerror}") from e
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise OffloadError(f"--prompts {args.prompts} holds no prompt (one per line)")
        return prompts
    return [args.prompt or DEFAULT_PROMPT]


def encode(tok, prompts: list[str], *, chat: bool):
    if chat and getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts]
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return tok(prompts, return_tensors="pt", padding=True)


def cmd_run(args, model_path: Path) -> int:
    prompts = read_prompts(args)
    session = Session(args, model_path)
    try:
        batch = encode(session.tok, prompts, chat=not args.no_chat)
        n_batch, n_prompt = batch["input_ids"].shape
        if args.max_context is not None and args.max_context < n_prompt + args.max_new_tokens:
            raise OffloadError(f"--max-context {args.max_context} is shorter than the prompt "
                               f"({n_prompt} tokens) plus --max-new-tokens "
                               f"{args.max_new_tokens}")
        # the reserve sized for this run: every sequence's prompt and new tokens
        session.start(max_tokens=None if args.max_context is not None else
                      n_batch * (n_prompt + args.max_new_tokens), batch=n_batch)
        new, _ = session.generate(batch["input_ids"], batch["attention_mask"],
                                  stream=n_batch == 1)
        if n_batch > 1:
            for i, row in enumerate(new):
                text = session.tok.decode(row, skip_special_tokens=True).strip()
                print(f"--- [{i}] {prompts[i]}\n{text}")
    finally:
        session.close()
    return 0


def cmd_chat(args, model_path: Path) -> int:
    """One user turn per input line. The conversation's tokens and KV cache are kept between
    turns: each turn prefills only what the cache does not hold (``Conversation``)."""
    session = Session(args, model_path)
    session.start(max_tokens=None, batch=1)   # sized from --max-context
    conversation = Conversation(session, args.system, chat=not args.no_chat)
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                break
            text = line.strip()
            if text == "/reset":
                conversation.reset()
                print("(conversation reset)", file=sys.stderr)
            elif text:
                try:
                    conversation.turn(text)
                except OffloadError as e:   # this turn fails; the conversation goes on
                    print(f"offload: error: {e}", file=sys.stderr)
    finally:
        session.close()
    return 0


class Conversation:
    """The messages, the tokens the KV cache holds, and the cache, across turns."""

    def __init__(self, session: Session, system: str | None, *, chat: bool):
        self.session, self.chat, self.system = session, chat, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = []   # every token of the conversation so far
        self.cache = None
        self.turns = 0

    def turn(self, text: str) -> None:
        import torch

        s, tok = self.session, self.session.tok
        ids = self._continue(text)
        limit = s.args.max_context
        if limit is not None and len(ids) + s.args.max_new_tokens > limit:
            raise OffloadError(f"this turn would reach {len(ids) + s.args.max_new_tokens} "
                               f"positions, over --max-context {limit}: /reset to start over")
        held = self._held(ids)
        t = torch.tensor([ids])
        new, self.cache = s.generate(t, torch.ones_like(t), cache=self.cache, stream=True)
        new = new[0].tolist()
        self.ids = ids + new
        reply = tok.decode(new, skip_special_tokens=True).strip()
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": reply}]
        self.turns += 1
        print(f"\n[turn {self.turns}: {len(ids) - held} prompt tokens prefilled, {held} "
              f"reused from the KV cache]", file=sys.stderr)

    def _continue(self, text: str) -> list[int]:
        """The conversation's tokens with the user's new turn: the tokens so far (the ones
        generated included, as generated) and the chat template's text for the new turn."""
        tok = self.session.tok
        if not (self.chat and getattr(tok, "chat_template", None)):
            return self.ids + tok(("\n" if self.ids else "") + text,
                                  add_special_tokens=not self.ids)["input_ids"]
        full = tok.apply_chat_template([*self.messages, {"role": "user", "content": text}],
                                       tokenize=False, add_generation_prompt=True)
        so_far = tok.decode(self.ids, skip_special_tokens=False)
        if self.ids and full.startswith(so_far):
            return self.ids + tok(full[len(so_far):], add_special_tokens=False)["input_ids"]
        return tok(full, add_special_tokens=False)["input_ids"]   # _held crops what differs

    def _held(self, ids: list[int]) -> int:
        """Positions of ``ids`` the cache holds: their common prefix with the cached tokens,
        the cache cropped to it; at least one token is left to feed."""
        if self.cache is None:
            return 0
        cached = int(self.cache.get_seq_length())
        same = 0
        for a, b in zip(ids[:cached], self.ids[:cached]):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)
        if same < cached:
            self.cache.crop(same - cached)   # a count to drop: every transformers takes it
        return same
