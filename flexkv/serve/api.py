"""The OpenAI-compatible HTTP server over `flexkv.serve.Engine` (FastAPI + uvicorn).

`build_app(engine, model_name)` returns the FastAPI app; `flexkv.serve.server.serve(...)` loads a
model, builds the engine and the app and runs uvicorn (what `flexkv serve` calls). Beside it:
`errors` (OpenAI-shaped error bodies), `middleware` (body limit, API key), `openapi` (the schema),
`protocol` (the pydantic request and response models).

The HTTP layer only translates (as vLLM's entrypoints do): a JSON body -> token ids (the
tokenizer, the chat template) + `SamplingParams` -> `engine.submit` -> token ids -> text (stop
strings are cut here) -> a JSON body or server-sent events. The engine knows nothing of HTTP.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text).

Request fields. Supported: `model` (optional; if given it must be the served name), `prompt`
(a non-empty string or a non-empty list of token ids, or a batch of up to 256 such prompts:
a list of strings or of token-id lists, queued all or none, answered as one choice each in
order, `usage` summed; as OpenAI's completions API takes them) / `messages` (roles system,
developer, user, assistant; text content), `max_tokens` (`max_completion_tokens` too, for
chat), `temperature`, `top_p`, `top_k` (extension; 0 or -1 = off), `seed`, `stop` (a string or
up to 16 strings), `n` (choices per prompt; with `seed` s, choice j samples with seed s + j),
`stop_token_ids` (extension, as vLLM's: token ids that end the text, not included),
`logprobs` (completions: an int k in [0, 20]; chat: true, with `top_logprobs` k: each
generated token's logprob and the k most likely tokens', from the model's distribution before
temperature, top-k and top-p, as vLLM reports by default), `stream`,
`stream_options.include_usage`, `ignore_eos` (extension), `user` (ignored); `presence_penalty`
and `frequency_penalty` ([-2, 2], over the tokens produced so far), `logit_bias` ({token id:
[-100, 100]}), and, as vLLM's extensions, `repetition_penalty` ((0, 100], over the prompt's and
the produced tokens) and `min_tokens` (no end of sequence, stop token id or stop string before
that many tokens), all applied to the logits before the token is chosen
(`flexkv.serve.penalties`; logprobs stay the raw model's). Completions also take `echo` (the
prompt's text first; with `logprobs`, the prompt tokens' entries first, the first one null, as
the prefill computed them; `max_tokens: 0` only with echo: the prompt scored, nothing
generated, as lm-evaluation-harness asks) and `best_of` (k >= n candidates per prompt, with
seeds s .. s+k-1; the n with the highest mean logprob per token are returned, best first; not
streamed). `usage` counts each prompt once, however many choices or candidates it has, and
every generated token, as OpenAI does. OpenAI's other documented fields that this server does
not implement (`suffix`, `functions`, ...) are accepted only at their neutral value (null / empty /
"none"); any other value is a 400 that names the field. Unknown
fields are a 400 ("Unrecognized request argument supplied: ..."), as OpenAI's API answers them.

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`. Invalid requests
(malformed JSON, wrong types, values out of range, unknown fields, over-long prompts) are 400
with type `invalid_request_error`; an unknown model or path 404; a body over
`middleware.MAX_BODY_BYTES` 413; a request to the API without the server's `api_key` 401; a full waiting queue 429
(type `rate_limit_error`, code `queue_full`, a `Retry-After` header); a server shutting down 503.
A client that disconnects (streaming or not) cancels its request, which frees its slot.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flexkv.serve import QueueFull, SamplingParams
from flexkv.serve.detokenize import IncrementalText, TokenPieces
from flexkv.serve.errors import APIError, engine_error_param, error_response, validation_message
from flexkv.serve.metrics import prometheus_text
from flexkv.serve.middleware import MAX_BODY_BYTES, BodyLimit, RequireAPIKey
from flexkv.serve.openapi import clean_openapi, version
from flexkv.serve.penalties import OVER_BUDGET
from flexkv.serve.protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest,
                                   ChatCompletionResponse, ChatFields, CompletionChoice,
                                   CompletionRequest, CompletionResponse, DetokenizeRequest,
                                   DetokenizeResponse, ErrorResponse, Health, ModelCard, ModelList,
                                   SchemaError, TokenizeChatRequest, TokenizeRequest,
                                   TokenizeResponse, Usage, SamplingFields, MAX_PROMPTS,
                                   compile_schemas, schemas)
from flexkv.serve.tool_calls import reply, tool_messages


# --------------------------------------------------------------------------- the app
def _now() -> int:
    return int(time.time())


def json_body(model) -> Response:
    """`model` rendered as FastAPI renders a route's response model (pydantic's JSON
    serializer), by the caller, in a worker thread: a whole completion's body (32 choices of 512
    tokens with 20 logprobs each) took 4.5 s on the event loop, where FastAPI then validated and
    rendered it again; now the loop pauses at most 2.1 s, in pydantic's validation of the
    response model, a single call that keeps the interpreter lock (the Python that builds the
    logprobs lets the loop in)."""
    return Response(model.model_dump_json(), media_type="application/json")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Prepared:
    """A translated request: each choice's prompt ids and sampling parameters (`n` choices per
    prompt; one prompt, or a completions request's batch), the stop strings, the streaming
    options."""

    def __init__(self, ids: list, params: list, n: int, stops, stream, include_usage, echo=None,
                 best_of: int | None = None, show_logprobs: bool = True):
        self.ids, self.params, self.n, self.stops = ids, params, n, stops
        self.stream, self.include_usage = stream, include_usage
        self.echo = echo     # completions' echo: each choice's prompt text (None: no echo)
        self.best_of = best_of or n     # candidates per prompt (the n best are returned)
        self.show_logprobs = show_logprobs  # False: asked only to rank best_of's candidates

    def texts(self, tokenizer) -> list[IncrementalText]:
        """Each choice's detokenizer (stop strings count after its `min_tokens`)."""
        return [IncrementalText(tokenizer, self.stops, p.min_tokens) for p in self.params]


