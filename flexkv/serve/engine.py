"""The serving engine: continuous batching over static request slots, one compiled decode step.

Every layer's cache has batch dimension `max_slots`; a slot holds one request. The scheduler
(`Engine.step`, run in a background thread by `start()` or inline by `generate()`) does, per
iteration:

1. cancellations: a cancelled request leaves its slot (or the queue) at once;
2. admission: the oldest waiting request takes a free slot; its prompt is prefilled in chunks of
   `prefill_chunk` tokens into a one-row scratch cache with the engine's slot capacities, through
   the same `Prefill` runner as `flexkv.generate` (the policy compressing between chunks), one
   chunk per iteration so running requests keep streaming while a long prompt arrives; after the
   last chunk the row is copied into the slot and the request starts decoding. Requests with a
   prompt being prefilled (and the same `max_tokens` and `prompt_logprobs`: `n` choices,
   `best_of` candidates, repeats) wait for that prefill and take its row, last logits and
   prompt logprobs (`_Prefilled`) instead of prefilling again; requests behind them start
   meanwhile. With `prefix_cache_memory`, the cache after each chunk that is not a prompt's last
   is kept (least recently used first out); a prompt that begins with a kept chunk-aligned
   prefix resumes from the longest one instead of running those chunks (`flexkv.serve.prefix_cache`);
3. one decode step for every slot (`decode_one_token`: compiled, `fullgraph=True`, CUDA graphs on
   CUDA) with an `active` mask: idle slots write, score and evict nothing; per-slot sampling
   parameters are tensors (`flexkv.serve.sampling`), so nothing recompiles as requests come
   and go; a request's penalties, logit_bias and min_tokens adjust its row of the logits
   before its token is chosen (`flexkv.serve.penalties`);
4. the new tokens go to the requests' handles (one host read per step, which streaming needs
   anyway); a request that hits a stop token or its `max_tokens` frees its slot at once (the row
   is cleared, so the next request starts from a clean slot).

Each iteration starts from a *plan* (`_Plan`: the requests that arrived and the cancellations
seen since the last one, and whether to stop), snapshotted under the lock so that a request
arriving mid-step waits for the next one. On a tensor-parallel model rank 0's scheduler makes the
plan and broadcasts it (`Shard.broadcast_object`); every other rank applies the same plan and
runs the same step (`Engine.follow()`, or the same `generate` calls on every rank), so the ranks'
collectives line up and only rank 0 needs to receive requests (`flexkv serve` under torchrun).

A request's tokens equal `flexkv.generate` on that prompt alone (same policy, `max_new_tokens =
max_tokens`, `prefill_chunk`): the slot's row goes through the same prefill and the same
decode-step code, and rows never interact (tests/test_serve_engine.py).
"""
from __future__ import annotations

import itertools
import math
import re
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexkv.cache import KVCache
from flexkv.distributed import shard_of
from flexkv.generate import (Prefill, compiled_decode, compiled_prefill, cuda_graph_thread_state,
                             decode_one_token, grad_off, stop_token_ids)
from flexkv.policies import make_policy
from flexkv.serve.json_mode import JsonVocab
from flexkv.serve.metrics import RequestLatency
from flexkv.serve.penalties import MAX_MASK_SECONDS, SlotAdjustments, over_budget_error
from flexkv.serve.prefix_cache import PrefixCache
from flexkv.serve.request import QueueFull, RequestHandle, SamplingParams, _is_int, _is_number
from flexkv.serve.sampling import cut_hint, sample_slots


def logprob_entries(logits: Tensor, chosen: Tensor, ks: list[int]) -> list[tuple[float, list]]:
    """Per row of `logits` [R, V]: (the logprob of token `chosen[r]`, [(token id, logprob)] of
    the row's `ks[r]` most likely tokens, most likely first), in one host read. The model's
    distribution: the log-softmax of the raw logits (before penalties, temperature, top-k and
    top-p), as vLLM reports by default."""
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    K = max(ks)
    top_v, top_i = lp.topk(K, dim=-1)
    # [chosen | top values | top ids] in fp64 (exact for fp32 values and for ids)
    host = torch.cat([lp.gather(-1, chosen[:, None]).double(), top_v.double(), top_i.double()],
                     dim=-1).tolist()
    return [(row[0], [(int(i), v) for i, v in zip(row[1 + K:1 + K + k], row[1:1 + k])])
            for row, k in zip(host, ks)]


@dataclass
class _Plan:
    """One scheduler iteration's inputs, decided by rank 0 (the only rank under a single process)."""
    submit: list            # [_Running]: requests that join the waiting queue, in order
    cancel: frozenset       # request ids to cancel (waiting or running)
    stop: bool = False      # the engine is shutting down: no step


