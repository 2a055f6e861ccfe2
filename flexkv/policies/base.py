"""The policy plumbing shared by every KV policy (kvpress-style base).

A policy is a small dataclass of hyperparameters that declares the statistics it keeps in the
cache (`stats`) and overrides a few pure tensor hooks:

- `capacity(layer, prompt_len, max_new)`: static slots per layer (`budget + 1` for decode-time
  eviction, `budget + max_new` for prefill-only selection, everything for `full`).
- `prefill_scores(ctx)`: per-token statistics after a prefill chunk's attention.
- `prefill_priority(ctx)`: which tokens survive prefill (higher = keep; `+inf` protected).
- `decode_scores(ctx)` / `decode_victim_score(ctx)`: the per-step statistic update and the
  eviction score (lowest is evicted; `+inf` protected; ties go to the lower position).

The base does the rest: concatenating the cache with the new chunk, attention, the top-k store,
writing the new token into a free slot, and evicting while `retained > budget`, all with tensor
indices and no host sync.

Every policy that evicts at decode also takes `prefill_only=True`: its selection compresses the
prompt (every chunk, as usual), then decode appends each new token and evicts nothing, as
kvpress's presses do (StreamingLLMPress, TOVAPress, KeyDiffPress, ...); decode then computes no
statistics and no attention probabilities for the policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor

from flexkv import attention
from flexkv.cache import KVCache, LayerCache
from flexkv.distributed import SINGLE, Shard

INF = float("inf")


@dataclass(frozen=True)
class ChunkInfo:
    """What a prefill chunk needs to know about the prompt it belongs to: passed explicitly
    through the model's forward (never stored on cache modules), so one serving slot can be
    prefilled while the others hold their state."""
    first: bool = True         # the first chunk: the cache rows hold nothing yet
    last: bool = True          # the prompt's final chunk
    prompt_len: int = 0        # the whole prompt's length T (padded length for a batch)
    max_new_tokens: int = 0    # decode steps the cache must leave room for
    all_logits: bool = False   # the model returns every position's logits, not the last one's


@dataclass
class PrefillContext:
    """What a policy sees after a prefill chunk's attention (one layer). N = cached + chunk."""
    layer: int
    q: Tensor            # [B, H, Tq, D] chunk queries
    k: Tensor            # [B, Hkv, N, D] cached keys then the chunk's
    v: Tensor            # [B, Hkv, N, D]
    pos: Tensor          # [B, Hkv, N] original positions (-1 empty / padding)
    q_pos: Tensor        # [B, Tq]
    lse: Tensor | None   # [B, H, Tq] log-sum-exp of each query's scores (if needs_lse)
    stats: dict          # name -> [B, Hkv, N], the cached statistics then zeros
    window: int | None   # the model's sliding window
    attn: object         # the model's Attention module (o_proj for output-aware scores)
    info: ChunkInfo      # first / last chunk, prompt length, decode room
    budget: Tensor       # [B, Hkv] tokens to keep

    @property
    def shard(self) -> Shard:
        """Tensor parallel: this rank's part (Hkv above are its heads); `sum_heads` /
        `gather_heads` for decisions that span the layer's heads (no-ops on one rank)."""
        return getattr(self.attn, "shard", SINGLE)


@dataclass
class DecodeContext:
    layer: int
    lc: LayerCache
    q: Tensor            # [B, H, 1, D]
    o: Tensor            # [B, H, 1, D] attention output (before o_proj)
    probs: Tensor | None  # [B, Hkv, G, S] attention probabilities (if needs_decode_probs)
    slot: Tensor         # [B, Hkv] slot the new token was written to
    q_pos: Tensor        # [B, 1] position of the new token
    attn: object
    active: Tensor       # [B] bool: rows that decode this step (an idle row changes nothing)

    @property
    def shard(self) -> Shard:
        """Tensor parallel: this rank's part (see PrefillContext.shard)."""
        return getattr(self.attn, "shard", SINGLE)

    def update(self, buf: Tensor, new: Tensor) -> None:
        """`buf[b] = new[b]` for the active rows only (a statistic update; no host sync)."""
        buf.copy_(torch.where(self.active.view(-1, *([1] * (buf.dim() - 1))), new, buf))


