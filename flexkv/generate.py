"""Prefill + decode with a KV policy (gpt-fast style: `prefill` and `decode_one_token` are the
units; the latter is what `torch.compile` compiles, `fullgraph=True`, CUDA graphs on CUDA).

Sampling (temperature, top-k, top-p) and stopping run as tensor ops: no host sync per step
(the loop checks "all sequences stopped" once every `SYNC_EVERY` steps).
"""
from __future__ import annotations

import itertools
import os
import time
import types
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexkv import torch_fixes
from flexkv.attention import allow_recompiles
from flexkv.cache import KVCache
from flexkv.distributed import shard_of
from flexkv.policies import ChunkInfo, make_policy

SYNC_EVERY = 16


@dataclass
class GenerateOutput:
    tokens: Tensor                 # [B, T + N] prompt then generated (eos-filled after a stop)
    cache: KVCache
    policy: object
    prompt_len: int
    new_tokens: int                # decode steps actually run (+1 for the prefill's token)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    timings: dict = field(default_factory=dict)
    logits: Tensor | None = None   # [B, N, V] with output_logits=True ([B, n, V] with =n)

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1
        return steps * self.tokens.shape[0] / self.decode_s if self.decode_s > 0 and steps else float("nan")


# --------------------------------------------------------------------------- the compiled units
def decode_one_token(model, cache: KVCache, policy, token: Tensor, pos: Tensor,
                     active: Tensor) -> Tensor:
    """token, pos: [B, 1]; active: [B] bool (idle rows change nothing) -> next-token logits
    [B, V]. The unit `flexkv.generate` and the serving engine compile."""
    return model.decode(token, pos, cache, policy, active)[:, -1]


_COMPILED: dict[str, object] = {}


# On CUDA the decode step compiles with inductor's `coordinate_descent_tuning` (gpt-fast's
# setting): with it, inductor lowers a matmul with one row (at batch 1 every projection and the LM
# head) to a reduction of broadcast products, which it fuses with its neighbours (the RMSNorm
# before it, the residual add after it) and tunes, instead of calling cuBLAS's gemv
# (torch/_inductor/decomposition.py, `mm`: "Our matrix vector multiplies only achieve peak
# bandwidth with coordinate descent tuning"). The tuning benchmarks each distinct kernel once, so
# the first compile takes longer. `FLEXKV_COORDINATE_DESCENT=0` (or setting this to False before
# the first compile) keeps cuBLAS.
COORDINATE_DESCENT = os.environ.get("FLEXKV_COORDINATE_DESCENT", "1") != "0"


def decode_compile_options(device: torch.device | str) -> dict:
    """Inductor options of the compiled decode step: `mode="reduce-overhead"`'s (CUDA graphs) on
    CUDA, with `coordinate_descent_tuning` there (`COORDINATE_DESCENT`), and `reorder_for_locality`
    off. That pass moves each op down to just before its first user, so an attention output
    consumed only by `o_proj` is computed after the policy's eviction; a policy that writes V
    there (weightedkv's merge) then has V read after its write, and inductor copies the whole V
    out and back instead of writing one slot in place (bench/NOTES.md, session 15).
    `torch.compile(..., options=...)` takes no `mode` beside it."""
    from torch._inductor import list_mode_options

    cuda = torch.device(device).type == "cuda"
    opts = {**list_mode_options("reduce-overhead" if cuda else "default"),
            "reorder_for_locality": False}
    if cuda and COORDINATE_DESCENT:
        opts["coordinate_descent_tuning"] = True
    return opts


def grad_off(compiled: bool):
    """The autograd mode a step runs in: `no_grad` around compiled graphs (dynamo guards on
    the mode; nothing of inference mode was tried under CUDA graphs), `inference_mode` around
    eager steps, sparing their ~100 small ops a layer the autograd bookkeeping (version counters,
    view tracking): 5-8 % of a CPU decode step (bench/NOTES.md session 24)."""
    return torch.no_grad() if compiled else torch.inference_mode()