@dataclass
class _Running:
    handle: RequestHandle
    stop_ids: frozenset
    prefill: Prefill | None = None       # set while the prompt is being prefilled
    scratch: KVCache | None = None
    generated: int = 0
    # what its prefill depends on besides the engine: requests with equal keys (and equal
    # prompts) get the same cache row, last logits and prompt logprobs from it
    prefill_key: tuple = field(init=False)

    def __post_init__(self):
        p = self.handle.params
        self.prefill_key = (hash(tuple(self.handle.prompt)), len(self.handle.prompt),
                            p.max_tokens, p.prompt_logprobs)


@dataclass
class _Prefilled:
    """A finished prefill kept for waiting requests with the same prompt (`n` choices, `best_of`
    candidates, repeated prompts): its one-row cache, its last logits [1, V], its prompt
    logprobs."""
    key: tuple
    prompt: list
    scratch: KVCache
    logits: Tensor
    prompt_logprobs: list | None

    def serves(self, req: _Running) -> bool:
        return req.prefill_key == self.key and req.handle.prompt == self.prompt


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(x, name: str = "kv_memory") -> int:
    """A memory size: an int (bytes) or a string such as "2GiB", "512MiB", "1.5GB"."""
    if _is_int(x) and x > 0:
        return x
    if isinstance(x, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", x)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if n > 0:
                return n
    raise ValueError(f"{name} must be a positive number of bytes (an int, or a string such as "
                     f"'2GiB', '512MiB', '1.5GB'), got {x!r}")


class Engine:
    """Continuous batching over `max_slots` static request slots (see the module docstring).

    `Engine(model, tokenizer, policy="h2o", budget=256, max_slots=8, max_new_tokens=512,
    prefill_chunk=512)`, or `kv_memory="2GiB"` instead of `max_slots` (the slot count that fits,
    reported as `engine.max_slots`). `max_prompt_tokens` (default: the model's context minus
    `max_new_tokens`) and `max_new_tokens` size every slot once, for the longest request.
    `compile` (default: on CUDA) compiles the decode step; `compile_prefill=True` compiles the
    prefill chunk too (`flexkv.generate.compiled_prefill`: one chunk shape, the last chunk of a
    prompt left-padded, the same tokens; fewer, fused kernels per chunk where eager prefill is
    host-bound, e.g. a small model on a GPU); `max_waiting` bounds the queue.
    `prefix_cache_memory` (bytes, or a string such as "1GiB"; default None: off) keeps the
    prefill's cache after every chunk that is not a prompt's last, within that memory, so a
    prompt that begins with the same chunk-aligned tokens as an earlier one (a shared system
    prompt or document, a chat's earlier turns) skips those chunks; its tokens are the same.
    `max_mask_seconds` (default 10) is the engine's time a structured-output request (JSON mode,
    a JSON Schema) may take for its recognizer and token masks in all, since every other request
    waits on that thread: past it the request ends with finish reason "error" (`math.inf`: no
    bound). Extra keyword arguments are the policy's parameters, as in `flexkv.generate`.

    On a tensor-parallel model (`flexkv.load_model(..., tp=True)`) build the engine on every rank
    with the same arguments; then either call the same `generate` on every rank, or submit on
    rank 0 only (`start()`, a server) while every other rank runs `follow()`."""

    HEARTBEAT_S = 10.0   # tensor parallel: an idle rank 0 sends an empty plan this often, so the
                         # followers' pending broadcast never reaches the process group's timeout

    def __init__(self, model, tokenizer=None, policy="full", budget=None, *, max_slots: int | None = None,
                 kv_memory=None, max_new_tokens: int = 256, max_prompt_tokens: int | None = None,
                 prefill_chunk: int | None = 512, max_waiting: int = 256, compile: bool | None = None,
                 compile_prefill: bool = False, prefix_cache_memory=None,
                 max_mask_seconds: float = MAX_MASK_SECONDS, **policy_params):
        a = model.args
        ctx = a.max_position_embeddings
        if not _is_int(max_new_tokens) or not 1 <= max_new_tokens < ctx:
            raise ValueError(f"max_new_tokens must be an int in [1, {ctx - 1}] (the model's context "
                             f"is {ctx}), got {max_new_tokens!r}")
        if max_prompt_tokens is None:
            max_prompt_tokens = ctx - max_new_tokens
        if not _is_int(max_prompt_tokens) or not 1 <= max_prompt_tokens <= ctx - max_new_tokens:
            raise ValueError(f"max_prompt_tokens must be an int in [1, {ctx - max_new_tokens}] "
                             f"(context {ctx} - max_new_tokens {max_new_tokens}), got {max_prompt_tokens!r}")
        if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be None (one shot) or an int >= 1, got {prefill_chunk!r}")
        if not isinstance(compile_prefill, bool):
            raise ValueError(f"compile_prefill must be True or False, got {compile_prefill!r}")
        if compile_prefill and prefill_chunk is None:
            raise ValueError("compile_prefill=True needs an int prefill_chunk (the one chunk shape "
                             "that is compiled), got prefill_chunk=None")
        if compile_prefill and shard_of(model).active:
            raise ValueError("compile_prefill=True is not supported on a tensor-parallel model "
                             "(its prefill runs eagerly); leave it False")
        if prefix_cache_memory is not None:
            prefix_limit = parse_bytes(prefix_cache_memory, "prefix_cache_memory")
            if prefill_chunk is None:
                raise ValueError("prefix_cache_memory needs an int prefill_chunk (the cache keeps "
                                 "the state after each chunk), got prefill_chunk=None")
            if shard_of(model).active:
                raise ValueError("prefix_cache_memory is not supported on a tensor-parallel model "
                                 "(every rank would have to keep the same entries); leave it None")
        if not _is_int(max_waiting) or max_waiting < 1:
            raise ValueError(f"max_waiting must be an int >= 1, got {max_waiting!r}")
        if not ((_is_number(max_mask_seconds) and max_mask_seconds > 0)
                or max_mask_seconds == math.inf):
            raise ValueError("max_mask_seconds must be a number of seconds > 0 (math.inf: no "
                             f"bound), got {max_mask_seconds!r}")
        if max_slots is not None and kv_memory is not None:
            raise ValueError("give max_slots or kv_memory, not both")
        self.model, self.tokenizer = model, tokenizer
        self.policy = make_policy(policy, budget=budget, **policy_params)
        self.policy.validate(max_prompt_tokens, max_new_tokens, a.num_hidden_layers)
        if getattr(self.policy, "budget", None) is not None and self.policy.budget > ctx:
            raise ValueError(f"budget must be <= the model's context {ctx}, got {self.policy.budget}")
        self.policy_name = self.policy.name
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        self.capacities = self.policy.max_capacities(model, max_prompt_tokens, max_new_tokens)
        dtype = model.lm_head.weight.dtype
        self.device = model.lm_head.weight.device
        self.slot_kv_bytes = sum(2 * cap * a.num_key_value_heads * a.head_dim * dtype.itemsize
                                 for cap in self.capacities)
        if kv_memory is not None:
            total = parse_bytes(kv_memory)
            max_slots = total // self.slot_kv_bytes
            if max_slots < 1:
                raise ValueError(f"kv_memory={kv_memory!r} holds no slot: one slot of policy "
                                 f"{self.policy_name!r} needs {self.slot_kv_bytes} bytes of K/V")
        if max_slots is None:
            max_slots = 8
        if not _is_int(max_slots) or max_slots < 1:
            raise ValueError(f"max_slots must be an int >= 1, got {max_slots!r}")
        self.max_slots = max_slots
        self.cache = self.policy.build_cache(model, max_slots, max_prompt_tokens, max_new_tokens,
                                             capacities=self.capacities)
        self.cache.clear_rows(slice(None))
        self.eos_ids = frozenset(stop_token_ids(tokenizer, model))
        self.vocab_size = a.vocab_size
        self.context = ctx
        compile = self.device.type == "cuda" if compile is None else compile
        self._step_fn = compiled_decode(self.device) if compile else decode_one_token
        # a compiled prefill runs chunks of one shape: the last chunk padded, and never longer
        # than the longest prompt (a prompt within one chunk is then one padded chunk)
        self.compile_prefill = compile_prefill
        self._prefill_fn = compiled_prefill() if compile_prefill else None
        self._chunk = (min(prefill_chunk, max_prompt_tokens) if compile_prefill
                       else prefill_chunk)
        self._compiled = compile or compile_prefill   # the step's autograd mode (`grad_off`)

        S, dev = max_slots, self.device
        self._tok = torch.zeros(S, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(S, 1, dtype=torch.long, device=dev)
        self._active = torch.zeros(S, dtype=torch.bool, device=dev)
        self._temperature = torch.zeros(S, dtype=torch.float32, device=dev)
        self._top_k = torch.zeros(S, dtype=torch.long, device=dev)
        self._top_p = torch.ones(S, dtype=torch.float32, device=dev)
        self._seed = torch.zeros(S, dtype=torch.long, device=dev)
        self._steps = torch.zeros(S, dtype=torch.long, device=dev)

        self._shard = shard_of(model)
        self._slots: list[_Running | None] = [None] * S
        self._inbox: list[_Running] = []      # submitted since the last plan
        self._decoding: set[int] = set()      # slots whose request is decoding
        self._sampling: set[int] = set()      # decoding slots with temperature > 0 (host-side,
        self._sampling_rows: Tensor | None = None  # so an all-greedy step is one argmax)
        self._sampling_hint = None            # cut_hint of the sampling slots' settings
        self._logprob_slots: set[int] = set()  # decoding slots whose request wants logprobs
        self._adjust = SlotAdjustments(S, a.vocab_size, dev,  # penalties, logit_bias, min_tokens,
                                       next(model.parameters()).dtype,  # JSON mode
                                       json_vocab=self._json_vocab,
                                       max_mask_seconds=float(max_mask_seconds))
        self._json: JsonVocab | None = None
        self._latency = RequestLatency()
        self._prefilling: deque[int] = deque()  # slots whose prompt is being prefilled, oldest first
        self._waiting: deque[_Running] = deque()
        self._shared: _Prefilled | None = None  # a finished prefill that waiting requests share
        self._prefix = None if prefix_cache_memory is None else PrefixCache(prefix_limit)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False                  # the stop plan went out: no more steps
        self._counters = dict(tokens_generated_total=0, prompt_tokens_total=0,
                              requests_finished_total=0, requests_submitted_total=0,
                              decode_steps_total=0, prefill_chunks_total=0, prefills_shared_total=0,
                              prefix_cache_hits_total=0, prefix_cache_tokens_total=0,
                              structured_over_budget_total=0,
                              prefill_seconds_total=0.0, decode_seconds_total=0.0)

    # ------------------------------------------------------------------ public API
    def submit(self, prompt, params: SamplingParams | None = None) -> RequestHandle:
        """Queue one request (a list of token ids or a 1-D tensor); thread-safe. Raises
        ValueError for bad input and QueueFull when `max_waiting` requests are waiting."""
        return self._submit([prompt], [params], bounded=True)[0]

    def submit_many(self, prompts, params: SamplingParams | list | None = None) -> list[RequestHandle]:
        """Queue several requests at once, all or none (a server's batch of prompts); thread-safe.
        `params`: one SamplingParams for all, or one per prompt. Raises ValueError for bad input
        (naming the prompt's index) or for more prompts than `max_waiting`, and QueueFull when
        the waiting queue has no room for all of them now; either way nothing is queued."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: at least one prompt is needed")
        return self._submit(prompts, self._params_per_prompt(prompts, params), bounded=True)

    def generate(self, prompts, params: SamplingParams | list | None = None) -> list[list[int]]:
        """Generated token ids for each prompt, in order (more prompts than slots queue; the
        waiting bound does not apply). `params`: one SamplingParams for all, or one per prompt."""
        handles = self._submit(list(prompts), self._params_per_prompt(prompts, params), bounded=False)
        if self._thread is None:
            while not all(h.finished for h in handles):
                self.step()
        return [h.result() for h in handles]

    def start(self) -> "Engine":
        """Run the scheduler in a background thread (for servers)."""
        if self._thread is None:
            self._stopping = self._closed = False
            self._thread = threading.Thread(target=self._loop, name="flexkv-engine", daemon=True)
            self._thread.start()
        return self

    def follow(self) -> None:
        """Tensor parallel, ranks other than 0: run rank 0's scheduler plans until it shuts down
        (blocks; every request arrives through rank 0's `submit`)."""
        if not self._shard.active or self._shard.rank == 0:
            raise RuntimeError("Engine.follow() runs on ranks other than 0 of a tensor-parallel "
                               "model; rank 0 serves the requests (start() or generate())")
        while not self._closed:
            try:
                self.step()
            except Exception:  # noqa: BLE001 - rank 0 fails the same step; stay in step with it
                self._fail_all(traceback.format_exc())

    def shutdown(self) -> None:
        """Stop the background scheduler; unfinished requests end as "cancelled". Tensor parallel:
        rank 0's shutdown ends the other ranks' `follow()`."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif self._shard.active and self._shard.rank == 0 and not self._closed:
            self.step()   # the stop plan, for ranks in follow()
        with self._lock:
            pending = [*self._inbox, *self._waiting, *(r for r in self._slots if r is not None)]
            self._inbox.clear()
            self._waiting.clear()
        for r in pending:
            r.handle._finish("cancelled")
        for s in range(self.max_slots):
            if self._slots[s] is not None:
                self._free(s)

    def metrics(self) -> dict:
        """Gauges (running, prefilling, waiting, slots, KV bytes) and counters since the start:
        requests, tokens, decode steps and prefill chunks, and the scheduler's wall seconds in
        prefill chunks and in decode steps (sampling and token delivery included; a CUDA prefill
        chunk is synchronized before its time is read, so its kernels are not counted as the
        next decode step's). Their sum against elapsed time is how busy the engine was. Once a
        request asked for structured output: the masks computed, their seconds (the token
        tables' build included) and the masks kept; and always the structured requests ended
        for their masks' time (`structured_over_budget_total`)."""
        with self._lock:
            used = sum(r is not None for r in self._slots)
            out = dict(running=len(self._decoding), prefilling=len(self._prefilling),
                       waiting=len(self._waiting) + len(self._inbox),
                       slots_total=self.max_slots, slots_used=used,
                       kv_bytes_allocated=self.cache.kv_bytes(),
                       kv_bytes_held=used * self.slot_kv_bytes, **self._counters)
            if self._prefix is not None:
                out.update(prefix_cache_entries=len(self._prefix.entries),
                           prefix_cache_bytes=self._prefix.bytes)
            if self._json is not None:     # structured output's masks, on the engine's thread
                out.update(structured_masks_computed_total=self._json.masks_computed,
                           structured_mask_seconds_total=self._json.seconds,
                           structured_masks_kept=self._json.masks_kept)
        return out

    def latency_histograms(self) -> dict:
        """Time to first token, time per output token and end-to-end latency of the requests
        that finished normally (stop token or `max_tokens`), as histograms: name -> (help,
        {"buckets": [(upper bound s, cumulative count)], "sum", "count"}) (`flexkv.serve.metrics`)."""
        return self._latency.snapshot()

    def _json_vocab(self) -> JsonVocab:
        """Every token's bytes, for JSON mode (built at the first request that asks)."""
        if self._json is None:
            self._json = JsonVocab.from_tokenizer(self.tokenizer, self.vocab_size, self.device)
        return self._json

    # ------------------------------------------------------------------ validation / queueing
    def _check(self, prompt, params: SamplingParams) -> list[int]:
        if isinstance(prompt, Tensor):
            if prompt.dim() != 1 or prompt.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"prompt must be a 1-D integer tensor or a list of token ids, got a "
                                 f"{prompt.dtype} tensor of shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(_is_int(t) for t in prompt):
            raise ValueError("prompt must be a list of token ids (ints)")
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if not all(0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt: token ids must be in [0, {self.vocab_size - 1}]")
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(f"prompt is {len(prompt)} tokens; this engine accepts at most "
                             f"max_prompt_tokens={self.max_prompt_tokens}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate(self.max_new_tokens, self.vocab_size)
        if params.response_format != "text" and self.tokenizer is None:
            raise ValueError(f"response_format={params.response_format!r} needs the engine's "
                             "tokenizer (to know each token's bytes); this engine was built "
                             "without one")
        return list(prompt)

    @staticmethod
    def _params_per_prompt(prompts, params) -> list:
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"params: one SamplingParams per prompt ({len(prompts)}), got {len(params)}")
            return list(params)
        return [params] * len(prompts)

    def _submit(self, prompts: list, params: list, bounded: bool) -> list[RequestHandle]:
        """Validate every request, then queue them all under one lock (all or none)."""
        n = len(prompts)
        if bounded and n > self.max_waiting:
            raise ValueError(f"prompt: {n} prompts at once are more than the {self.max_waiting} "
                             f"requests that can wait (max_waiting); send fewer at a time")
        checked = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            sp = sp or SamplingParams()
            try:
                checked.append((self._check(prompt, sp), sp))
            except ValueError as e:
                raise (ValueError(f"{e} (prompt {i} of the {n})") if n > 1 else e) from None
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            waiting = len(self._waiting) + len(self._inbox)
            if bounded and waiting + n > self.max_waiting:
                more = f" and {n} more do not fit" if n > 1 else ""
                raise QueueFull(f"{waiting} requests are already waiting{more} "
                                f"(max_waiting={self.max_waiting}); retry later")
            reqs = [self._request(f"req-{next(self._ids)}", ids, sp) for ids, sp in checked]
            self._inbox.extend(reqs)
            self._counters["requests_submitted_total"] += n
            self._wake.notify_all()
        return [r.handle for r in reqs]

    def _request(self, request_id: str, prompt: list[int], params: SamplingParams) -> _Running:
        handle = RequestHandle(request_id, prompt, params)
        handle._on_cancel = self._poke
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        return _Running(handle, stops)

    def _poke(self) -> None:
        with self._lock:
            self._wake.notify_all()

    # ------------------------------------------------------------------ the scheduler
    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._prefilling or self._decoding)

    def _loop(self) -> None:
        if self.device.type == "cuda" and self._step_fn is not decode_one_token:
            cuda_graph_thread_state()  # torch 2.11: CUDA graphs in a thread of our own
        heartbeat = self.HEARTBEAT_S if self._shard.active else None
        while not self._closed:
            with self._lock:
                while not self._stopping and not self.has_work():
                    if not self._wake.wait(heartbeat) and heartbeat is not None:
                        break   # idle: an empty plan keeps the followers' broadcast alive
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failing step must not kill the server
                if self._stopping:
                    return      # e.g. another rank already gone at shutdown
                self._fail_all(traceback.format_exc())

    def _fail_all(self, error: str) -> None:
        for s, r in enumerate(self._slots):
            if r is not None:
                r.handle._finish("error", error)
                self._free(s)

    def step(self) -> None:
        """One scheduler iteration: the plan (new requests, cancellations), admission, one prefill
        chunk, one decode step. After the stop plan (shutdown) it does nothing."""
        with grad_off(self._compiled):
            self._step()

    def _step(self) -> None:
        if self._closed:
            return
        plan = self._plan()
        if plan.stop:
            self._closed = True
            return
        self._reap_cancelled(plan.cancel)
        self._admit()
        t0 = time.perf_counter()
        if self._prefill_one_chunk():
            if self.device.type == "cuda":   # the chunk's kernels are prefill time, not decode's
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            self._counters["prefill_seconds_total"] += t1 - t0
            t0 = t1
        if self._decoding:
            self._decode()                   # ends with a host read of the new tokens (a sync)
            self._counters["decode_seconds_total"] += time.perf_counter() - t0

    def _plan(self) -> _Plan:
        """This iteration's plan: rank 0's snapshot of what arrived since the last one, the same
        on every rank (broadcast under tensor parallelism); its requests join the waiting queue."""
        with self._lock:
            new, self._inbox = self._inbox, []
            live = [*self._waiting, *new, *(r for r in self._slots if r is not None)]
            plan = _Plan(new, frozenset(r.handle.request_id for r in live
                                        if r.handle._cancel_requested), self._stopping)
        if self._shard.active:
            plan = self._plan_of_rank0(plan)
        with self._lock:
            self._waiting.extend(plan.submit)
        return plan

    def _plan_of_rank0(self, mine: _Plan) -> _Plan:
        sent = ([(r.handle.request_id, r.handle.prompt, r.handle.params) for r in mine.submit],
                sorted(mine.cancel), mine.stop)
        submit, cancel, stop = self._shard.broadcast_object(sent, self.device)
        if self._shard.rank == 0:
            return mine
        # the same request submitted here too (the same generate() on every rank): keep its
        # handle, so that call returns; otherwise (a server's follower) a mirror of rank 0's
        local = {r.handle.request_id: r for r in mine.submit}
        reqs = []
        for rid, prompt, params in submit:
            r = local.pop(rid, None)
            if r is not None and r.handle.prompt != prompt:
                raise RuntimeError(f"request {rid}: rank {self._shard.rank} was given another "
                                   "prompt than rank 0 (call generate() with the same requests "
                                   "on every rank, or submit on rank 0 only)")
            reqs.append(r or self._request(rid, prompt, params))
        with self._lock:   # submitted here but not (yet) on rank 0: a later plan takes them
            self._inbox[:0] = local.values()
        return _Plan(reqs, frozenset(cancel), stop)

    def _reap_cancelled(self, cancel: frozenset) -> None:
        if not cancel:
            return
        with self._lock:
            gone = [r for r in self._waiting if r.handle.request_id in cancel]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            r.handle._finish("cancelled")
        for s, r in enumerate(self._slots):
            if r is not None and r.handle.request_id in cancel:
                r.handle._finish("cancelled")
                self._free(s)

    def _next_waiting(self) -> _Running | None:
        """The oldest waiting request that can start now (under the lock): one whose prompt is
        being prefilled for another request waits for that prefill, which it will share."""
        busy = {self._slots[s].prefill_key for s in self._prefilling}
        for i, r in enumerate(self._waiting):
            if r.prefill_key not in busy:
                del self._waiting[i]
                return r
        return None

    def _admit(self) -> None:
        while True:
            with self._lock:
                free = [s for s, r in enumerate(self._slots) if r is None]
                req = self._next_waiting() if free else None
                if req is None:
                    break
                slot = free[0]
                self._slots[slot] = req
            shared = self._shared
            if shared is not None and shared.serves(req):
                self._counters["prefills_shared_total"] += 1
                if shared.prompt_logprobs is not None:
                    req.handle.prompt_logprobs = list(shared.prompt_logprobs)
                self._start(slot, req, shared.scratch, shared.logits)
                continue
            h = req.handle
            ids = torch.tensor([h.prompt], dtype=torch.long, device=self.device)
            pos = torch.arange(len(h.prompt), device=self.device)[None]
            n_new = h.params.max_tokens
            req.scratch = self.policy.build_cache(self.model, 1, len(h.prompt), n_new,
                                                  capacities=self.capacities)
            scored = (None if h.params.prompt_logprobs is None
                      else lambda logits, start, req=req: self._prompt_logprobs(req, logits, start))
            req.prefill = Prefill(self.model, req.scratch, self.policy, ids, pos, self._chunk,
                                  n_new, pad=self.compile_prefill, run_chunk=self._prefill_fn,
                                  chunk_logits=scored)
            self._prefilling.append(slot)
        with self._lock:   # a kept prefill that no waiting request shares any more is dropped
            if self._shared is not None and not any(self._shared.serves(r) for r in self._waiting):
                self._shared = None

    def _prefill_one_chunk(self) -> bool:
        """The oldest prefilling request's next chunk (False: none is prefilling)."""
        if not self._prefilling:
            return False
        slot = self._prefilling[0]
        req = self._slots[slot]
        if self._prefix is not None and req.prefill.start == 0:
            self._resume_from_prefix(req)
        logits = req.prefill.step()
        self._counters["prefill_chunks_total"] += 1
        if logits is None:
            if self._prefix is not None:
                self._prefix.keep(req.handle.prompt, req.prefill.start, self._prefix_key(req),
                                  req.scratch)
            return True
        self._prefilling.popleft()
        scratch, req.prefill, req.scratch = req.scratch, None, None
        done = _Prefilled(req.prefill_key, req.handle.prompt, scratch, logits,
                          req.handle.prompt_logprobs)
        with self._lock:
            if any(done.serves(r) for r in self._waiting):   # kept for them
                done.logits = logits.clone()                  # (out of the chunk's logits)
                self._shared = done
        self._start(slot, req, scratch, logits)
        return True

    def _prefix_key(self, req: _Running) -> tuple:
        return self.policy.prefix_key(len(req.handle.prompt), req.handle.params.max_tokens)

    def _resume_from_prefix(self, req: _Running) -> None:
        """Before a prompt's first chunk: start from the longest kept prefix of it, if any (a
        request that wants prompt logprobs runs every chunk: their logits are not kept)."""
        if req.handle.params.prompt_logprobs is not None:
            return
        hit = self._prefix.longest(req.handle.prompt, req.prefill.chunk, self._prefix_key(req))
        if hit is None:
            return
        end, state = hit
        req.scratch.restore_row(state, 0)
        req.prefill.resume_at(end)
        self._counters["prefix_cache_hits_total"] += 1
        self._counters["prefix_cache_tokens_total"] += end

    def _start(self, slot: int, req: _Running, scratch: KVCache, logits: Tensor) -> None:
        """`req`'s prompt is prefilled (`scratch`'s row, the last logits [1, V]): copy the row into
        its slot and choose its first token, or, with `max_tokens=0`, finish it."""
        p, T = req.handle.params, req.handle.prompt_tokens
        self._counters["prompt_tokens_total"] += T
        if p.max_tokens == 0:          # prefill only (the prompt scored): nothing to generate
            req.handle._finish("length")
            self._latency.finished(req.handle)
            self._free(slot)
            return
        self.cache.copy_row(scratch, 0, slot)
        self._temperature[slot] = float(p.temperature)
        self._top_k[slot] = p.top_k
        self._top_p[slot] = float(p.top_p)
        seed = torch.tensor(p.seed if p.seed is not None else secrets.randbits(62),
                            device=self.device)
        self._seed[slot] = shard_of(self.model).broadcast(seed)  # tensor parallel: rank 0's seed
        self._steps[slot] = 0
        self._pos[slot, 0] = T
        sampling = p.temperature > 0
        row = torch.tensor([slot], device=self.device)
        self._adjust.admit(slot, p, req.handle.prompt, req.stop_ids)
        choose = self._adjust.choose_first(logits, slot)
        first = (self._sample(choose, row, cut_hint([p])) if sampling
                 else choose.argmax(dim=-1))
        self._adjust.record(first, slot)
        self._steps[slot] = 1
        self._tok[slot, 0] = first[0]
        self._decoding.add(slot)
        if sampling:
            self._sampling.add(slot)
            self._sampling_rows = None
        self._active[slot] = True
        lp = None
        if p.logprobs is not None:
            self._logprob_slots.add(slot)
            lp = self._logprobs(logits, first, [slot], [0])
        self._deliver({slot: int(first[0])}, lp)

    def _logprobs(self, logits: Tensor, tokens: Tensor, slots: list[int], rows: list[int]) -> dict:
        """slot -> (its token's logprob, [(token id, logprob)] of its request's k most likely),
        from `logits[rows]` and `tokens[rows]`."""
        idx = torch.tensor(rows, device=logits.device)
        ks = [self._slots[s].handle.params.logprobs for s in slots]
        return dict(zip(slots, logprob_entries(logits[idx], tokens[idx], ks)))

    def _prompt_logprobs(self, req: _Running, logits: Tensor, start: int) -> None:
        """A prefill chunk's logits [1, n, V] (prompt positions start .. start + n - 1): each
        position's entry for the prompt token after it, appended to the handle's."""
        h = req.handle
        m = min(logits.shape[1], len(h.prompt) - 1 - start)   # positions with a next prompt token
        if m > 0:
            target = torch.tensor(h.prompt[start + 1:start + 1 + m], device=logits.device)
            h.prompt_logprobs.extend(logprob_entries(logits[0, :m], target,
                                                     [h.params.prompt_logprobs] * m))

    def _sample(self, logits: Tensor, rows: Tensor, hint) -> Tensor:
        """The tokens of slots `rows` from their logits [len(rows), V]: `sample_slots` gives
        each row what it gives that row in any batch (greedy rows: the argmax); `hint`, the
        `cut_hint` of those requests' settings (known here), spares it work."""
        return sample_slots(logits, self._temperature[rows], self._top_k[rows], self._top_p[rows],
                            self._seed[rows], self._steps[rows], hint=hint)

    def _decode(self) -> None:
        logits = self._step_fn(self.model, self.cache, self.policy, self._tok, self._pos, self._active)
        # greedy slots need only the argmax; the sampler (a sort and a hash over the vocabulary
        # per row) runs on the sampling slots alone, which the host knows without a sync
        # (requests with penalties, logit_bias or min_tokens choose from adjusted logits)
        choose = self._adjust.choose_logits(logits)
        nxt = choose.argmax(dim=-1)
        if self._sampling:
            if self._sampling_rows is None:   # rebuilt only when the sampling slots change
                slots = sorted(self._sampling)
                self._sampling_rows = torch.tensor(slots, device=self.device)
                self._sampling_hint = cut_hint(self._slots[s].handle.params for s in slots)
            rows = self._sampling_rows
            nxt[rows] = self._sample(choose[rows], rows, self._sampling_hint)
        self._adjust.record(nxt)
        self._counters["decode_steps_total"] += 1
        self._tok.copy_(torch.where(self._active[:, None], nxt[:, None], self._tok))
        self._pos.add_(self._active[:, None].long())
        self._steps.add_(self._active.long())
        new = nxt.tolist()
        lp = None
        if self._logprob_slots:
            slots = sorted(self._logprob_slots)
            lp = self._logprobs(logits, nxt, slots, slots)
        self._deliver({s: new[s] for s in sorted(self._decoding)}, lp)

    def _deliver(self, tokens: dict[int, int], logprobs: dict | None = None) -> None:
        """Hand each slot's new token (and its logprobs, for the requests that asked) to its
        request; finish the ones that are done."""
        for slot, tok in tokens.items():
            req = self._slots[slot]
            h = req.handle
            if tok in req.stop_ids:
                h._finish("stop")
                self._latency.finished(h)
                self._free(slot)
                continue
            h._emit(tok, None if logprobs is None else logprobs.get(slot))
            self._adjust.advance(slot, tok)
            req.generated += 1
            self._adjust.produced(slot, req.generated)
            self._counters["tokens_generated_total"] += 1
            if req.generated >= h.params.max_tokens:
                h._finish("length")
            elif self._adjust.over_budget(slot):      # its schema's masks took too long
                h._finish("error", over_budget_error(self._adjust.max_mask_seconds))
                self._counters["structured_over_budget_total"] += 1
            else:
                continue
            self._latency.finished(h)
            self._free(slot)

    def _free(self, slot: int) -> None:
        """The request in `slot` is done: the row is emptied and the slot is free at once."""
        with self._lock:
            req = self._slots[slot]
            self._slots[slot] = None
            self._decoding.discard(slot)
            if slot in self._sampling:
                self._sampling.discard(slot)
                self._sampling_rows = None
            self._logprob_slots.discard(slot)
            self._adjust.free(slot)
            if slot in self._prefilling:
                self._prefilling.remove(slot)
            if req is not None:
                self._counters["requests_finished_total"] += 1
        self._active[slot] = False
        self.cache.clear_rows(slot)
