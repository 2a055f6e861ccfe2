"""`kvmerger` (KVMerger, Wang et al. 2024): merge runs of similar adjacent keys, Gaussian-weighted.

Prefill only (`decode_evicts=False`): decode appends; a layer holds `min(budget, T) + max_new`
slots. Per layer and KV head, when it holds more than `budget` (C) tokens, the last `window` (w)
positions stay as they are and the older tokens, in position order, are merged:
- adjacent similarities `s_i = cos(k_i, k_{i+1}) = k_i.k_{i+1} / max(|k_i||k_{i+1}|, 1e-12)`;
  merging sets are maximal runs of consecutive tokens, cut at the `C - w - 1` lowest `s_i`, so
  exactly `C - w` sets remain *(choice: exact budget instead of the paper's threshold; ties in
  s: the boundary at the lower position is cut first)*;
- the pivot `p` of a set is the member with the largest SnapKV window score (`snapkv`'s pooled
  score: the last w queries' group-mean attention summed, window tokens 0, pooled (`pool`,
  default "max") with `kernel` over positions) *(choice: ties -> the larger unpooled score, then the lower position)*;
- Gaussian-kernel merge: `d_i = |k_p - k_i|^2`, `sigma^2 = mean_set d_i + eps` *(choice)*,
  `g_i = exp(-d_i / (2 sigma^2))`, `w_i = g_i / sum g`; the set becomes ONE token
  `k' = sum w_i k_i`, `v' = sum w_i v_i` at the pivot's position (a singleton stays bit-exact).
Layers in `skip_layers` use SnapKV selection instead (top `C - w` by pooled score + the window).
*(choice: chunked prefill)* the same runs after every chunk over the cached + chunk tokens,
scored by that chunk's last w queries; merged cached tokens are tokens at their stored (pivot)
positions: their keys enter the similarities and they can merge again.
`bias="log_mass"` (flexkv.policies.merging): proportional attention, mass of a merged slot = the
number of prompt tokens folded into it (the set size in one-shot prefill); the window scores use
the same bias. Static shapes: sets are segment ids (cumsum over the cuts in position order),
merges are segment sums (`scatter_add`), pivots segment maxima (`scatter_reduce`); no host sync.

Parameters: `budget` (C), `window` (w, default 32; 1 <= w < C), `kernel` (odd >= 1, default 7),
`pool` ("max" default, or "avg"; kernel 7 max-pooling is this policy's earlier choice, kept when
SnapKV's defaults moved to its authors' kernel 5 average),
`skip_layers` (layer indices, negative from the end; default None = (0, 1, L-1), the first two
and the last), `eps` (> 0, default 1e-6), `bias` (None or "log_mass"). With `kernel=1` pivots
(and the skipped layers) use the unpooled window score. Built on `SnapKV` (window/kernel checks,
capacity, the skipped layers' selection) and `MergingPolicy` (the bias).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.policies.base import INF, PrefillContext
from flexkv.policies.merging import MergingPolicy
from flexkv.policies.registry import register
from flexkv.policies.scores import last_position, pool_over_positions, recent_mask, window_probs
from flexkv.policies.snapkv import SnapKV


@register
@dataclass
class KVMerger(MergingPolicy, SnapKV):
    kernel: int = 7
    pool: str = "max"
    skip_layers: tuple[int, ...] | None = None  # None: (0, 1, L - 1)
    eps: float = 1e-6

    name: ClassVar[str] = "kvmerger"

    def validate(self, prompt_len, max_new_tokens, n_layers):
        skip, L = self.skip_layers, n_layers
        if skip is not None and (not isinstance(skip, (tuple, list)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and -L <= s < L for s in skip)):
            raise ValueError(f"skip_layers must be None (= (0, 1, {L - 1})) or a tuple of layer "
                             f"indices in [{-L}, {L - 1}], got {skip!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (
                0 < self.eps < math.inf):
            raise ValueError(f"eps must be a finite number > 0 (default 1e-6), got {self.eps!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def skipped(self, layer: int) -> bool:
        """Whether `layer` uses SnapKV selection (n_layers is recorded by build_cache)."""
        L = self.n_layers
        skip = (0, 1, L - 1) if self.skip_layers is None else self.skip_layers
        return layer in {s % L for s in skip if -L <= s < L}

    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        if self.skipped(ctx.layer):
            return super().prefill_scores(ctx)  # SnapKV's pooled score in stats["snapkv"]
        probs = window_probs(ctx.q, ctx.k, ctx.q_pos, ctx.pos, self.window, ctx.window,
                             bias=self.prefill_bias(ctx.pos, ctx.stats))  # [B, Hkv, G, w, N]
        raw = probs.sum(dim=3).mean(dim=2).masked_fill(self.protected(ctx), 0.0)  # [B, Hkv, N]
        return dict(ctx.stats, snapkv=pool_over_positions(raw, ctx.pos, self.kernel, self.pool),
                    raw=raw)

    def store(self, lc, ctx: PrefillContext) -> None:
        if self.skipped(ctx.layer):
            return super().store(lc, ctx)  # SnapKV selection
        C, w, N, D = self.budget, self.window, ctx.pos.shape[-1], ctx.k.shape[-1]
        big = torch.iinfo(ctx.pos.dtype).max
        order = torch.where(ctx.pos < 0, big, ctx.pos).argsort(dim=-1, stable=True)  # empty last
        pos = ctx.pos.gather(-1, order)                                             # [B, Hkv, N]
        dt = torch.promote_types(ctx.k.dtype, torch.float32)
        by_tok = order[..., None].expand(-1, -1, -1, D)
        k, v = ctx.k.gather(2, by_tok).to(dt), ctx.v.gather(2, by_tok).to(dt)        # [B, Hkv, N, D]
        pooled, raw = ctx.stats["snapkv"].gather(-1, order), ctx.stats["raw"].gather(-1, order)
        older = (pos >= 0) & ~recent_mask(pos, last_position(ctx.q_pos), w)
        compress = (pos >= 0).sum(-1, keepdim=True) > C                             # [B, Hkv, 1]
        # merging sets: neighbours (in position order) join unless their boundary is cut
        a, b = k[..., :-1, :], k[..., 1:, :]
        sim = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)  # [B, Hkv, N-1]
        joinable = older[..., :-1] & older[..., 1:] & compress
        rank = sim.masked_fill(~joinable, INF).argsort(dim=-1, stable=True).argsort(dim=-1)
        join = joinable & (rank >= C - w - 1)          # the C - w - 1 lowest similarities are cut
        seg = torch.cat([torch.zeros_like(pos[..., :1]), (~join).long()], -1).cumsum(-1)  # set id

        def seg_sum(x: Tensor) -> Tensor:
            return torch.zeros_like(x).scatter_add_(-1, seg, x)

        def seg_max(x: Tensor) -> Tensor:  # each token gets its set's maximum
            return torch.full_like(x, -INF).scatter_reduce_(-1, seg, x, "amax").gather(-1, seg)

        # pivot: largest pooled score; ties -> larger raw score, then lower position
        best = pooled == seg_max(pooled)
        raw_best = raw.masked_fill(~best, -INF)
        best = best & (raw_best == seg_max(raw_best))
        idx = torch.arange(N, device=pos.device).expand_as(seg)
        pivot = torch.full_like(seg, N).scatter_reduce_(-1, seg, torch.where(best, idx, N), "amin")
        k_piv = k.gather(2, pivot.gather(-1, seg)[..., None].expand(-1, -1, -1, D))
        # Gaussian kernel weights inside each set
        d = (k_piv - k).square().sum(-1)                                            # [B, Hkv, N]
        var = seg_sum(d) / seg_sum(torch.ones_like(d)).clamp(min=1) + self.eps
        g = torch.exp(-d / (2 * var.gather(-1, seg)))
        wt = (g / seg_sum(g).gather(-1, seg))[..., None]
        to_set = seg[..., None].expand(-1, -1, -1, D)
        k_m = torch.zeros_like(k).scatter_add_(2, to_set, wt * k)
        v_m = torch.zeros_like(v).scatter_add_(2, to_set, wt * v)
        pos_m = torch.where(pivot < N, pos.gather(-1, pivot.clamp(max=N - 1)), -1)
        stats = {}
        if "merged" in ctx.stats:  # mass - 1 of each set = sum of its members' masses - 1
            mass = torch.where(pos >= 0, 1.0 + ctx.stats["merged"].gather(-1, order), 0.0)
            stats["merged"] = (seg_sum(mass) - 1.0).clamp(min=0.0)
        n = min(N, lc.capacity)  # the valid sets come first (<= budget of them)
        lc.load(k_m[:, :, :n].to(ctx.k.dtype), v_m[:, :, :n].to(ctx.v.dtype), pos_m[..., :n],
                {name: s[..., :n] for name, s in stats.items()})
