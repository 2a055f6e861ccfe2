"""`laprox` (LaProx, Mai & Kim 2026): output-aware, layer-wise, model-wide eviction.

RECONSTRUCTION: the paper's formula was not available (only its abstract); this transcribes
shared/METHODS.md. Observation window `W` = the last `window` queries of the prompt (SnapKV's,
causal inside the window, `scores.window_probs`). Dropping token `j` of KV head `g` in layer `l`
changes the layer's output on `W` by `E = sum_{h in g} a_h[W, j] (outer) (v_j W_o^(h))`, where
`W_o^(h) = o_proj.weight[:, h*D:(h+1)*D].T` (head h's `D x d_model` slice). Score
`s_{l,g,j} = ||E||_F`, computed exactly as `sqrt(sum_{h,h'} (a_h . a_h') (v_j M_hh' v_j^T))` with
`M_hh' = W_o^(h) W_o^(h')^T` ([D, D] per pair in the group). Scores are in residual-stream units,
so they compare across layers: keep the global top `K = L * Hkv * (budget - window)` of all
`(l, g, j)` outside the window, plus every head's window (always kept). Budgets vary by layer/head.

Parameters: `budget` C (average tokens per (layer, KV head), window included), `window` (32),
`max_head_factor` (4), `normalize` (False).
(choice) `normalize=True` divides layer l's scores by `||O_l[W]||_F`, where
  `O_l[W] = sum_h A_h[W, :] V_g(h) W_o^(h)` ([|W|, d_model]) is the attention block's output (o_proj
  of the concatenated head outputs, before the residual add) on the window queries, over the
  tokens that chunk attended to (left unchanged where that norm is 0, i.e. no real query).
(choice) static memory: a head holds at most `head_max = floor(max_head_factor * (C - window))`
  tokens outside its window. After each layer's attention only each head's top-`head_max`
  candidates (+ window) are stored, with their score as the `score` statistic (never all layers'
  full KV at once); slots per layer = `min(T, min(T - window, head_max) + window) + max_new`. The
  global top-K is thus "top-K among each head's top-`head_max` candidates": exact whenever no head
  would exceed the cap, and the total is exactly K whenever the prompt is longer than C.
(choice) total order of the global selection (lowest evicted first): score, then position, then
  layer, then KV head; i.e. ties evict the lower position, then the lower layer, then lower head.
(choice) chunked prefill: each chunk rescores every held token with the chunk's own last `window`
  queries over cached + chunk tokens (replacing the old score) and keeps each head's top
  `head_max` + window; the global threshold is applied once, in `finish_prefill`.
After `finish_prefill`, `lc.budget` = the head's retained count + max_new_tokens (the slots it may
fill: decode appends without eviction, as for every prefill-only policy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.policies.base import INF, Policy, PrefillContext
from flexkv.policies.registry import register
from flexkv.policies.scores import last_position, recent_mask, window_probs


def output_error_norms(probs: Tensor, v: Tensor, o_weight: Tensor) -> Tensor:
    """||E||_F per token. probs [B, Hkv, G, W, N], v [B, Hkv, N, D], o_weight [d_model, H*D]
    -> [B, Hkv, N] (in probs' dtype)."""
    B, n_kv, G, _, N = probs.shape
    D, dt = v.shape[-1], probs.dtype
    w_o = o_weight.to(dt).T.reshape(n_kv, G, D, -1)              # W_o^(h): [Hkv, G, D, d_model]
    m = torch.einsum("kgdm,khem->kghde", w_o, w_o)               # M_hh': [Hkv, G, G, D, D]
    attn_gram = torch.einsum("bkgtn,bkhtn->bkghn", probs, probs)  # a_h . a_h': [B, Hkv, G, G, N]
    v = v.to(dt)
    sq = torch.zeros(B, n_kv, N, dtype=dt, device=v.device)
    for h in range(G):  # pairs h <= h2 (both grams are symmetric): one [B, Hkv, N, D] at a time
        for h2 in range(h, G):
            vm = torch.einsum("bknd,kde->bkne", v, m[:, h, h2])    # v_j M_hh2: [B, Hkv, N, D]
            term = attn_gram[:, :, h, h2] * torch.einsum("bkne,bkne->bkn", vm, v)  # (a.a')(u.u')
            sq += term if h == h2 else 2 * term
    return sq.clamp_min(0).sqrt()


def window_output_norm(probs: Tensor, v: Tensor, o_weight: Tensor) -> Tensor:
    """||O_l[W]||_F per batch row: [B]. probs [B, Hkv, G, W, N], v [B, Hkv, N, D]."""
    B, n_kv, G, W, _ = probs.shape
    heads = torch.einsum("bkgtn,bknd->btkgd", probs, v.to(probs.dtype)).reshape(B, W, -1)
    return (heads @ o_weight.to(probs.dtype).T).flatten(1).norm(dim=-1)


@register
@dataclass
class LaProx(Policy):
    window: int = 32
    max_head_factor: float = 4
    normalize: bool = False

    name: ClassVar[str] = "laprox"
    stats: ClassVar[dict] = {"score": None}
    decode_evicts: ClassVar[bool] = False

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        f = self.max_head_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1:
            raise ValueError(f"max_head_factor must be a number >= 1, got {f!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def min_budget(self) -> int:
        return self.window + 1

    def protected_desc(self) -> str:
        return f"budget must exceed the observation window window={self.window}"

    def prefill_slots(self, prompt_len: int) -> int:
        """Tokens a head may hold during prefill: its window + at most head_max candidates."""
        head_max = int(self.max_head_factor * (self.budget - self.window))
        return min(prompt_len, min(prompt_len - self.window, head_max) + self.window)

    def capacity(self, layer, prompt_len, max_new_tokens):
        return self.prefill_slots(prompt_len) + max_new_tokens

    def layer_budget(self, layer, prompt_len, max_new_tokens, capacity):
        return self.prefill_slots(prompt_len)  # finish_prefill rewrites it

    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        probs = window_probs(ctx.q, ctx.k, ctx.q_pos, ctx.pos, self.window, ctx.window)
        w_o = ctx.attn.o_proj.weight
        score = output_error_norms(probs, ctx.v, w_o)             # [B, Hkv, N]
        if self.normalize:
            norm = window_output_norm(probs, ctx.v, w_o)          # [B]
            score = score / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None, None]
        return {"score": score.to(ctx.stats["score"].dtype)}

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        win = recent_mask(ctx.pos, last_position(ctx.q_pos), self.window)
        return torch.where(win, INF, ctx.stats["score"])

    def finish_prefill(self, cache, model) -> None:
        """Global top-K over all layers' stored candidates (per batch row)."""
        layers = list(cache.layers)
        B, n_kv = layers[0].pos.shape[:2]
        k_keep = len(layers) * n_kv * (self.budget - self.window)
        cands, scores, poss = [], [], []
        for lc in layers:
            last = lc.pos.amax(dim=-1, keepdim=True)                 # [B, Hkv, 1] prompt's last pos
            cand = (lc.pos >= 0) & (lc.pos <= last - self.window)    # outside the window
            cands.append(cand)
            scores.append(lc.score.masked_fill(~cand, -INF).reshape(B, -1))
            poss.append(lc.pos.reshape(B, -1))
        score, pos = torch.cat(scores, 1), torch.cat(poss, 1)      # [B, sum_l Hkv*S_l]
        # sort descending by (score, pos, layer, head): flat index is (layer, head)-major
        order = torch.arange(score.shape[1] - 1, -1, -1, device=score.device).expand(B, -1)
        order = order.gather(1, pos.gather(1, order).argsort(dim=1, descending=True, stable=True))
        order = order.gather(1, score.gather(1, order).argsort(dim=1, descending=True, stable=True))
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(
            order.shape[1], device=order.device).expand(B, -1).contiguous())
        start = 0
        for lc, cand in zip(layers, cands):
            n = cand[0].numel()
            keep = (rank[:, start:start + n] < k_keep).view_as(cand)
            start += n
            headroom = lc.capacity - lc.budget                        # = max_new_tokens
            lc.pos.masked_fill_(cand & ~keep, -1)
            lc.budget.copy_(lc.retained() + headroom)
