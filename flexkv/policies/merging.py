"""Shared pieces of the merging policies (weightedkv, cam; reusable by any merging policy).

- `MergingPolicy`: a `Policy` with the `bias` parameter (None or "log_mass": proportional
  attention, shared/METHODS.md). With "log_mass" the cache tracks the statistic `merged` = the
  number of tokens folded into a slot besides its own, so the slot's mass is `m_j = 1 + merged_j`
  (a fresh token has `merged = 0`, which is exactly what the cache writes for a new token, so no
  special initialisation is needed). Folding token j into slot m adds `1 + merged_j` to
  `merged_m` (a fraction of it for cam). Attention then adds `b_j = log(m_j) = log1p(merged_j)`
  (0 on empty slots) to every query's score, at decode and at prefill (later chunks attend over
  merged cached tokens); the LSE-based column sums see the same bias.
- `CumulativeAttention`: h2o's statistic `score` (cumulative attention: prefill column sums from
  the LSE, under the policy's bias, then `+= probs` at every decode step) for merging policies.
- `kept_mask`: which tokens `Policy.store` keeps (the same top-k), so a policy can merge the
  others into the survivors before storing.
- `next_kept_slot` (one victim) / `merge_targets` (all tokens at once): the kept token with the
  next larger position, else the next smaller one.
- `first_after` / `first_after_slots`: the (up to) `m` candidates with the smallest positions
  after a given one, as a mask / as slot indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.policies.base import DecodeContext, Policy, PrefillContext, _stable_desc
from flexkv.policies.scores import column_sums

BIASES = (None, "log_mass")


@dataclass
class MergingPolicy(Policy):
    bias: str | None = None  # None or "log_mass" (adds log(mass) to the attention scores)

    merge_stats: ClassVar[dict] = {}  # the policy's own statistics; `merged` is added for log_mass

    @property
    def stats(self) -> dict:
        return {**self.merge_stats, **({"merged": None} if self.bias == "log_mass" else {})}

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def prefill_bias(self, pos: Tensor, stats: dict) -> Tensor | None:
        if self.bias != "log_mass":
            return None
        return torch.where(pos >= 0, torch.log1p(stats["merged"]), 0.0)

    def decode_bias(self, lc) -> Tensor | None:
        return self.prefill_bias(lc.pos, lc.stats())


class CumulativeAttention:
    """Mixin (listed before MergingPolicy): statistic `score` = cumulative group-mean attention."""

    merge_stats: ClassVar[dict] = {"score": None}
    needs_lse: ClassVar[bool] = True
    needs_decode_probs: ClassVar[bool] = True

    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        cs = column_sums(ctx.q, ctx.k, ctx.q_pos, ctx.pos, ctx.lse, ctx.window,
                         bias=self.prefill_bias(ctx.pos, ctx.stats), keys_end_with_queries=True)
        return {**ctx.stats, "score": ctx.stats["score"] + cs}

    def decode_scores(self, ctx: DecodeContext) -> None:
        ctx.lc.score.add_(torch.where(ctx.active[:, None, None], ctx.probs.mean(dim=2), 0.0))


def kept_mask(prio: Tensor, pos: Tensor, budget: Tensor) -> Tensor:
    """The tokens `Policy.store` keeps: the `budget[b, h]` highest priorities among valid
    tokens, ties toward the higher position. prio, pos: [B, Hkv, N]; budget: [B, Hkv]
    -> bool [B, Hkv, N]."""
    order = _stable_desc(prio.masked_fill(pos < 0, -float("inf")), pos)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(
        order.shape[-1], device=order.device).expand_as(order))
    return (rank < budget[..., None]) & (pos >= 0)


def next_kept_slot(pos: Tensor, victim: Tensor) -> Tensor:
    """Slot [B, Hkv] of the valid token with the next larger position than the victim's (the next
    smaller one if none). pos: [B, Hkv, S]; victim: [B, Hkv] slot indices."""
    pv = pos.gather(-1, victim[..., None])
    big = torch.iinfo(pos.dtype).max
    after = torch.where((pos >= 0) & (pos > pv), pos, big)
    before = torch.where((pos >= 0) & (pos < pv), pos, -1)
    return torch.where(after.amin(-1) < big, after.argmin(-1), before.argmax(-1))


def merge_targets(pos: Tensor, keep: Tensor) -> Tensor:
    """For every token, the index of the token it merges into: itself if kept, else the kept token
    with the next larger position (the next smaller one if none). Invalid tokens get an arbitrary
    valid index. pos, keep: [B, Hkv, N] -> long [B, Hkv, N]."""
    N = pos.shape[-1]
    order = pos.argsort(dim=-1, stable=True)                 # by position (-1 padding first)
    kept = keep.gather(-1, order)
    idx = torch.arange(N, device=pos.device).expand_as(order)
    nxt = torch.where(kept, idx, N).flip(-1).cummin(-1).values.flip(-1)  # next kept, at or after
    prv = torch.where(kept, idx, -1).cummax(-1).values                   # previous kept
    tgt = torch.where(nxt < N, nxt, prv).clamp(min=0)
    return torch.empty_like(order).scatter_(-1, order, order.gather(-1, tgt))


def first_after_slots(pos: Tensor, cand: Tensor, after: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The (up to) `m` candidates with the smallest positions greater than `after`, as slots:
    ([B, Hkv, m'] distinct slot indices, [B, Hkv, m'] bool: the slot is one), m' = min(m, S).
    pos, cand: [B, Hkv, S] (valid positions distinct per head); after: [B, Hkv]."""
    big = torch.iinfo(pos.dtype).max
    key = torch.where(cand & (pos > after[..., None]), pos, big)
    first = key.topk(min(m, key.shape[-1]), dim=-1, largest=False)
    return first.indices, first.values < big


def first_after(pos: Tensor, cand: Tensor, after: Tensor, m: int) -> Tensor:
    """`first_after_slots` as a mask: bool [B, Hkv, S]."""
    slots, ok = first_after_slots(pos, cand, after, m)
    return torch.zeros_like(cand).scatter_(-1, slots, ok)