def compiled_decode(device: torch.device):
    options = decode_compile_options(device)
    key = f"{torch.device(device).type} {sorted(options.items())}"
    allow_recompiles()
    torch_fixes.apply()
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_one_token, fullgraph=True, dynamic=False,
                                       options=options)
    return _COMPILED[key]


def prefill_one_chunk(model, cache: KVCache, policy, input_ids: Tensor, pos: Tensor,
                      info: ChunkInfo) -> Tensor:
    """One prompt chunk through `cache` (input_ids, pos: [B, C]) -> the chunk's last logits
    [B, 1, V]. The unit the serving engine compiles (`compiled_prefill`) when asked to."""
    return model.prefill(input_ids, pos, cache, policy, info)


_ENGINE_IDS = itertools.count()


def compiled_prefill():
    """A new compiled `prefill_one_chunk` for one serving engine (`fullgraph=True`; no CUDA
    graphs: each request's scratch cache is a new allocation). It compiles once per
    `ChunkInfo.first` value, and, for the policies whose chunk reads the prompt length or the
    decode room (snapkv, pyramidkv, adakv, laprox), once more when those ints first change, after
    which dynamo treats them as symbolic (automatic dynamic): no recompile per prompt length.
    Tensor shapes never become symbolic: every tensor of a call is marked static (an engine's
    chunks all have the chunk's shape, `Prefill(pad=True)`, and its caches are static), and the
    function runs on a renamed copy of the code, so dynamo's per-function bookkeeping (which ints
    changed) is the engine's own, not shared with another engine of other sizes."""
    fn = prefill_one_chunk
    name = f"{fn.__name__}_engine{next(_ENGINE_IDS)}"
    names = dict(co_name=name, **({"co_qualname": name} if hasattr(fn.__code__, "co_qualname") else {}))
    own = types.FunctionType(fn.__code__.replace(**names), fn.__globals__, name)
    allow_recompiles()
    torch_fixes.apply()
    compiled = torch.compile(own, fullgraph=True, dynamic=None)

    def run_chunk(model, cache: KVCache, policy, input_ids: Tensor, pos: Tensor, info: ChunkInfo):
        for t in (input_ids, pos, *cache.buffers()):
            torch._dynamo.mark_static(t)
        return compiled(model, cache, policy, input_ids, pos, info)

    return run_chunk


