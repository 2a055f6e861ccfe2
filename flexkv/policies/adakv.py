"""`adakv` (Ada-KV, Feng et al. 2024): head-adaptive budgets on SnapKV scores.

Per layer and batch row, once more than `budget` (C) prompt positions have been seen: pool the
pooled SnapKV window scores (see `flexkv.policies.snapkv`) of all KV heads' tokens outside the
window, take the layer-wide top `Hkv*(C-w)` (ties: higher score, then higher position, then lower
head), count `count_g` of head g's tokens among them; head g gets
`quota_g = count_g*(1-alpha) + alpha*(C-w)` tokens plus the window, and keeps its own top by its
own score (ties keep the higher position). `alpha` (default 0.2) is the uniform floor.

*(choice: largest-remainder rounding)* plain `round(quota_g)` can break the total; instead every
head gets `floor(quota_g)` and the `Hkv*(C-w) - sum floor` heads with the largest remainders
(ties -> lower head index) get one more, so a layer retains exactly the uniform total
`Hkv*(C-w)` plus the windows. `alpha` is used as the nearest fraction with denominator
<= 10**6 (exact for decimals such as 0.2), so the quotas are exact integer arithmetic.

Budgets vary by head inside a fixed per-layer capacity: `w + max possible head budget +
max_new_tokens` slots (`max = min(T-w, floor((1-alpha)*min(Hkv*(C-w), T-w) + alpha*(C-w)) + 1)`);
decode appends without eviction. Prefill writes each head's budget + max_new_tokens into
`lc.budget`, so `cache.retained()` is the real use and `cache.slots()` what is allocated.

*(choice: chunked prefill)* SnapKV's per-chunk reading (each chunk's last `window` queries, the
last `window` positions protected); a head whose budget exceeds its candidates keeps them all and
the spare is not redistributed, so a chunked prefill can retain less than the uniform total.

Parameters: `budget`, `window` (32), `kernel` (7), `pool` ("max"; the AdaKV authors' code
max-pools with kernel 7, so these stay, where SnapKV's defaults are its authors' kernel 5 average),
`alpha` (0.2, in [0, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.cache import LayerCache
from flexkv.policies.base import INF, PrefillContext, _stable_desc
from flexkv.policies.registry import register
from flexkv.policies.scores import last_position
from flexkv.policies.snapkv import SnapKV


def alpha_fraction(alpha: float) -> tuple[int, int]:
    """alpha as (numerator, denominator), denominator <= 10**6."""
    f = Fraction(alpha).limit_denominator(10**6)
    return f.numerator, f.denominator


@register
@dataclass
class AdaKV(SnapKV):
    kernel: int = 7
    pool: str = "max"  # the AdaKV authors' code: max-pooling, kernel 7
    alpha: float = 0.2

    name: ClassVar[str] = "adakv"

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
                or not 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def prefill_keep(self, layer: int, prompt_len: int) -> int:
        C, w = self.budget, self.window
        if prompt_len <= C:
            return prompt_len
        a, D = alpha_fraction(self.alpha)
        sel = C - w
        most = (D - a) * min(self.n_kv_heads * sel, prompt_len - w) + a * sel  # D * largest quota
        return w + min(prompt_len - w, most // D + 1)

    def prefix_key(self, prompt_len: int, max_new_tokens: int) -> tuple:
        # each chunk's selection writes the head budgets with the decode room in them
        return super().prefix_key(prompt_len, max_new_tokens) + (max_new_tokens,)

    def prefill_budget(self, lc: LayerCache, ctx: PrefillContext) -> Tensor:
        # tensor parallel: the layer-wide top-k runs over every rank's heads (gathered in global
        # head order, so ties go to the lower GLOBAL head); each rank keeps its heads' budgets
        sh = ctx.shard
        protected = self.protected(ctx)                   # [B, Hkv, N] (this rank's heads)
        score = sh.gather_heads(ctx.stats["snapkv"])      # [B, Hkv, N] pooled window scores
        pos = sh.gather_heads(ctx.pos)
        candidate = (pos >= 0) & ~sh.gather_heads(protected)
        B, n_kv, N = score.shape
        sel = self.budget - self.window
        total = n_kv * sel
        flat = score.masked_fill(~candidate, -INF).reshape(B, n_kv * N)
        top = _stable_desc(flat, pos.reshape(B, n_kv * N))[:, :total]  # [B, <= total]
        in_top = candidate.reshape(B, n_kv * N).gather(1, top).long()
        count = torch.zeros(B, n_kv, dtype=torch.long, device=score.device)
        count.scatter_add_(1, top // N, in_top)           # [B, Hkv] head g's tokens in the top
        a, D = alpha_fraction(self.alpha)
        quota = count * (D - a) + a * sel                 # D * quota_g, exact
        share = quota // D
        short = total - share.sum(dim=1, keepdim=True)    # [B, 1] heads that get one more
        by_rem = (quota % D).argsort(dim=1, descending=True, stable=True)  # ties: lower head
        rank = torch.empty_like(by_rem).scatter_(1, by_rem, torch.arange(n_kv, device=score.device)
                                                 .expand(B, n_kv).contiguous())
        share = sh.local_heads(share + (rank < short).long())
        compress = last_position(ctx.q_pos) >= self.budget  # [B, 1] more than C positions seen
        keep = torch.where(compress, protected.sum(dim=-1) + share, lc.capacity)
        decode_slots = ctx.info.max_new_tokens
        lc.budget.copy_(torch.where(compress, keep + decode_slots, lc.capacity))
        return keep
