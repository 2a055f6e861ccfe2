"""`keydiff` (KeyDiff, Park et al. 2025): evict the keys most similar to the cache's mean direction.

Query-agnostic (no attention statistics: works with any attention kernel). Per (layer, KV head),
over the valid cached keys `k_i` (post-RoPE): anchor `a = mean_i k_i / ||k_i||` and
`score_j = -cos(k_j, a)`; the most distinctive keys (lowest similarity to the anchor) are kept.
Prefill: one-shot top-`budget` selection by `score` after the prompt (with `prefill_chunk`, after
every chunk over cached + chunk keys: this is the paper's block-wise prefill, so there is no
separate `block` parameter). Decode: the anchor is recomputed over the cached keys plus the new
one, and the `argmin` of `score` outside the recent window is evicted.

Parameters: `budget`; `window` (default 32) the most recent positions never evicted, `window <
budget`. Default 32: the paper's sliding-window variant (KeyDiff with a protected recent window).
`window=0` is the plain score (kvpress's `KeyDiffPress`, one-shot at prefill), but with eviction
at every decode step it evicts the newest key on arrival (the newest key is the most typical of
the cache): streaming perplexity 219 against 26 for `streaming` at budget 64 on the default model
(bench/results/quality/ppl-1k.md), so it is not the default. *(choice: the recent window is also
protected by the prefill selection, so the `window` newest prompt tokens always survive, as in
h2o.)* Cosines use `||x|| >= 1e-12`. With `budget=1` (`window=0`) a decode step compares two keys
that are, in exact arithmetic, equally similar to their mean: that tie is decided by rounding,
not by position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from flexkv.policies.base import INF, DecodeContext, Policy, PrefillContext
from flexkv.policies.registry import register
from flexkv.policies.scores import last_position, recent_mask

EPS = 1e-12


def key_diff_score(k: Tensor, pos: Tensor) -> Tensor:
    """k: [B, Hkv, N, D], pos: [B, Hkv, N] (-1 empty) -> [B, Hkv, N] = -cos(k_j, anchor), the
    anchor being the mean of the valid keys' unit vectors (empty slots are left out; they score
    0). Computed as `-(k_j . a) / (||k_j|| ||a||)`: two products with K and no normalised copy of
    it (on CPU the eager decode step pays per pass over the cache: bench/NOTES.md, session 15)."""
    dt = torch.promote_types(k.dtype, torch.float32)
    kf = k.to(dt)  # compiled, the upcast of a bf16 cache fuses into the two reductions below
    valid = pos >= 0
    inv_norm = torch.where(valid, torch.linalg.vector_norm(kf, dim=-1).clamp(min=EPS).reciprocal(),
                           0.0)                                           # [B, Hkv, N]
    fused = torch.compiler.is_compiling()  # pointwise + reductions: inductor fuses them, K read
    # once each; eager: a matmul each, the fewest ops
    unit_sum = ((inv_norm[..., None] * kf).sum(dim=2) if fused
                else (inv_norm[:, :, None, :] @ kf)[:, :, 0])               # [B, Hkv, D]
    anchor = F.normalize(unit_sum / valid.sum(dim=-1, keepdim=True).clamp(min=1), dim=-1, eps=EPS)
    dot = ((kf * anchor[:, :, None, :]).sum(dim=-1) if fused
           else (kf @ anchor[..., None])[..., 0])                            # [B, Hkv, N]
    return -dot * inv_norm


@register
@dataclass
class KeyDiff(Policy):
    window: int = 32

    name: ClassVar[str] = "keydiff"

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"window must be an int >= 0 (and < budget), got {self.window!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def min_budget(self) -> int:
        return self.window + 1

    def protected_desc(self) -> str:
        return f"budget must exceed the recent window={self.window}"

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        recent = recent_mask(ctx.pos, last_position(ctx.q_pos), self.window)
        return torch.where(recent, INF, key_diff_score(ctx.k, ctx.pos))

    def decode_victim_score(self, ctx: DecodeContext) -> Tensor:
        recent = recent_mask(ctx.lc.pos, ctx.q_pos, self.window)
        return torch.where(recent, INF, key_diff_score(ctx.lc.k, ctx.lc.pos))
