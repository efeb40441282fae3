"""``offload serve``: an OpenAI-compatible HTTP server over one offloaded model.

Concurrent requests share one stream of the weights: transformers' continuous-batching manager
(``init_continuous_batching``) runs on the offloaded model, so each step is one forward, one
pass over the weights, for every active sequence; a request that arrives while others decode
joins at the next step, a finished one leaves, and its KV blocks are freed. offload adds what
an offloaded model needs around it: the number of sequences and their context are planned
inside the budget (``kv="batched"``: the manager's paged cache for ``max_batch x context``
positions and its largest forward, ``max_batch_tokens`` tokens of all sequences together);
requests beyond the running batch wait in a bounded queue, and beyond it get 503 with
``Retry-After``; a client that disconnects has its request cancelled at the next step.

Why transformers' manager rather than a scheduler of our own: it already keeps a paged KV cache
per request, joins and retires sequences between steps, and applies per-request temperature and
top-p; on the offloaded model it decodes the same tokens as the resident model (tested), and
every forward it issues goes through offload's streaming like any other.

HTTP: FastAPI on uvicorn. Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Errors are OpenAI's JSON
shape (``{"error": {"message", "type", "param", "code"}}``) with 4xx codes for bad requests.
"""

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field

GREEDY = 1e-5   # temperature 0: the manager only samples; at this temperature a sample is the
#                 argmax unless two logits lie within about 1e-4
PAGE = 64              # KV positions per block of the request caches
DEFAULT_CONTEXT = 1024  # positions per sequence unless --max-context says otherwise
MAX_BATCH_TOKENS = 256  # tokens per forward (prompts are prefilled in chunks of at most this)
SUPPORTED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens",
             "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user"}
# Accepted when they ask for nothing (their OpenAI default), refused otherwise, by name.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "top_logprobs": None,
           "logit_bias": None, "tools": None, "tool_choice": None, "response_format": None,
           "echo": False, "best_of": 1, "suffix": None, "parallel_tool_calls": None}


class RequestError(Exception):
    """A bad request: answered with ``status`` and OpenAI's error JSON."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Metrics:
    """Counters for ``/metrics``."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.time)
    recent: list = field(default_factory=list)   # (time, tokens) of the last minute


