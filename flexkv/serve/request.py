"""A request as the serving engine's users see it: its decoding settings (`SamplingParams`,
validated before any work) and its handle (`RequestHandle`: a thread-safe stream of token ids
that plain and async code can iterate, cancel, or wait on)."""
from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

from flexkv.serve.json_schema import JSON_OBJECT, compile_schema

MAX_LOGPROBS = 20     # the most likely alternatives a request may ask for at each token
MAX_REPETITION_PENALTY = 100.0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite int or float (not a bool)."""
    return _is_int(x) or (isinstance(x, float) and math.isfinite(x))

RESPONSE_FORMATS = ("text", "json_object", "json_schema")

@dataclass
class SamplingParams:
    """Per-request decoding settings (all per-slot tensors inside the engine)."""
    max_tokens: int = 16
    temperature: float = 0.0             # 0 = greedy
    top_p: float = 1.0                   # (0, 1]
    top_k: int = 0                       # 0 = off
    seed: int | None = None              # None: a random seed per request
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's / model's eos ids
    ignore_eos: bool = False
    # None: none; k: each token's log-probability and the k most likely tokens' (the model's
    # distribution: log-softmax of the logits, before temperature, top-k and top-p)
    logprobs: int | None = None
    # None: none; k: each prompt token's log-probability given the tokens before it and the k
    # most likely tokens' there (the first token has none), as the prefill computed them
    prompt_logprobs: int | None = None
    # logit adjustments before the token is chosen (flexkv.serve.penalties): OpenAI's
    # presence / frequency penalties in [-2, 2] over the tokens produced so far, and its
    # logit_bias ({token id: number in [-100, 100]}); vLLM's repetition penalty (> 0, 1 = off;
    # over the prompt's and the produced tokens) and min_tokens (the stop ids are banned until
    # this many tokens were produced)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    # "json_object": the text is one JSON object; "json_schema": one JSON value of the schema
    # `json_schema` (flexkv.serve.json_schema says which keywords it takes); both need the
    # engine's tokenizer (flexkv.serve.json_mode); "text": unconstrained
    response_format: str = "text"
    json_schema: dict | bool | None = None

    def grammar(self):
        """The grammar the text must follow (`flexkv.serve.json_schema.Grammar`), or None."""
        if self.response_format == "json_object":
            return JSON_OBJECT
        return compile_schema(self.json_schema) if self.response_format == "json_schema" else None

    def validate(self, max_new_tokens: int, vocab_size: int) -> None:
        if not _is_int(self.max_tokens) or not 0 <= self.max_tokens <= max_new_tokens:
            raise ValueError(f"max_tokens must be an int in [0, {max_new_tokens}] (the engine's "
                             f"max_new_tokens; 0: the prompt's prefill only, nothing generated), "
                             f"got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63 - 1], got {self.seed!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
            raise ValueError(f"stop_token_ids must be a list of token ids in [0, {vocab_size - 1}], "
                             f"got {ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}] "
                             f"(1 = off), got {r!r}")
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                raise ValueError(f"logit_bias must be None or a dict {{token id: bias}}, got {bias!r}")
            for i, b in bias.items():
                if not _is_int(i) or not 0 <= i < vocab_size:
                    raise ValueError(f"logit_bias: token ids must be ints in [0, {vocab_size - 1}], "
                                     f"got {i!r}")
                if not _is_number(b) or not -100 <= b <= 100:
                    raise ValueError(f"logit_bias: each bias must be a number in [-100, 100], got "
                                     f"{b!r} for token {i}")
        m = self.min_tokens
        if not _is_int(m) or not 0 <= m <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {m!r}")
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}, got "
                             f"{self.response_format!r}")
        if (self.json_schema is None) != (self.response_format != "json_schema"):
            raise ValueError("json_schema (a JSON Schema dict) is given exactly when response_format "
                             f"is 'json_schema', got response_format={self.response_format!r} and "
                             f"json_schema={self.json_schema!r}"[:300])
        self.grammar()      # a ValueError naming what the schema holds that is not supported


class QueueFull(RuntimeError):
    """`Engine.submit` when `max_waiting` requests are already waiting."""


class RequestHandle:
    """One request's stream of token ids. Iterate it (`for` or `async for`) to receive tokens as
    they are generated; `finish_reason` is set when it ends ("stop": a stop token, which is not
    included; "length": `max_tokens` reached; "cancelled"; "error"). Thread-safe.
    With `params.logprobs` set, `logprobs[i]` is token i's `(logprob, [(token id, logprob), ...])`
    (the k most likely first), there as soon as the token is. With `params.prompt_logprobs`,
    `prompt_logprobs[i]` is the same for prompt token i (None for the first), there when the
    first token is (or the request ends, with `max_tokens=0`)."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.params = params
        self.tokens: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancel_requested = False
        self._on_cancel = None  # set by the engine: wakes its scheduler

    # ------------------------------------------------------------------ engine side
    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, ev in self._async_waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that event loop is closed
                pass

    def _emit(self, token: int, logprob=None) -> None:
        with self._cond:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if self.logprobs is not None:
                self.logprobs.append(logprob)
            self.tokens.append(token)
            self._notify()

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
                self.finished_at = time.perf_counter()
            self._notify()

    # ------------------------------------------------------------------ user side
    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to stop this request; its slot is freed at the next scheduler step."""
        with self._cond:
            if self.finish_reason is not None:
                return
            self._cancel_requested = True
        if self._on_cancel is not None:
            self._on_cancel()

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while i >= len(self.tokens) and self.finish_reason is None:
                    self._cond.wait()
                if i >= len(self.tokens):
                    return
                tok = self.tokens[i]
            i += 1
            yield tok

    async def _wait_for(self, n: int) -> None:
        """Until more than `n` tokens exist or the request has finished."""
        loop = asyncio.get_running_loop()
        while True:
            ev = asyncio.Event()
            with self._cond:
                if len(self.tokens) > n or self.finish_reason is not None:
                    return
                self._async_waiters.append((loop, ev))
            try:
                await ev.wait()
            finally:
                with self._cond:
                    self._async_waiters.remove((loop, ev))

    async def __aiter__(self):
        i = 0
        while True:
            await self._wait_for(i)
            with self._cond:
                if i >= len(self.tokens):
                    return
                tok = self.tokens[i]
            i += 1
            yield tok

    async def wait(self) -> list[int]:
        """All generated tokens, once the request has finished."""
        while not self.finished:
            await self._wait_for(len(self.tokens))
        return list(self.tokens)

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until the request finishes; its generated tokens."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
            return list(self.tokens)