@dataclass
class Policy:
    budget: int | None = None
    # compress the prompt only, then append every decode token (for decode-time policies)
    prefill_only: bool = field(default=False, kw_only=True)

    name: ClassVar[str] = "base"
    stats: ClassVar[dict[str, torch.dtype | None]] = {}  # None: fp32 (fp64 for fp64 models)
    needs_decode_probs: ClassVar[bool] = False
    needs_lse: ClassVar[bool] = False
    decode_evicts: ClassVar[bool] = True  # the method evicts at decode (see `evicts_at_decode`)

    @property
    def evicts_at_decode(self) -> bool:
        """Whether this instance evicts at decode: the method does and `prefill_only` is off."""
        return self.decode_evicts and not self.prefill_only

    # ------------------------------------------------------------------ construction
    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]

    def validate(self, prompt_len: int, max_new_tokens: int, n_layers: int) -> None:
        """Raise ValueError for a budget the policy cannot honour (before any work starts)."""
        self.validate_prefill_only()
        if self.budget is None:
            raise ValueError(f"budget is required for policy {self.name!r} (an int >= 1)")
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ValueError(f"budget must be an int >= 1, got {self.budget!r}")
        min_b = self.min_budget()
        if self.budget < min_b:
            raise ValueError(f"budget must be >= {min_b} for policy {self.name!r} "
                             f"({self.protected_desc()}), got {self.budget}")

    def validate_prefill_only(self) -> None:
        if not isinstance(self.prefill_only, bool):
            raise ValueError(f"prefill_only must be True or False, got {self.prefill_only!r}")
        if self.prefill_only and not self.decode_evicts:
            raise ValueError(f"prefill_only=True applies to a policy that evicts at decode "
                             f"(streaming, h2o, tova, keydiff, weightedkv, cam); {self.name!r} "
                             f"evicts nothing at decode already")

    def min_budget(self) -> int:
        return 1

    def protected_desc(self) -> str:
        return "no protected tokens"

    def effective(self, prompt_len: int, max_new_tokens: int) -> bool:
        """False when the budget holds everything: the policy then behaves exactly like full."""
        return self.budget is not None and self.budget < prompt_len + max_new_tokens

    def prefix_key(self, prompt_len: int, max_new_tokens: int) -> tuple:
        """What a prefill's cache after a chunk that is not the prompt's last depends on, besides
        the tokens up to that chunk's end, the chunk length and the slot capacities: requests with
        equal keys whose prompts agree up to a chunk boundary hold the same cache there (the
        same positions, the same K, V and statistics in every held slot, every other buffer
        equal, bit for bit), so the serving engine's prefix cache may resume one from the
        other's state. The default, the prompt length and `max_new_tokens`, is safe for any policy (the
        prefill-only selections size their keep counts from the whole prompt). A decode-time
        policy's chunks keep the best `budget` tokens seen so far whatever follows: only whether
        the budget binds at all sets its cache's budgets. Checked for every policy and parameter
        variant in tests/test_prefix_cache.py."""
        if self.decode_evicts:
            return (self.effective(prompt_len, max_new_tokens),)
        return (prompt_len, max_new_tokens)

    def capacity(self, layer: int, prompt_len: int, max_new_tokens: int) -> int:
        if not self.effective(prompt_len, max_new_tokens):
            return prompt_len + max_new_tokens
        if self.evicts_at_decode:
            return self.budget + 1
        return min(self.budget, prompt_len) + max_new_tokens

    def layer_budget(self, layer: int, prompt_len: int, max_new_tokens: int, capacity: int):
        """Tokens kept between decode steps: an int or a [B, Hkv] tensor."""
        if not self.effective(prompt_len, max_new_tokens) or not self.evicts_at_decode:
            return capacity
        return capacity - 1

    def bind_model(self, model) -> None:
        """Record what the policy needs of the model's shape (layers, KV heads) before any
        capacity is computed; called by `build_cache` and `max_capacities`."""

    def max_capacities(self, model, max_prompt_len: int, max_new_tokens: int) -> list[int]:
        """Per layer, the slots that hold any prompt of at most `max_prompt_len` tokens plus
        `max_new_tokens` (a serving engine's static slot size). Capacities grow with the prompt
        for every built-in policy but pyramidkv, which overrides this."""
        self.bind_model(model)
        return [self.capacity(l, max_prompt_len, max_new_tokens)
                for l in range(model.args.num_hidden_layers)]

    def build_cache(self, model, batch: int, prompt_len: int, max_new_tokens: int,
                    capacities: list[int] | None = None) -> KVCache:
        """Static caches for `batch` rows of a `prompt_len`-token prompt and `max_new_tokens`
        decode steps; `capacities` (per layer) overrides the slot counts, e.g. a serving
        engine's `max_capacity` so a request's cache row fits the engine's slots."""
        a = model.args
        dtype = model.lm_head.weight.dtype
        device = model.lm_head.weight.device
        stat_dtype = torch.promote_types(dtype, torch.float32)  # statistics never below fp32
        stats = {n: (stat_dtype if d is None else d) for n, d in self.stats.items()}
        layers = []
        for l in range(a.num_hidden_layers):
            cap = (self.capacity(l, prompt_len, max_new_tokens) if capacities is None
                   else capacities[l])
            layers.append(LayerCache(batch, a.num_key_value_heads, cap, a.head_dim, dtype=dtype,
                                     device=device, stats=stats,
                                     budget=self.layer_budget(l, prompt_len, max_new_tokens, cap)))
        return KVCache(layers)

    # ------------------------------------------------------------------ hooks
    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        return ctx.stats

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        """Higher = keep. Default: most recent tokens."""
        return ctx.pos.to(torch.float32)

    def decode_scores(self, ctx: DecodeContext) -> None:
        """Update the cached statistics in place after the step's attention."""

    def decode_victim_score(self, ctx: DecodeContext) -> Tensor:
        """[B, Hkv, S]; the lowest valid slot is evicted; +inf protects."""
        return ctx.lc.pos.to(torch.float32)

    def decode_after(self, ctx: DecodeContext) -> None:
        """Runs after eviction (merging policies, modifiers)."""

    def finish_prefill(self, cache: KVCache, model) -> None:
        """After the whole prompt (global selections across layers)."""

    def bias(self, lc: LayerCache) -> Tensor | None:
        return None

    def decode_bias(self, lc: LayerCache) -> Tensor | None:
        """Per-slot attention-score bias [B, Hkv, S] at decode (default `bias(lc)`; a policy whose
        `bias` is a parameter, e.g. the merging policies' `bias="log_mass"`, overrides this)."""
        return self.bias(lc)

    def prefill_bias(self, pos: Tensor, stats: dict) -> Tensor | None:
        """Per-token attention-score bias [B, Hkv, N] over the cached + chunk tokens at prefill."""
        return None

    def decode_evict(self, ctx: DecodeContext, victim: Tensor, when: Tensor) -> None:
        """Evict slot `victim` [B, Hkv] where `when` [B, Hkv] holds (merging policies fold the
        victim's value into other slots first, under the same `when`; no host sync)."""
        ctx.lc.evict(victim, when)

    # ------------------------------------------------------------------ prefill plumbing
    def prefill_layer(self, attn, lc: LayerCache, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
                      info: ChunkInfo) -> Tensor:
        """One layer of a prefill chunk: attend over the cached tokens then the chunk's, score,
        keep the best in `lc`. On the first chunk the cache holds nothing, so it is not
        concatenated (its empty slots would only be masked out)."""
        B, n_kv, T, _ = k.shape
        new_pos = q_pos[:, None, :].expand(B, n_kv, T)
        zeros = {n: torch.zeros(B, n_kv, T, dtype=getattr(lc, n).dtype, device=k.device)
                 for n in lc.stat_names}
        if info.first:
            K, V, P, stats = k, v, new_pos, zeros
        else:
            K = torch.cat([lc.k, k], dim=2)
            V = torch.cat([lc.v, v], dim=2)
            P = torch.cat([lc.pos, new_pos], dim=2)
            stats = {n: torch.cat([getattr(lc, n), zeros[n]], dim=2) for n in lc.stat_names}
        res = attention.prefill_attention(q, K, V, q_pos, P, window=attn.window,
                                          return_lse=self.needs_lse, bias=self.prefill_bias(P, stats),
                                          keys_end_with_queries=True)   # [cached slots | chunk]
        o, lse = res if self.needs_lse else (res, None)
        budget = lc.budget
        if self.decode_evicts and self.prefill_only:  # lc.budget (capacity) bounds the appended
            budget = budget.clamp(max=self.budget)    # tokens too: the prompt keeps `budget`
        ctx = PrefillContext(attn.layer_idx, q, K, V, P, q_pos, lse, stats, attn.window, attn,
                             info, budget)
        ctx.stats = self.prefill_scores(ctx)
        self.store(lc, ctx)
        return o

    def store(self, lc: LayerCache, ctx: PrefillContext) -> None:
        """Keep the `budget` highest-priority valid tokens per head (a top-k, no host sync)."""
        N = ctx.pos.shape[-1]
        prio = self.prefill_priority(ctx).masked_fill(ctx.pos < 0, -INF)
        # ties toward the higher position survive (so the lower one is evicted)
        order = _stable_desc(prio, ctx.pos)
        n = min(N, lc.capacity)
        idx = order[..., :n]
        rank = torch.arange(n, device=idx.device)
        pos = ctx.pos.gather(2, idx)
        pos = torch.where((rank < ctx.budget[..., None]) & (pos >= 0), pos, -1)
        gidx = idx[..., None].expand(-1, -1, -1, ctx.k.shape[-1])
        lc.load(ctx.k.gather(2, gidx), ctx.v.gather(2, gidx), pos,
                {n_: s.gather(2, idx) for n_, s in ctx.stats.items()})

    # ------------------------------------------------------------------ decode plumbing
    def decode_layer(self, attn, lc: LayerCache, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
                     active: Tensor) -> Tensor:
        """One layer of a decode step for every row; `active` [B] bool: an idle row (a free
        serving slot) writes nothing, scores nothing and evicts nothing. A row without a free
        slot never overwrites a kept token (the write is gated by `free_slot`'s flag; the
        capacities make that case impossible for an admitted request)."""
        act = active[:, None]                                           # [B, 1]
        slot, has_free = lc.free_slot()
        lc.write(slot, k, v, q_pos, when=has_free & act)
        evicts = self.evicts_at_decode
        o, probs = attention.decode_attention(q, lc.k, lc.v, lc.pos, q_pos, window=attn.window,
                                              bias=self.decode_bias(lc),
                                              need_probs=self.needs_decode_probs and evicts)
        # an idle row may hold no token at all (all scores -inf): its output is 0, never NaN
        o = torch.where(active.view(-1, 1, 1, 1), o, 0.0)
        ctx = DecodeContext(attn.layer_idx, lc, q, o, probs, slot, q_pos, attn, active)
        if self.decode_evicts and not evicts:  # prefill_only: decode appends, nothing more
            return o
        self.decode_scores(ctx)
        if evicts:
            score = self.decode_victim_score(ctx)
            valid = lc.pos >= 0                                         # [B, Hkv, S]
            victim = lowest(score, lc.pos, valid)
            self.decode_evict(ctx, victim, (valid.sum(-1) > lc.budget) & act)
        self.decode_after(ctx)
        return o


def _stable_desc(prio: Tensor, pos: Tensor) -> Tensor:
    """Indices sorting `prio` descending, ties by higher position first. [B, Hkv, N]."""
    by_pos = pos.argsort(dim=-1, descending=True, stable=True)
    p = prio.gather(-1, by_pos)
    o = p.argsort(dim=-1, descending=True, stable=True)
    return by_pos.gather(-1, o)


def lowest(score: Tensor, pos: Tensor, valid: Tensor | None = None) -> Tensor:
    """argmin of `score` over valid slots (`valid`: `pos >= 0`, if the caller has it), ties
    toward the lower position. [B, Hkv]. (A row with no valid slot gets slot 0.)"""
    if valid is None:
        valid = pos >= 0
    s = torch.where(valid, score, INF)
    big = torch.iinfo(pos.dtype).max
    pos_key = torch.where(valid, pos, big)   # an invalid slot never wins, even at s == m == inf
    return pos_key.masked_fill(s != s.amin(dim=-1, keepdim=True), big).argmin(dim=-1)