@dataclass
class Params:
    """One request's generation settings, checked."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    include_usage: bool
    seed: int | None = None


class Engine:
    """The model, its tokenizer and the continuous-batching manager running on it.

    Args:
        model: an offloaded model (``offload.run``) planned for ``max_batch`` sequences of
            ``context`` positions: with ``kv="batched"`` (``batched_options``), whose plan
            also sets the tokens per forward, or a dynamic plan holding them all.
        tokenizer: its tokenizer.
        name: the model name clients use (``GET /v1/models``).
        max_batch: sequences decoded together.
        context: the longest sequence (prompt + new tokens) a request may have.
        queue: requests that may wait beyond the running batch (more get 503).
        seed: the sampling generator's seed.
    """

    def __init__(self, model, tokenizer, name: str, *, max_batch: int, context: int,
                 queue: int, seed: int = 0):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model, self.tok, self.name = model, tokenizer, name
        self.max_batch, self.context, self.queue = max_batch, context, queue
        self.metrics = Metrics()
        self.in_flight = 0
        self._lock = threading.Lock()
        eos = tokenizer.eos_token_id
        # temperature and top_p not at their neutral values, so per-request ones apply
        gen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
                               max_new_tokens=context, eos_token_id=eos,
                               pad_token_id=eos if tokenizer.pad_token_id is None
                               else tokenizer.pad_token_id)
        cb = ContinuousBatchingConfig(
            page_size=PAGE, num_blocks=max_batch * math.ceil(context / PAGE),
            max_batch_tokens=_tokens_per_forward(model, max_batch, context),
            max_requests_per_batch=max_batch,
            use_cuda_graph=False, per_request_processors=True, seed=seed)
        self.manager = model.init_continuous_batching(generation_config=gen,
                                                      continuous_batching_config=cb)
        self.seeded = SeededSampling(self.manager)
        self.manager.start()

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)

    # -- requests ------------------------------------------------------------------------------
    def params(self, body: dict, chat: bool) -> Params:
        """Check a request's JSON before any work; raise ``RequestError`` naming the problem."""
        unknown = [k for k in body if k not in SUPPORTED and k not in NEUTRAL]
        asked = [k for k in body if k in NEUTRAL and body[k] not in (NEUTRAL[k], None)]
        if unknown or asked:
            bad = (unknown + asked)[0]
            raise RequestError(f"parameter '{bad}' is not supported by offload serve "
                               f"(supported: {', '.join(sorted(SUPPORTED))})", param=bad,
                               code="unsupported_parameter")
        model = body.get("model")
        if model is not None and model != self.name:
            raise RequestError(f"model '{model}' does not exist: this server serves "
                               f"'{self.name}'", status=404, param="model",
                               code="model_not_found")
        if body.get("n", 1) != 1:
            raise RequestError("n must be 1: one completion per request", param="n")
        ids = self._prompt_ids(body, chat)
        if len(ids) >= self.context:
            raise RequestError(
                f"the prompt is {len(ids)} tokens, this server plans {self.context} per "
                "sequence (prompt + new tokens): shorten it, or restart the server with a "
                "larger --max-context", param="messages" if chat else "prompt",
                code="context_length_exceeded")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.context - len(ids)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"max_tokens={max_tokens!r}: use an integer >= 1",
                               param="max_tokens")
        if len(ids) + max_tokens > self.context:
            raise RequestError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is "
                f"{len(ids) + max_tokens} tokens, more than the {self.context} this server "
                f"planned per sequence: shorten the prompt, lower max_tokens, or restart the "
                f"server with a larger --max-context", param="max_tokens",
                code="context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise RequestError("top_p must be > 0", param="top_p")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
                and len(stop) <= 4):
            raise RequestError("stop: a string or a list of up to 4 non-empty strings",
                               param="stop")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not 0 <= seed < 2 ** 63):
            raise RequestError(f"seed={seed!r}: use an integer from 0 to 2**63 - 1",
                               param="seed")
        if seed is not None and not self.seeded.supported:
            raise RequestError("parameter 'seed' is not supported with this transformers "
                               "version's batching manager (its sampling step was not found)",
                               param="seed", code="unsupported_parameter")
        stream = bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        return Params(ids, max_tokens, temperature, top_p, stop, stream,
                      bool(opts.get("include_usage")) if isinstance(opts, dict) else False,
                      seed)

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str)
                    and m.get("role") in ("system", "user", "assistant") for m in messages):
                raise RequestError("messages: a non-empty list of {role: system|user|"
                                   "assistant, content: string}", param="messages")
            msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
            if getattr(self.tok, "chat_template", None):
                ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            else:
                ids = self.tok("\n".join(m["content"] for m in msgs)).input_ids
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError("prompt: a non-empty string", param="prompt")
            ids = self.tok(prompt).input_ids
        return list(ids)

    def admit(self) -> None:
        """Take a place among the running and waiting requests, or refuse with 503."""
        with self._lock:
            if self.in_flight >= self.max_batch + self.queue:
                self.metrics.rejected += 1
                raise RequestError(
                    f"the server is full: {self.max_batch} sequences decoding and "
                    f"{self.queue} waiting; retry shortly", status=503,
                    kind="server_overloaded", code="server_busy",
                    headers={"Retry-After": "1"})
            self.in_flight += 1
            self.metrics.requests += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    async def tokens(self, p: Params):
        """Yield ``(new token ids so far, finished)`` as the manager produces them; a
        generator closed early (a client gone) cancels its request."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        rid = f"req-{uuid.uuid4().hex}"
        if p.seed is not None:
            self.seeded.add(rid, p.seed)
        self.manager.register_result_handler(rid, out.put_nowait)
        added = await loop.run_in_executor(None, lambda: self.manager.add_request(
            p.ids, request_id=rid, max_new_tokens=p.max_tokens, streaming=True,
            temperature=max(p.temperature, GREEDY), top_p=p.top_p))
        if added is None:   # the manager stopped (the server is shutting down) or failed
            raise RequestError("the model is not accepting requests (shutting down)",
                               status=503, kind="server_overloaded", code="unavailable",
                               headers={"Retry-After": "5"})
        finished, seen = False, 0
        try:
            while not finished:
                result = await out.get()
                if result.error:
                    raise RuntimeError(f"generation failed: {result.error}")
                finished = result.is_finished()
                tokens = list(result.generated_tokens)
                self.tick(len(tokens) - seen)
                seen = len(tokens)
                yield tokens, finished
        finally:
            self.seeded.forget(rid)
            if not finished:
                self.manager.cancel_request(rid)
                self.metrics.cancelled += 1

    def count(self, prompt: int, completion: int) -> None:
        m = self.metrics
        m.prompt_tokens += prompt
        m.completion_tokens += completion
        m.finished += 1

    def tick(self, tokens: int) -> None:
        now = time.time()
        r = self.metrics.recent
        r.append((now, tokens))
        while r and r[0][0] < now - 60:
            r.pop(0)

    def prometheus(self) -> str:
        """``/metrics``: requests, tokens, batch, queue, throughput, offload's I/O."""
        from . import api

        m, st = self.metrics, api.stats(self.model)
        now = time.time()
        window = [t for t in m.recent if t[0] >= now - 60]
        span = max(1e-9, now - window[0][0]) if window else 1.0
        running = min(self.in_flight, self.max_batch)
        rows = [
            ("offload_requests_total", "counter", "requests admitted", m.requests),
            ("offload_requests_finished_total", "counter", "requests answered in full",
             m.finished),
            ("offload_requests_cancelled_total", "counter",
             "requests ended early (client gone, or a stop string reached)",
             m.cancelled),
            ("offload_requests_rejected_total", "counter", "requests refused with 503",
             m.rejected),
            ("offload_prompt_tokens_total", "counter", "prompt tokens", m.prompt_tokens),
            ("offload_completion_tokens_total", "counter", "generated tokens",
             m.completion_tokens),
            ("offload_batch_size", "gauge", "sequences decoding now", running),
            ("offload_queue_depth", "gauge", "requests waiting for a place",
             max(0, self.in_flight - self.max_batch)),
            ("offload_tokens_per_second", "gauge", "generated tokens a second, last minute",
             sum(t for _, t in window) / span if window else 0.0),
            ("offload_bytes_read_total", "counter", "bytes offload read from disk",
             (st.get("bytes_read") or {}).get("disk", 0)),
            ("offload_stall_seconds_total", "counter", "seconds compute waited for reads",
             st.get("stall_seconds", 0.0)),
            ("offload_budget_bytes", "gauge", "the memory budget", st.get("budget_bytes", 0)),
            ("offload_measured_peak_bytes", "gauge",
             "measured peak memory above the interpreter's baseline (CPU: resident set)",
             st.get("measured_peak_bytes") or 0),
        ]
        lines = []
        for name, kind, text, value in rows:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class SeededSampling:
    """Per-request ``seed``: transformers' manager samples every sequence of a step with one
    ``torch.multinomial`` on the global generator, so a request's tokens would depend on what
    else ran. This replaces the manager's sampling step (on its ``ModelRunner``, when the
    manager builds it): the rows of requests that gave a seed draw from their own generator,
    seeded once, one draw per step, so the same prompt, settings and seed give the same
    tokens whatever shares its batches (up to the last bits of logits that batching changes,
    which move a draw only where it lands on a boundary between two tokens). The others draw
    as before. Rows map to requests through the order the manager lists each step's
    requests in (``req_id_to_new_token_position``, the order of its logits rows)."""

    def __init__(self, manager):
        self._generators: dict[str, "torch.Generator"] = {}
        self._lock = threading.Lock()
        create = getattr(manager, "_create_batch_processor", None)
        self.supported = create is not None   # False: a transformers this was not built for
        if create is None:
            return

        def create_and_patch():
            processor = create()
            self._install(processor.model_runner)
            return processor

        manager._create_batch_processor = create_and_patch

    def add(self, rid: str, seed: int) -> None:
        import torch

        g = torch.Generator()
        g.manual_seed(seed)
        with self._lock:
            self._generators[rid] = g

    def forget(self, rid: str) -> None:
        with self._lock:
            self._generators.pop(rid, None)

    def _install(self, runner) -> None:
        import torch

        sample = getattr(runner, "_sample", None)
        if sample is None or getattr(runner, "return_logprobs", True) or not hasattr(
                getattr(runner, "inputs_and_outputs", None), "req_id_to_new_token_position"):
            self.supported = False   # seeds are refused from here on
            return

        def seeded(scores, output_ids):
            rids = list(runner.inputs_and_outputs.req_id_to_new_token_position)
            with self._lock:
                own = {i: self._generators[r] for i, r in enumerate(rids)
                       if r in self._generators}
            if not own or not runner.do_sample or len(rids) != scores.shape[1]:
                return sample(scores, output_ids)
            probs = torch.nn.functional.softmax(scores[0], dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(-1)
            for i, g in own.items():
                tokens[i] = torch.multinomial(probs[i], num_samples=1, generator=g)[0]
            output_ids[0, :tokens.numel()].copy_(tokens)

        runner._sample = seeded


def batched_options(max_batch: int, context: int) -> dict:
    """``offload.run`` options planning a model for this server: the manager's paged cache
    of ``max_batch`` sequences of ``context`` positions and forwards of
    ``MAX_BATCH_TOKENS`` tokens (fewer where the context is shorter)."""
    return dict(kv="batched", max_context=context, batch=max_batch, kv_block=PAGE,
                prefill_chunk=max(max_batch, min(MAX_BATCH_TOKENS, max_batch * context)))


def _tokens_per_forward(model, max_batch: int, context: int) -> int:
    """The manager's ``max_batch_tokens``: the plan's under ``kv="batched"`` (checked against
    what the server is asked to hold), else a dynamic plan's prefill chunk, or the context
    where it reserved a one-shot prefill of it all."""
    from . import api

    kv = api.runtime_of(model).plan.kv
    if kv.mode != "batched":
        return kv.prefill_chunk or max(context, PAGE)
    if kv.batch < max_batch or kv.max_context < context or kv.block_tokens != PAGE:
        raise ValueError(f"the model was planned for {kv.batch} sequences x {kv.max_context} "
                         f"positions in pages of {kv.block_tokens}, not {max_batch} x {context}"
                         f" in pages of {PAGE}: plan it with batched_options({max_batch}, "
                         f"{context})")
    return kv.prefill_chunk


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise RequestError(f"{key}={v!r}: use a number from {lo:g} to {hi:g}", param=key)
    return float(v)


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def _held_back(text: str, stop: list[str]) -> int:
    """Characters at the end of ``text`` that may begin a stop string (not streamed yet)."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI application serving ``engine``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="offload", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                e = RequestError("invalid or missing API key: send 'Authorization: Bearer "
                                 "KEY'", status=401, kind="authentication_error",
                                 code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                            "created": int(engine.metrics.started),
                                            "owned_by": "offload"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.prometheus(),
                                 media_type="text/plain; version=0.0.4")

    async def _body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    async def _complete(request: Request, chat: bool):
        p = engine.params(await _body(request), chat)
        engine.admit()
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if p.stream:
            return StreamingResponse(_stream(p, chat, rid, created, kind),
                                     media_type="text/event-stream")
        try:
            tokens = []
            async with contextlib.aclosing(engine.tokens(p)) as stream:   # a stop cancels
                async for tokens, _ in stream:
                    if p.stop and _cut(engine.tok.decode(tokens, skip_special_tokens=True),
                                       p.stop)[1]:
                        break
            text, stopped = _cut(engine.tok.decode(tokens, skip_special_tokens=True), p.stop)
            reason = _reason(tokens, p, engine, stopped)
            engine.count(len(p.ids), len(tokens))
        finally:
            engine.leave()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": kind, "created": created, "model": engine.name,
                "choices": [choice], "usage": _usage(p, tokens)}

    async def _stream(p: Params, chat: bool, rid: str, created: int, kind: str):
        kind += ".chunk" if chat else ""
        sent, tokens, stopped = "", [], False

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                d = ({"role": "assistant", "content": ""} if first else
                     {} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason,
                          "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created,
                                          "model": engine.name, "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            async with contextlib.aclosing(engine.tokens(p)) as stream:   # a stop cancels
                async for tokens, finished in stream:
                    text, stopped = _cut(engine.tok.decode(tokens, skip_special_tokens=True),
                                         p.stop)
                    ready = text if (stopped or finished) else \
                        text[:len(text) - _held_back(text, p.stop)]
                    if ready.endswith("\ufffd") and not finished:   # half a character
                        ready = ready[:-1]
                    if len(ready) > len(sent) and ready.startswith(sent):
                        yield chunk(ready[len(sent):], None)
                        sent = ready
                    if stopped:
                        break
            yield chunk(None, _reason(tokens, p, engine, stopped))
            if p.include_usage:
                yield "data: " + json.dumps({
                    "id": rid, "object": kind, "created": created, "model": engine.name,
                    "choices": [], "usage": _usage(p, tokens)}) + "\n\n"
            yield "data: [DONE]\n\n"
            engine.count(len(p.ids), len(tokens))
        finally:
            engine.leave()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, chat=False)

    return app


def _usage(p: Params, tokens: list[int]) -> dict:
    return {"prompt_tokens": len(p.ids), "completion_tokens": len(tokens),
            "total_tokens": len(p.ids) + len(tokens)}


def _reason(tokens: list[int], p: Params, engine: Engine, stopped: bool) -> str:
    if stopped or (tokens and tokens[-1] == engine.tok.eos_token_id):
        return "stop"
    return "length" if len(tokens) >= p.max_tokens else "stop"

