"""`h2o` (Heavy-Hitter Oracle, Zhang et al. 2023): cumulative attention + a recent window.

score `S_j` = attention received, summed over queries and averaged over the query heads of the
KV group (kvpress convention). Prefill: column sums over all prompt queries (causal), computed
blockwise from FlexAttention's LSE; keep the `recent` newest (default budget // 2) plus the top
`budget - recent` older tokens by `S`, per KV head. Decode: `S += mean_h a_h` for every cached
token, then evict `argmin S` outside the recent window. *(choice, METHODS.md: one-shot prefill
selection as KVCache-Factory/kvpress, not the paper's row-by-row greedy prefill.)*
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.policies.base import INF, DecodeContext, Policy, PrefillContext
from flexkv.policies.registry import register
from flexkv.policies.scores import column_sums, last_position, recent_mask


@register
@dataclass
class H2O(Policy):
    recent: int | None = None  # None -> budget // 2

    name: ClassVar[str] = "h2o"
    stats: ClassVar[dict] = {"score": None}
    needs_lse: ClassVar[bool] = True
    needs_decode_probs: ClassVar[bool] = True

    @property
    def w(self) -> int:
        return self.budget // 2 if self.recent is None else self.recent

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if self.recent is not None and (not isinstance(self.recent, int) or self.recent < 1):
            raise ValueError(f"recent must be None (budget // 2) or an int >= 1, got {self.recent!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def min_budget(self) -> int:
        return 2 if self.recent is None else self.recent + 1

    def protected_desc(self) -> str:
        return f"budget must exceed the recent window {self.recent}"

    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        cs = column_sums(ctx.q, ctx.k, ctx.q_pos, ctx.pos, ctx.lse, ctx.window,
                         keys_end_with_queries=True)   # ctx.k: [cached | chunk]
        return {"score": ctx.stats["score"] + cs}

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        recent = recent_mask(ctx.pos, last_position(ctx.q_pos), self.w)
        return torch.where(recent, INF, ctx.stats["score"])

    def decode_scores(self, ctx: DecodeContext) -> None:
        ctx.lc.score.add_(torch.where(ctx.active[:, None, None], ctx.probs.mean(dim=2), 0.0))

    def decode_victim_score(self, ctx: DecodeContext) -> Tensor:
        recent = recent_mask(ctx.lc.pos, ctx.q_pos, self.w)
        return torch.where(recent, INF, ctx.lc.score)