def cuda_graph_thread_state() -> None:
    """Give the calling Python thread CUDA-graph trees' per-thread state, so that a compiled
    `reduce-overhead` step can first run in it (the serving engine's thread). torch 2.11 keeps
    its tree managers in a `threading.local` set only in the thread that imported
    `torch._inductor.cudagraph_trees` (and in autograd's threads), so the first call from any
    other thread fails an assertion (pytorch/pytorch#123177); later torch sets it up per thread
    on first use (pytorch/pytorch#184357, its `_initialize_tls`), which this does the same way.
    A no-op there and in a thread that already has the state."""
    import collections
    import threading

    from torch._inductor import cudagraph_trees as trees
    if hasattr(trees, "_initialize_tls") or hasattr(trees.local, "tree_manager_containers") \
            or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> tokens [B] without host sync (Gumbel/exponential race for sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def _agree(tokens: Tensor, model, temperature: float) -> Tensor:
    """Tensor parallel: every rank has the same full logits (the head on the all-reduced hidden
    state, replicated or vocab-parallel with the logits all-gathered), so greedy tokens agree;
    sampled ones are rank 0's (one RNG decides, whatever the other ranks' generators hold). A
    no-op on one rank."""
    shard = shard_of(model)
    return shard.broadcast(tokens) if shard.active and temperature > 0 else tokens


def _keep(logits: Tensor) -> Tensor:
    """A copy of step logits that survives the next CUDA-graph replay (fp32 or wider)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)


# --------------------------------------------------------------------------- validation
def _validate(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
              prefill_chunk, eos_token_id):
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a torch.LongTensor [B, T], got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids (int64/int32), got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 1-D [T] or 2-D [B, T], got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"input_ids must be a non-empty prompt (B >= 1, T >= 1), got shape {(B, T)}")
    dev = model.lm_head.weight.device
    if input_ids.device != dev:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {dev}; "
                         "move it with input_ids.to(model device)")
    V = model.args.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"input_ids must be token ids in [0, {V - 1}], got values in [{lo}, {hi}]")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    ctx = model.args.max_position_embeddings
    if T + max_new_tokens > ctx:
        raise ValueError(f"input_ids: prompt length + max_new_tokens must be <= the model's "
                         f"context {ctx}, got {T} + {max_new_tokens} = {T + max_new_tokens}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if eos_token_id is not None:
        ids = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
        if not isinstance(ids, (list, tuple)) or not ids or \
                not all(_is_int(i) and 0 <= i < V for i in ids):
            raise ValueError(f"eos_token_id must be None, an int or a non-empty list of ints in "
                             f"[0, {V - 1}], got {eos_token_id!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be None or an int >= 1, got {prefill_chunk!r}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, "
                             f"got {tuple(attention_mask.shape)}")
        m = attention_mask.to(torch.long)
        if bool(((m != 0) & (m != 1)).any()) or bool((m[:, 1:] < m[:, :-1]).any()):
            raise ValueError("attention_mask must be 0/1 with left padding only (0s then 1s per row)")
        if bool((m.sum(-1) == 0).any()):
            raise ValueError("attention_mask: every row needs at least one real token")
    return input_ids


def stop_token_ids(tokenizer, model) -> list[int]:
    """The eos ids named by the tokenizer and the model config (either may be a list)."""
    ids = set()
    for e in (getattr(tokenizer, "eos_token_id", None), getattr(model.args, "eos_token_id", None)):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return sorted(ids)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def positions(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """[B, T] original positions; left padding gets -1."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.arange(T, device=input_ids.device).expand(B, T).contiguous()
    m = attention_mask.to(torch.long).to(input_ids.device)
    return torch.where(m > 0, m.cumsum(-1) - 1, torch.full_like(m, -1))


# --------------------------------------------------------------------------- generate
class Prefill:
    """A prompt's prefill into `cache`, one chunk at a time (`chunk` tokens, None = one shot),
    the policy compressing after each chunk and `finish_prefill` after the last. `generate` runs
    it to the end; the serving engine runs one chunk between decode steps. What a chunk needs to
    know (first, last, prompt length) travels in a `ChunkInfo` through the model's forward.

    `pad=True` (a compiled prefill, `compiled_prefill`): every chunk has exactly `chunk` tokens,
    the last one left-padded (pad id 0, position -1, which no attention, score or cache row
    counts) and each passed as a [B, chunk] tensor of the same strides, so one compiled graph
    serves every prompt length. The chunk boundaries, and so what a compressing policy keeps,
    are those of the unpadded run. `run_chunk`: the function a chunk goes through
    (default `prefill_one_chunk`). `chunk_logits(logits, start)`, if given, is called after each
    chunk with the logits of every prompt position in it ([B, n, V] for positions start ..
    start + n - 1, padding left out): the prompt's own logprobs, as the model computed them with
    the cache it had at that chunk."""

    def __init__(self, model, cache: KVCache, policy, input_ids: Tensor, pos: Tensor,
                 chunk: int | None = None, max_new_tokens: int = 0, *, pad: bool = False,
                 run_chunk=None, chunk_logits=None):
        self.model, self.cache, self.policy = model, cache, policy
        self.input_ids, self.pos = input_ids, pos
        self.T = input_ids.shape[1]
        self.chunk = chunk or self.T
        self.max_new_tokens = max_new_tokens
        self.run_chunk = run_chunk or prefill_one_chunk
        self.chunk_logits = chunk_logits
        self.start = 0
        self.padded = None
        if pad:  # padded[0][i], padded[1][i]: chunk i's ids and positions, each [B, chunk]
            B, C = input_ids.shape[0], self.chunk
            n_pad = -self.T % C
            cut = self.T - self.T % C  # where the last chunk starts (it takes the padding)
            fill = (torch.zeros(B, n_pad, dtype=input_ids.dtype, device=input_ids.device),
                    torch.full((B, n_pad), -1, dtype=pos.dtype, device=pos.device))
            ids_pos = [torch.cat([x[:, :cut], f, x[:, cut:]], dim=1).split(C, dim=1)
                       for x, f in zip((input_ids, pos), fill)]
            # each chunk its own [B, C] tensor with standard strides (a view of the whole would
            # carry the prompt's length in its strides and base: one more graph per length)
            self.padded = [[torch.empty(B, C, dtype=x.dtype, device=x.device).copy_(x) for x in xs]
                           for xs in ids_pos]

    @property
    def done(self) -> bool:
        return self.start >= self.T

    def resume_at(self, start: int) -> None:
        """Skip the first `start` prompt tokens: `cache` already holds the state that running
        them gave (a chunk boundary before the last chunk: a multiple of `chunk` below T)."""
        if self.start != 0 or not (0 < start < self.T and start % self.chunk == 0):
            raise ValueError(f"resume_at: start must be a multiple of the chunk ({self.chunk}) in "
                             f"(0, {self.T}) before the first chunk runs, got {start}")
        self.start = start

    @torch.no_grad()
    def step(self) -> Tensor | None:
        """Run the next chunk; after the last one, the last position's logits [B, V]."""
        s, e = self.start, min(self.T, self.start + self.chunk)
        info = ChunkInfo(first=s == 0, last=e == self.T, prompt_len=self.T,
                         max_new_tokens=self.max_new_tokens, all_logits=self.chunk_logits is not None)
        if self.padded is None:
            ids, pos = self.input_ids[:, s:e], self.pos[:, s:e]
        else:
            ids, pos = self.padded[0][s // self.chunk], self.padded[1][s // self.chunk]
        logits = self.run_chunk(self.model, self.cache, self.policy, ids, pos, info)
        if self.chunk_logits is not None:
            self.chunk_logits(logits[:, logits.shape[1] - (e - s):], s)
        self.start = e
        if not self.done:
            return None
        self.policy.finish_prefill(self.cache, self.model)
        return logits[:, -1]


@torch.no_grad()
def prefill(model, cache: KVCache, policy, input_ids: Tensor, pos: Tensor, chunk: int | None = None,
            max_new_tokens: int = 0) -> Tensor:
    """Run the whole prompt through `cache`; returns the last position's logits [B, V]."""
    run = Prefill(model, cache, policy, input_ids, pos, chunk, max_new_tokens)
    logits = None
    while not run.done:
        logits = run.step()
    return logits


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int = 64, policy="full", budget=None,
             compile: bool = False, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id=None, prefill_chunk: int | None = None,
             generator: torch.Generator | None = None, attention_mask: Tensor | None = None,
             callback=None, reference: bool = False, forced_tokens: Tensor | None = None,
             output_logits: bool | int = False, cache_callback=None,
             **policy_params) -> GenerateOutput:
    """Greedy or sampled generation under a KV policy. See the README for the full contract.

    `callback(tokens)`, if given, is called with each new token tensor `[B]` (on the model's
    device) right after it is sampled: first the prefill's token, then one per decode step (after
    a sequence stops, its entries are eos-filled). It is for streaming: consuming the tensor on the
    host (`.tolist()`) forces a device sync per step, a cost paid only when a callback is passed.
    The timings then include the callback's time.

    `forced_tokens` [B, max_new_tokens] (teacher forcing, for streaming perplexity): the tokens
    fed back are these instead of sampled ones. `output_logits=True` keeps the logits that
    predicted each new token in `out.logits` [B, N, V] (fp32, or fp64 for fp64 models); an int
    `n` in [1, max_new_tokens] keeps only the first n ([B, min(n, N), V]: a check that reads a
    few steps of a long run need not hold a copy of every step's logits).
    `reference=True` runs the policy's eager reference (flexkv.reference) instead.
    `cache_callback(cache)`, if given, is called with the live cache at the same points as
    `callback` (after the prefill, then after every decode step): for watching what a policy
    keeps as it runs.
    Without `compile`, the prefill and the decode loop run under `torch.inference_mode()`
    (callbacks too): the returned tokens and logits are normal tensors, `out.cache` holds
    inference tensors (read them anywhere; change them in place only under inference mode).
    """
    input_ids = _validate(model, input_ids, attention_mask, max_new_tokens, temperature, top_k,
                          top_p, prefill_chunk, eos_token_id)
    pol = make_policy(policy, budget=budget, **policy_params)
    B, T = input_ids.shape
    if isinstance(output_logits, bool):
        n_logits = max_new_tokens if output_logits else 0
    elif _is_int(output_logits) and 1 <= output_logits <= max_new_tokens:
        n_logits = int(output_logits)
    else:
        raise ValueError(f"output_logits must be a bool or an int in [1, max_new_tokens = "
                         f"{max_new_tokens}] (the first steps whose logits are kept), "
                         f"got {output_logits!r}")
    if forced_tokens is not None and (forced_tokens.shape != (B, max_new_tokens)
                                      or forced_tokens.device != input_ids.device):
        raise ValueError(f"forced_tokens must be a [B, max_new_tokens] = {(B, max_new_tokens)} "
                         f"tensor on {input_ids.device}, got {tuple(forced_tokens.shape)}")
    pol.validate(T, max_new_tokens, model.args.num_hidden_layers)
    ctx = model.args.max_position_embeddings
    if getattr(pol, "budget", None) is not None and pol.budget > ctx:
        raise ValueError(f"budget must be <= the model's context {ctx}, got {pol.budget}")
    if reference:
        if compile:
            raise ValueError("compile must be False with reference=True (the references are eager)")
        if shard_of(model).active:
            raise ValueError("reference=True needs a single-process model (the eager references "
                             "know nothing of tensor parallelism); load it with tp=False")
        from flexkv.reference import reference_for
        pol = reference_for(pol)
    with grad_off(compile):
        dev = input_ids.device
        eos = None
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            eos = torch.tensor(ids, device=dev)

        cache = pol.build_cache(model, B, T, max_new_tokens)
        pos = positions(input_ids, attention_mask)
        sync = dev.type == "cuda"
        active = torch.ones(B, dtype=torch.bool, device=dev)

        t0 = time.perf_counter()
        logits = prefill(model, cache, pol, input_ids, pos, prefill_chunk, max_new_tokens)
        kept_logits = [_keep(logits)] if n_logits else None
        tok = _agree(sample(logits, temperature, top_k, top_p, generator), model, temperature)
        if forced_tokens is not None:
            tok = forced_tokens[:, 0]
        if sync:
            torch.cuda.synchronize()
        t1 = time.perf_counter()

        out = torch.empty(B, T + max_new_tokens, dtype=input_ids.dtype, device=dev)
        out[:, :T] = input_ids
        out[:, T] = tok
        if callback is not None:
            callback(tok)
        if cache_callback is not None:
            cache_callback(cache)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        fill = eos[0] if eos is not None else None
        if eos is not None:
            done = torch.isin(tok, eos)
        step_fn = compiled_decode(dev) if compile else decode_one_token
        cur = pos[:, -1:] + 1  # [B, 1]
        n = 1
        for i in range(1, max_new_tokens):
            if eos is not None and i % SYNC_EVERY == 0 and bool(done.all()):
                break
            logits = step_fn(model, cache, pol, tok[:, None], cur, active)
            nxt = _agree(sample(logits, temperature, top_k, top_p, generator), model, temperature)
            if forced_tokens is not None:
                nxt = forced_tokens[:, i]
            if i < n_logits:
                kept_logits.append(_keep(logits))
            if eos is not None:
                nxt = torch.where(done, fill, nxt)
                done = done | torch.isin(nxt, eos)
            out[:, T + i] = nxt
            if callback is not None:
                callback(nxt)
            if cache_callback is not None:
                cache_callback(cache)
            tok, cur = nxt, cur + 1
            n += 1
        if sync:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if n < max_new_tokens:
            out = out[:, :T + n]
        res = GenerateOutput(out, cache, pol, T, n, t1 - t0, t2 - t1)
        if n_logits:
            res.logits = torch.stack(kept_logits, dim=1)
    # what callers keep (tokens into a model under autograd, logits into a loss) as normal
    # tensors: an inference tensor cannot be saved for backward
    if res.tokens.is_inference():
        res.tokens = res.tokens.clone()
        res.logits = res.logits.clone() if n_logits else None
    return res