def _context_len(engine) -> int | None:
    args = getattr(getattr(engine, "model", None), "args", None)
    return getattr(args, "max_position_embeddings", None)


def build_app(engine, model_name: str, *, start_engine: bool = True,
              api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over `engine` (a `flexkv.serve.Engine`), serving it as `model_name`.
    With `start_engine` (default) the app's lifespan runs `engine.start()` at startup and
    `engine.shutdown()` at shutdown. With `api_key`, requests to the API's paths need it
    (`RequireAPIKey`). A request body over `max_body_bytes` is a 413 (`BodyLimit`)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key: an empty key would let anyone in; give a key, or None for none")
    tok = engine.tokenizer
    pieces = TokenPieces(tok)
    created = _now()
    counters = {"queue_full": 0, "disconnects": 0}
    # the tokenizer's work on a request (its chat template, encoding a prompt of up to 4M
    # characters: ~3 s) runs in one worker thread, as vLLM's does, so the event loop goes on
    # streaming; one, so that requests' encodings queue there rather than contend in many
    # threads (decoding, which streams use, stays where it is: the tokenizer reads concurrently)
    worker: dict[str, ThreadPoolExecutor] = {}     # made on first use, shut down with the app
    if tok is not None:   # a fast tokenizer whose file enables truncation or padding has it
        tok("")           # switched off by its first call (a write): here, before any thread

    async def in_tokenizer_thread(fn, *args):
        if "tokenizer" not in worker:
            worker["tokenizer"] = ThreadPoolExecutor(1, thread_name_prefix="flexkv-tokenizer")
        return await asyncio.get_running_loop().run_in_executor(worker["tokenizer"], fn, *args)

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if "tokenizer" in worker:
                worker.pop("tokenizer").shutdown(wait=False, cancel_futures=True)
            if start_engine:
                await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="flexkv", version=version(), lifespan=lifespan,
                  description="OpenAI-compatible completions over a flexkv engine "
                  f"(policy {getattr(engine, 'policy_name', '?')}).")
    app.state.engine = engine
    app.state.model_name = model_name
    app.state.counters = counters

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        typ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        msg = {404: f"Not found: {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(exc.status_code, msg, typ, code=code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}",
                              "server_error")

    err = {"model": ErrorResponse}
    request_errors = {400: {**err, "description": "invalid request"},
                      404: {**err, "description": "unknown model"},
                      413: {**err, "description": "the request body is over the server's limit"}}
    post_errors = {**request_errors,
                   429: {**err, "description": "the waiting queue is full"},
                   503: {**err, "description": "the server is shutting down"}}

    # ------------------------------------------------------------------ translation helpers
    async def schemas_compiled(req) -> None:
        """The request's JSON Schemas compiled in a worker thread (`compile_schemas`), so that
        the event loop goes on streaming meanwhile; one that cannot be is a 400. A request
        without a schema (most) does not go to the thread."""
        if next(schemas(req), None) is None:
            return
        try:
            await asyncio.to_thread(compile_schemas, req)
        except SchemaError as e:
            raise APIError(400, str(e), param=e.param) from None

    def check_model(name):
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{model_name}` (GET /v1/models).", param="model", code="model_not_found")

    def engine_limit(n_prompt: int) -> int:
        limit = int(engine.max_new_tokens)
        ctx = _context_len(engine)
        if ctx is not None:
            limit = min(limit, ctx - n_prompt)
        return max(1, limit)

    def sampling(req: SamplingFields, max_tokens: int, choice: int, logprobs: int | None) -> SamplingParams:
        """Choice `choice` of the prompt: with a seed s it samples with seed s + choice (so the
        choices differ, and each is reproducible)."""
        seed = None if req.seed is None else (req.seed + choice) % 2**63
        return SamplingParams(max_tokens=max_tokens, temperature=float(req.temperature),
                              top_p=float(req.top_p), top_k=max(0, req.top_k), seed=seed,
                              ignore_eos=req.ignore_eos, logprobs=logprobs,
                              stop_token_ids=tuple(req.stop_token_ids or ()),
                              presence_penalty=float(req.presence_penalty or 0),
                              frequency_penalty=float(req.frequency_penalty or 0),
                              repetition_penalty=float(req.repetition_penalty),
                              logit_bias=req.logit_bias_ids(), min_tokens=req.min_tokens,
                              response_format=req.format_type(), json_schema=req.schema())

    def logprobs_json(chat: bool, ids: list, entries: list, offset: int) -> tuple[dict, int]:
        """OpenAI's logprobs object for tokens `ids` with their engine entries (logprob, top
        alternatives); completions also give each token's offset in the text, from `offset`
        (returned advanced past these tokens)."""
        if chat:
            return {"content": [
                {"token": pieces.text(t), "logprob": lp, "bytes": pieces.bytes(t),
                 "top_logprobs": [{"token": pieces.text(i), "logprob": v, "bytes": pieces.bytes(i)}
                                  for i, v in top]}
                for t, (lp, top) in zip(ids, entries)]}, offset
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, entry in zip(ids, entries):
            s = pieces.text(t)
            lp, alternatives = None, None      # a prompt's first token (echo): no logprob
            if entry is not None:
                lp, top = entry
                alternatives = {}              # keyed by text: of tokens with the same text,
                for i, v in top:               # the most likely one's
                    alternatives.setdefault(pieces.text(i), v)
                alternatives.setdefault(s, lp)  # the chosen token's too: up to k + 1 entries
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(offset)
            offset += len(s)
        return out, offset

    def submit(prep: _Prepared, chat: bool) -> list:
        """The request's handles, one per choice (several are queued all or none)."""
        k, most = len(prep.ids), min(MAX_PROMPTS, engine.max_waiting)
        if k > most:
            what, param = ((f"{k} candidates (best_of x prompts)", "best_of") if prep.best_of > prep.n
                           else (f"{k} choices (n x prompts)", "n") if prep.n > 1
                           else (f"{k} prompts", "prompt"))
            why = ("requests this server queues (--max-waiting)" if most == engine.max_waiting
                   else "choices one request may ask for")
            raise APIError(400, f"{what} in one request are more than the {most} {why}; send "
                           "fewer at a time", param=param)
        try:
            if k == 1:
                return [engine.submit(prep.ids[0], prep.params[0])]
            return engine.submit_many(prep.ids, prep.params)
        except QueueFull:
            counters["queue_full"] += 1
            room = f" has no room for the {k} requests this one needs" if k > 1 else " is full"
            raise APIError(429, f"The server is busy: its waiting queue{room} (at most "
                           f"{engine.max_waiting} requests wait for a slot). Retry later.",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            msg = " ".join(str(e).split()) or "invalid request"
            raise APIError(400, msg, param=engine_error_param(msg, chat)) from None
        except RuntimeError as e:          # the engine is shutting down
            raise APIError(503, f"The server cannot take requests now: {e}", "server_error",
                           code="unavailable") from None

    def prepare_completion(req: CompletionRequest) -> _Prepared:
        check_model(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 is allowed only with echo=true (the prompt alone, "
                           "scored with logprobs)", param="max_tokens")
        ids_list, params, echo = [], [], []
        best_of = req.best_of or req.n
        # best_of's candidates are ranked by their tokens' logprobs, asked for even if not shown
        logprobs = 0 if req.logprobs is None and best_of > req.n else req.logprobs
        for i, prompt in enumerate(req.prompt_list()):
            if isinstance(prompt, str):
                ids = list(tok(prompt)["input_ids"])
                if not ids:
                    at = f" (item {i} of the batch)" if req.batched() else ""
                    raise APIError(400, f"prompt: the prompt has no tokens{at}", param="prompt")
            else:
                ids = list(prompt)
            max_tokens = req.max_tokens if req.max_tokens is not None else min(16, engine_limit(len(ids)))
            text = prompt if isinstance(prompt, str) else IncrementalText.decode_all(tok, ids)
            for j in range(best_of):        # OpenAI's order: prompt i's choices are i*n .. i*n+n-1
                ids_list.append(ids)
                sp = sampling(req, max_tokens, j, logprobs)
                if req.echo and req.logprobs is not None:  # the prompt's too, from its prefill
                    sp.prompt_logprobs = req.logprobs
                params.append(sp)
                echo.append(text)
        return _Prepared(ids_list, params, req.n, req.stop_list(), req.stream,
                         bool(req.stream_options and req.stream_options.include_usage),
                         echo if req.echo else None, best_of, req.logprobs is not None)

    def chat_prompt(req: ChatFields, add_generation_prompt: bool = True) -> list[int]:
        """The token ids of a conversation's prompt: the chat template over its messages, with
        its tools as tool_calls.py offers them."""
        check_model(req.model)
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"the model {model_name} has no chat template; use /v1/completions",
                           param="messages")
        msgs = [m.template_dict() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]

        def render(messages, **kwargs):
            return tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)
        try:
            text = tool_messages(render, msgs, tools, req.tool_mode(), req.named_tool())
        except Exception as e:  # noqa: BLE001 - the template rejects these messages (jinja raise_exception, ...)
            raise APIError(400, f"messages: the chat template rejected them: {' '.join(str(e).split())}",
                           param="messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def prepare_chat(req: ChatCompletionRequest) -> _Prepared:
        ids = chat_prompt(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = engine_limit(len(ids))
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = [sampling(req, max_tokens, j, k) for j in range(req.n)]
        if req.tool_mode() is not None:     # the reply may call tools: its schema (tool_calls.py)
            schema = req.call_schema()
            params = [dataclasses.replace(p, response_format="json_schema", json_schema=schema)
                      for p in params]
        return _Prepared([ids] * req.n, params, req.n, req.stop_list(), req.stream,
                         bool(req.stream_options and req.stream_options.include_usage))

    def finish_reason(handle, text: IncrementalText) -> str:
        if text.stopped:
            return "stop"
        r = handle.finish_reason
        if r in ("stop", "length"):
            return r
        if r == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down",
                           "server_error", code="cancelled")
        if (handle.error or "").startswith(OVER_BUDGET):      # the schema cost too much
            raise APIError(400, handle.error, code="schema_too_costly")
        raise APIError(500, f"the engine failed on this request (finish_reason {r!r})", "server_error")

    def usage(prep: _Prepared, handles: list, texts: list) -> dict:
        """Token counts as OpenAI gives them: each prompt of a batch once (however many choices
        or best_of candidates it has), every generated token of every choice and candidate."""
        prompt = sum(int(h.prompt_tokens) for h in handles[::prep.best_of])
        n = sum(t.n_tokens for t in texts)
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}

    def prompt_logprobs(handle) -> tuple[dict | None, int]:
        """The echoed prompt's completions logprobs (None: not asked) and the text offset after it."""
        if handle.prompt_logprobs is None:
            return None, 0
        return logprobs_json(False, handle.prompt, handle.prompt_logprobs, 0)

    def final_logprobs(chat: bool, handle, text: IncrementalText, echo: bool = False):
        """A whole choice's logprobs: one entry per token its text consumed (None: not asked);
        with `echo`, the prompt's entries first."""
        if handle.logprobs is None:
            return None
        head, offset = prompt_logprobs(handle) if echo else (None, 0)
        out = logprobs_json(chat, text.ids, handle.logprobs[:text.n_tokens], offset)[0]
        return out if head is None else {k: head[k] + out[k] for k in out}

    def best_candidates(prep: _Prepared, handles: list, texts: list) -> list[int]:
        """The handles to answer with, in order: all of them, or with `best_of` the n of each
        prompt's candidates with the highest mean logprob per token (best first; an empty
        completion last, ties in candidate order). Usage counts every candidate."""
        k = prep.best_of
        if k == prep.n:
            return list(range(len(handles)))

        def score(j: int) -> float:
            entries = handles[j].logprobs[:texts[j].n_tokens]
            return sum(lp for lp, _ in entries) / len(entries) if entries else float("-inf")
        out = []
        for start in range(0, len(handles), k):
            group = sorted(range(start, start + k), key=lambda j: -score(j))
            out += group[:prep.n]
        return out

    async def consume(handle, text: IncrementalText):
        """Feed the handle's tokens through the detokenizer until it ends or a stop string."""
        async for token_id in handle:
            text.add(token_id)
            if text.stopped:
                handle.cancel()
                break

    async def wait_disconnect(request: Request):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def run_blocking(request: Request, handles: list, texts: list):
        """Non-streaming: collect each prompt's text; cancel them all if the client goes away
        first."""
        work = asyncio.gather(*(consume(h, t) for h, t in zip(handles, texts)))
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()
                return True
            counters["disconnects"] += 1
            return False
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            for h, t in zip(handles, texts):
                if h.finish_reason is None and not t.stopped:
                    h.cancel()         # disconnected, or this handler itself was cancelled

    def stream_response(prep: _Prepared, handles: list, rid: str, kind: str, created: int,
                        choice, first=None) -> StreamingResponse:
        """Server-sent events of one request: `choice(index, piece, reason, logprobs)` makes an
        event's choice, or None where a token's piece says nothing (`first(index)`, if given, is
        each choice's first event, before any token); every event is the OpenAI envelope of `kind` ("text_completion" /
        "chat.completion.chunk"), with `usage` null in each and a last usage-only event when the
        request asked for usage. Several choices (a batch, `n`) stream interleaved, each event
        naming its choice's index; each choice ends with one event carrying its finish reason."""
        texts = prep.texts(tok)
        chat = kind == "chat.completion.chunk"
        lp_sent, lp_offset = [0] * len(handles), [0] * len(handles)
        echoed = set()

        def echo_event(i: int) -> dict:
            """Choice i's echoed prompt, sent before its first token (or its end): the prompt's
            logprobs are there once its prefill is done."""
            echoed.add(i)
            head, lp_offset[i] = prompt_logprobs(handles[i])
            return event([choice(i, prep.echo[i], None, head)])

        def new_logprobs(i: int):
            """Choice i's logprobs for the tokens consumed since its last event (None: not asked)."""
            if handles[i].logprobs is None:
                return None
            a, b = lp_sent[i], texts[i].n_tokens
            lp_sent[i] = b
            obj, lp_offset[i] = logprobs_json(chat, texts[i].ids[a:b], handles[i].logprobs[a:b],
                                              lp_offset[i])
            return obj

        def event(choices: list, usage_obj=None) -> dict:
            obj = {"id": rid, "object": kind, "created": created, "model": model_name,
                   "choices": choices}
            if prep.include_usage:
                obj["usage"] = usage_obj
            return obj

        async def pump(i: int, handle, tokens: asyncio.Queue):
            try:
                async for token_id in handle:
                    tokens.put_nowait((i, token_id))
            finally:
                tokens.put_nowait((i, None))       # the choice ends, however the handle did

        async def events():
            done, tokens = False, asyncio.Queue()
            pumps = [asyncio.ensure_future(pump(i, h, tokens)) for i, h in enumerate(handles)]
            open_ = set(range(len(handles)))
            try:
                if first is not None:
                    for i in range(len(handles)):
                        yield _sse(event([first(i)]))
                failed = False
                while open_:
                    i, token_id = await tokens.get()
                    if i not in open_:
                        continue
                    if prep.echo is not None and i not in echoed:
                        yield _sse(echo_event(i))
                    text = texts[i]
                    if token_id is not None:
                        piece = text.add(token_id)
                        if piece and (c := choice(i, piece, None, new_logprobs(i))) is not None:
                            yield _sse(event([c]))
                        if not text.stopped:
                            continue
                        handles[i].cancel()
                        pumps[i].cancel()
                    open_.discard(i)
                    try:
                        reason = finish_reason(handles[i], text)
                    except APIError as e:
                        yield _sse({"error": {"message": e.message, "type": e.type, "param": None,
                                              "code": e.code}})
                        failed = True
                        break
                    yield _sse(event([choice(i, text.finish(), reason, new_logprobs(i))]))
                if prep.include_usage and not failed:
                    yield _sse(event([], usage(prep, handles, texts)))
                yield "data: [DONE]\n\n"
                done = True
            finally:
                for p in pumps:
                    p.cancel()
                unfinished = [h for h in handles if h.finish_reason is None]
                if not done and unfinished:
                    counters["disconnects"] += 1
                for h in unfinished:
                    h.cancel()

        return _SSEResponse(events(), handles)

    # ------------------------------------------------------------------ routes
    @app.post("/v1/completions", response_model=CompletionResponse, responses={
        **post_errors, 200: {"content": {"text/event-stream": {}},
                             "description": "the completion (JSON, or events when stream=true)"}})
    async def completions(req: CompletionRequest, request: Request):
        await schemas_compiled(req)
        prep = await in_tokenizer_thread(prepare_completion, req)
        handles = submit(prep, chat=False)
        rid, t = f"cmpl-{handles[0].request_id}", _now()
        if prep.stream:
            def choice(i, piece, reason, logprobs=None):
                return {"index": i, "text": piece, "logprobs": logprobs, "finish_reason": reason}
            return stream_response(prep, handles, rid, "text_completion", t, choice)
        texts = prep.texts(tok)
        if not await run_blocking(request, handles, texts):
            return Response(status_code=499)
        return await asyncio.to_thread(completion_body, prep, handles, texts, rid, t)

    def completion_body(prep: _Prepared, handles: list, texts: list, rid: str, t: int):
        reasons = [finish_reason(h, text) for h, text in zip(handles, texts)]
        for text in texts:
            text.finish()
        echo = prep.echo or [""] * len(handles)
        choices = [CompletionChoice(index=i, text=echo[j] + texts[j].text, finish_reason=reasons[j],
                                    logprobs=final_logprobs(False, handles[j], texts[j], bool(prep.echo))
                                    if prep.show_logprobs else None)
                   for i, j in enumerate(best_candidates(prep, handles, texts))]
        return json_body(CompletionResponse(id=rid, created=t, model=model_name, choices=choices,
                                            usage=Usage(**usage(prep, handles, texts))))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={
        **post_errors, 200: {"content": {"text/event-stream": {}},
                             "description": "the completion (JSON, or events when stream=true)"}})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        await schemas_compiled(req)
        prep = await in_tokenizer_thread(prepare_chat, req)
        handles = submit(prep, chat=True)
        rid, t = f"chatcmpl-{handles[0].request_id}", _now()
        mode = req.tool_mode()       # the reply may call tools (tool_calls.py)
        calls = None if mode is None else [reply(mode, req.named_tool()) for _ in handles]
        if prep.stream:
            def choice(i, piece, reason, logprobs=None, delta=None):
                if calls is not None and delta is None:
                    delta, reason = calls[i].delta(piece, reason)
                delta = {"content": piece} if delta is None else delta
                if reason is not None and not piece and calls is None:
                    delta = {}
                if not delta and reason is None and logprobs is None:
                    return None           # nothing to say (a tool call's wrapper): no event
                return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            def first(i):
                delta = calls[i].first_delta() if calls else {"role": "assistant", "content": ""}
                return choice(i, "", None, delta=delta)
            return stream_response(prep, handles, rid, "chat.completion.chunk", t, choice, first=first)
        texts = prep.texts(tok)
        if not await run_blocking(request, handles, texts):
            return Response(status_code=499)
        return await asyncio.to_thread(chat_body, prep, handles, texts, rid, t, calls)

    def chat_body(prep: _Prepared, handles: list, texts: list, rid: str, t: int, calls):
        reasons = [finish_reason(h, text) for h, text in zip(handles, texts)]
        choices = []
        for i, (h, text, r) in enumerate(zip(handles, texts, reasons)):
            text.finish()
            content, tool_calls = text.text, None
            if calls is not None:
                content, tool_calls, r = calls[i].message(text.text, r)
            message = AssistantMessage(content=content, tool_calls=tool_calls)
            choices.append(ChatChoice(index=i, message=message, finish_reason=r,
                                      logprobs=final_logprobs(True, h, text)))
        return json_body(ChatCompletionResponse(id=rid, created=t, model=model_name,
                                                choices=choices,
                                                usage=Usage(**usage(prep, handles, texts))))

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, max_model_len=_context_len(engine))

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: err})
    async def model_card(model_id: str):
        check_model(model_id)
        return card()

    @app.post("/tokenize", response_model=TokenizeResponse, responses=request_errors)
    async def tokenize(req: TokenizeRequest):
        """A prompt's token ids, or a conversation's as /v1/chat/completions makes its prompt
        (as vLLM's `/tokenize`), with `max_model_len` to check it against."""
        if isinstance(req, TokenizeChatRequest):
            await schemas_compiled(req)
        else:
            check_model(req.model)
        return await in_tokenizer_thread(tokenized, req)

    def tokenized(req: TokenizeRequest) -> TokenizeResponse:
        if isinstance(req, TokenizeChatRequest):
            ids = chat_prompt(req, req.add_generation_prompt)
        else:
            ids = list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=_context_len(engine), tokens=ids,
                                token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=request_errors)
    async def detokenize(req: DetokenizeRequest):
        """Token ids to text, as /v1/completions decodes them (as vLLM's `/detokenize`)."""
        check_model(req.model)
        vocab = len(tok)
        bad = next((i for i, t in enumerate(req.tokens) if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens[{bad}]: token ids must be in [0, {vocab - 1}], got "
                           f"{req.tokens[bad]}", param="tokens")
        text = await in_tokenizer_thread(IncrementalText.decode_all, tok, req.tokens)
        return DetokenizeResponse(prompt=text)

    @app.get("/health", response_model=Health)
    async def health():
        return Health(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics():
        return PlainTextResponse(prometheus_text(engine, model_name, counters),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if api_key is not None:          # added last: the outer one, before any body is read
        app.add_middleware(RequireAPIKey, key=api_key.strip())
    clean_openapi(app, model_name, engine, api_key is not None)
    return app


class _SSEResponse(StreamingResponse):
    """Server-sent events for one request; whatever ends the response (done, client gone, server
    shutting down) its prompts' engine requests are cancelled unless they finished."""

    def __init__(self, content, handles: list):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles = handles

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for h in self.handles:
                if h.finish_reason is None:
                    h.cancel()


