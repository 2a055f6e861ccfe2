"""`snapkv` (SnapKV, Li et al. 2024): keep what the prompt's last queries attend to.

Prefill only (`decode_evicts=False`): decode appends every new token without eviction, so each
layer holds `min(budget, T) + max_new_tokens` slots. If the prompt has more than `budget` tokens:
the observation window is the last `window` queries; `A = softmax(Q_win K^T / sqrt(d))`, causal
inside the window (`scores.window_probs`); `s_j = sum over the window of the group-mean attention`
for the tokens outside the window (window tokens count 0, so they do not leak into the pooling);
`s` is pooled over the order of positions (`pool`, `kernel`, stride 1, padding kernel // 2, the
zero padding counted in the average; `scores.pool_over_positions`); keep the top
`budget - window` by pooled `s` plus the window. Ties keep the higher position (evict the older).

Parameters: `budget` (C), `window` (w, default 32; 1 <= w < C), `kernel` (odd, >= 1, default 5;
1 = no pooling), `pool` ("avg" default, or "max").
Defaults are the authors' code (FasterDecoding/SnapKV, `init_snapkv`: window 32, kernel 5,
`avgpool`). kvpress's SnapKVPress uses window 64, kernel 5, avg (`window=64, kernel=5` here; it
pools per query head before the group mean, the same thing for an average); AdaKV's code max-pools
with kernel 7 (`AdaKV` keeps those defaults).

*(choice: chunked prefill)* the same selection runs after every prefill chunk over the tokens
held (the previous selection + the chunk), scored by THAT chunk's last `window` queries (all of
them if the chunk is shorter); the last `window` positions seen so far are protected. One-shot
prefill is the paper's method exactly.

`PyramidKV` and `AdaKV` reuse this scoring and override `prefill_keep` (per-layer slots) and
`prefill_budget` (per-head tokens kept by each selection).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.cache import LayerCache
from flexkv.distributed import kv_heads_total
from flexkv.policies.base import INF, Policy, PrefillContext
from flexkv.policies.registry import register
from flexkv.policies.scores import last_position, pool_over_positions, recent_mask, window_probs

POOLS = ("avg", "max")


@register
@dataclass
class SnapKV(Policy):
    window: int = 32
    kernel: int = 5
    pool: str = "avg"  # "avg" or "max"
    # the model's shape, recorded by build_cache (per-layer / per-head budgets need it)
    n_layers: int = field(default=1, init=False, repr=False, compare=False)
    n_kv_heads: int = field(default=1, init=False, repr=False, compare=False)

    name: ClassVar[str] = "snapkv"
    decode_evicts: ClassVar[bool] = False

    # ------------------------------------------------------------------ validation
    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"window must be an int >= 1 (and < budget), got {self.window!r}")
        if not _is_int(self.kernel) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd int >= 1 (1, 3, 5, 7, ...), got {self.kernel!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def min_budget(self) -> int:
        return self.window + 1

    def protected_desc(self) -> str:
        return f"budget must exceed window={self.window}"

    # ------------------------------------------------------------------ static slots
    def prefill_keep(self, layer: int, prompt_len: int) -> int:
        """Most tokens one head of `layer` holds after the prompt (before decode appends)."""
        return min(self.budget, prompt_len)

    def capacity(self, layer: int, prompt_len: int, max_new_tokens: int) -> int:
        if not self.effective(prompt_len, max_new_tokens):
            return prompt_len + max_new_tokens
        return self.prefill_keep(layer, prompt_len) + max_new_tokens

    def prefix_key(self, prompt_len: int, max_new_tokens: int) -> tuple:
        """A chunk keeps `prefill_keep` of the whole prompt per layer: requests agreeing on it
        have the same cache after a shared chunk-aligned prefix (see Policy.prefix_key)."""
        return tuple(self.prefill_keep(l, prompt_len) for l in range(self.n_layers))

    def build_cache(self, model, batch: int, prompt_len: int, max_new_tokens: int,
                    capacities: list[int] | None = None):
        self.bind_model(model)
        return super().build_cache(model, batch, prompt_len, max_new_tokens, capacities)

    def bind_model(self, model) -> None:
        self.n_layers = model.args.num_hidden_layers
        self.n_kv_heads = kv_heads_total(model)  # every rank's, under tensor parallelism

    # ------------------------------------------------------------------ scoring
    def protected(self, ctx: PrefillContext) -> Tensor:
        """[B, Hkv, N] the last `window` positions seen (never evicted)."""
        return recent_mask(ctx.pos, last_position(ctx.q_pos), self.window)

    def window_scores(self, ctx: PrefillContext) -> Tensor:
        """Pooled SnapKV scores [B, Hkv, N] (0 for window tokens and empty slots)."""
        probs = window_probs(ctx.q, ctx.k, ctx.q_pos, ctx.pos, self.window, ctx.window)
        attn_sum = probs.sum(dim=3).mean(dim=2)  # [B, Hkv, G, w, N] -> [B, Hkv, N]
        attn_sum = attn_sum.masked_fill(self.protected(ctx), 0.0)
        return pool_over_positions(attn_sum, ctx.pos, self.kernel, self.pool)

    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        # carried in ctx.stats for prefill_priority / prefill_budget; not a cached statistic
        return dict(ctx.stats, snapkv=self.window_scores(ctx))

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        return torch.where(self.protected(ctx), INF, ctx.stats["snapkv"])

    def prefill_budget(self, lc: LayerCache, ctx: PrefillContext) -> Tensor:
        """[B, Hkv] tokens each head keeps after this chunk's selection: the layer's share of
        the prompt (`prefill_keep` of the whole prompt's length, from the chunk's ChunkInfo)."""
        return torch.full_like(ctx.budget, self.prefill_keep(ctx.layer, ctx.info.prompt_len))

    def store(self, lc: LayerCache, ctx: PrefillContext) -> None:
        # lc.budget (= capacity) bounds the prompt AND the appended tokens; a selection keeps less
        ctx.budget = self.prefill_budget(lc, ctx)
        super().store(lc, ctx)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
