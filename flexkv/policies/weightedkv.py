"""`weightedkv` (WeightedKV, Yuan et al. 2025): drop a key, merge its value into a neighbour.

Score: average attention `a_j = S_j / c_j`, with `S_j` the cumulative group-mean attention token j
received (prefill column sums over the prompt's queries, computed from FlexAttention's LSE, then
`+= probs` every decode step; statistic `score`) and `c_j` the number of (real) queries that have
attended to it. With causal attention every query from `pos_j` on sees j, so
`c_j = last - pos_j + 1`, capped at the model's sliding window W when it has one (queries further
than W away do not see j): `c_j = min(W, last - pos_j + 1)`. c is derived from `pos`, not stored.

Protected: the `n_sink` first positions (default 0) and the `window` most recent (default 32);
`window < budget - n_sink`.
Decode: `j* = argmin a` among the unprotected tokens (ties: lower position); its key is dropped
and its value is merged into its neighbour m, the kept token with the next larger position (the
next smaller one if none): `v_m <- (a_j* v_j* + a_m v_m) / (a_j* + a_m)`; `S_m` and `c_m` are
unchanged *(choice)*.
Prefill (one-shot, and after each chunk of a chunked prefill): keep the protected tokens plus the
top `budget - protected` others by `a` (ties: higher position survives); every evicted token merges
into the next surviving token by position in one batch:
`v_m <- (sum_j a_j v_j + a_m v_m) / (sum_j a_j + a_m)` *(choice)*; evicted tokens after the last
survivor would merge into the previous survivor *(choice; it cannot happen while window >= 1)*.
If all weights of a merge are 0 (attention underflow) `v_m` is left unchanged *(choice)*.
`bias="log_mass"`: proportional attention over the merged slots (flexkv.policies.merging).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.policies.base import INF, DecodeContext, PrefillContext
from flexkv.policies.merging import (CumulativeAttention, MergingPolicy, kept_mask,
                                     merge_targets, next_kept_slot)
from flexkv.policies.registry import register
from flexkv.policies.scores import last_position, recent_mask


def seen_count(pos: Tensor, last: Tensor, model_window: int | None) -> Tensor:
    """Queries (positions pos..last) that attended to each token: [B, Hkv, N]; last: [B, 1]."""
    c = (last[:, :, None] - pos + 1).clamp(min=1)
    return c if model_window is None else c.clamp(max=model_window)


@register
@dataclass
class WeightedKV(CumulativeAttention, MergingPolicy):
    window: int = 32
    n_sink: int = 0

    name: ClassVar[str] = "weightedkv"

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0, got {self.n_sink!r}")
        if isinstance(self.budget, int) and self.window >= self.budget - self.n_sink:
            raise ValueError(f"window must be < budget - n_sink = {self.budget - self.n_sink}, "
                             f"got window={self.window}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def min_budget(self) -> int:
        return self.window + self.n_sink + 1

    def protected_desc(self) -> str:
        return f"budget must exceed window + n_sink = {self.window + self.n_sink}"

    def _protected(self, pos: Tensor, last: Tensor) -> Tensor:
        return recent_mask(pos, last, self.window) | ((pos >= 0) & (pos < self.n_sink))

    def _avg(self, score: Tensor, pos: Tensor, last: Tensor, model_window) -> Tensor:
        return score / seen_count(pos, last, model_window)

    # ------------------------------------------------------------------ prefill
    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        last = last_position(ctx.q_pos)
        avg = self._avg(ctx.stats["score"], ctx.pos, last, ctx.window)
        return torch.where(self._protected(ctx.pos, last), INF, avg)

    def store(self, lc, ctx: PrefillContext) -> None:
        keep = kept_mask(self.prefill_priority(ctx), ctx.pos, ctx.budget)      # [B, Hkv, N]
        target = merge_targets(ctx.pos, keep)                                  # [B, Hkv, N]
        avg = self._avg(ctx.stats["score"], ctx.pos, last_position(ctx.q_pos), ctx.window)
        weight = torch.where(ctx.pos >= 0, avg, 0.0)
        num = torch.zeros_like(ctx.v, dtype=weight.dtype).scatter_add_(
            2, target[..., None].expand_as(ctx.v), weight[..., None] * ctx.v.to(weight.dtype))
        den = torch.zeros_like(weight).scatter_add_(2, target, weight)
        merged_v = torch.where((keep & (den > 0))[..., None], num / den[..., None], ctx.v)
        stats = dict(ctx.stats)
        if "merged" in stats:  # log_mass: each evicted token's mass moves to its target
            folded = torch.where((ctx.pos >= 0) & ~keep, 1.0 + stats["merged"], 0.0)
            stats["merged"] = stats["merged"].scatter_add(2, target, folded)
        super().store(lc, replace(ctx, v=merged_v.to(ctx.v.dtype), stats=stats))

    # ------------------------------------------------------------------ decode
    def decode_victim_score(self, ctx: DecodeContext) -> Tensor:
        lc = ctx.lc
        avg = self._avg(lc.score, lc.pos, ctx.q_pos, ctx.attn.window)
        return torch.where(self._protected(lc.pos, ctx.q_pos), INF, avg)

    def decode_evict(self, ctx: DecodeContext, victim: Tensor, when: Tensor) -> None:
        lc = ctx.lc
        nb = next_kept_slot(lc.pos, victim)[..., None]                        # [B, Hkv, 1]
        vi = victim[..., None]
        a_j, a_m = (self._avg(lc.score.gather(2, s), lc.pos.gather(2, s), ctx.q_pos,
                              ctx.attn.window) for s in (vi, nb))              # [B, Hkv, 1]
        D = lc.v.shape[-1]
        v_j, v_m = (lc.v.gather(2, s[..., None].expand(-1, -1, 1, D)).to(a_j.dtype)
                    for s in (vi, nb))                                        # [B, Hkv, 1, D]
        den = (a_j + a_m)[..., None]
        new_v = torch.where(den > 0, (a_j[..., None] * v_j + a_m[..., None] * v_m) / den, v_m)
        lc.put(lc.v, nb[..., 0], new_v, when)
        if self.bias == "log_mass":
            mj, mm = lc.merged.gather(2, vi), lc.merged.gather(2, nb)
            lc.put(lc.merged, nb[..., 0], mm + 1.0 + mj, when)
        lc.evict(victim, when)
