"""`laprox` (LaProx, Mai & Kim 2026, arXiv 2605.07234v1): output-aware, model-wide eviction.

The paper is public; there is no author code. This follows a third party's reading of the paper
(Alg. 1, Alg. 2, App. A; recorded in shared/METHODS.md). Observation window `W` = the last `window`
(32) prompt queries (SnapKV's, causal inside the window, `scores.window_probs`). Per query head
h: `p_h[j] = ||A_h[W, j]||_2 * ||v_j W_o^(h)||_2`, `W_o^(h) = o_proj.weight[:, h*D:(h+1)*D].T`
(head h's `D x d_model` slice; `||v W||^2 = v W W^T v^T`, never materialised); KV-group score
`s_g[j] = mean_{h in g} p_h[j]` (App. A); window tokens set to 0, then average-pooled over
positions (`kernel` 7, as SnapKV's pooling); each layer's scores (all its heads, tokens outside
the window) normalised to sum 1 (`normalize="layer"`); keep the global top
`K = L * Hkv * (budget - window)` of all `(l, g, j)` outside the windows, plus every head's window
(Alg. 2). Budgets vary by layer and head; the total matches the uniform policies'.

Parameters: `budget` C (average tokens per (layer, KV head), window included), `window` (32),
`kernel` (odd >= 1, 7; 1 = no pooling), `score` ("norm_product" or "frobenius"), `normalize`
("layer", "none" or "output"), `max_head_factor` (4). Options:
- `score="frobenius"`: the exact Frobenius norm of the group's summed output error of dropping
  j, `||sum_{h in g} a_h[W, j] (outer) (v_j W_o^(h))||_F` (flexkv's earlier reading; equal to the
  default when G = 1), computed as `sqrt(sum_{h,h'} (a_h . a_h') (v_j M_hh' v_j^T))`.
- `normalize="none"`: the raw scores (the paper's layer-flatten ablation); `"output"` divides
  layer l's scores by `||O_l[W]||_F` (the attention block's output on the window queries; left
  unchanged where that norm is 0). `True` / `False` are the earlier spellings of "output" / "none".
  `score="frobenius", kernel=1, normalize="none"` is the earlier default exactly.
(choice) static memory: a head holds at most `head_max = floor(max_head_factor * (C - window))`
  tokens outside its window; after each layer's attention only each head's top-`head_max`
  candidates (+ window) are stored, their score as the `score` statistic; slots per layer =
  `min(T, min(T - window, head_max) + window) + max_new`. The global top-K is "top-K among each
  head's top-`head_max` candidates": exact whenever no head would exceed the cap.
(choice) ties of the global selection evict the lower score, then position, layer, KV head.
(choice) chunked prefill: each chunk rescores every held token with its own last `window`
  queries (replacing the old score; pooled and normalised over the held tokens) and keeps each
  head's top `head_max` + window; the global threshold is applied once, in `finish_prefill`.
After `finish_prefill`, `lc.budget` = the head's retained count + max_new_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.distributed import SINGLE, Shard, shard_of
from flexkv.policies.base import INF, Policy, PrefillContext
from flexkv.policies.registry import register
from flexkv.policies.scores import last_position, pool_over_positions, recent_mask, window_probs

SCORES = ("norm_product", "frobenius")
NORMALIZE = ("layer", "none", "output")


def norm_product_scores(probs: Tensor, v: Tensor, o_weight: Tensor) -> Tensor:
    """mean_{h in g} ||A_h[W, j]||_2 ||v_j W_o^(h)||_2 per token. probs [B, Hkv, G, W, N],
    v [B, Hkv, N, D], o_weight [d_model, H*D] -> [B, Hkv, N] (in probs' dtype)."""
    B, n_kv, G, _, N = probs.shape
    D, dt = v.shape[-1], probs.dtype
    w_o = o_weight.to(dt).T.reshape(n_kv, G, D, -1)              # W_o^(h): [Hkv, G, D, d_model]
    v = v.to(dt)
    out = torch.zeros(B, n_kv, N, dtype=dt, device=v.device)
    for h in range(G):  # one [B, Hkv, N, D] at a time
        m = w_o[:, h] @ w_o[:, h].transpose(-1, -2)               # M_hh: [Hkv, D, D]
        u_sq = torch.einsum("bknd,kde,bkne->bkn", v, m, v)        # ||v_j W_o^(h)||^2
        out += probs[:, :, h].square().sum(dim=2).sqrt() * u_sq.clamp_min(0).sqrt()
    return out / G


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


def window_output_norm(probs: Tensor, v: Tensor, o_weight: Tensor, shard: Shard = SINGLE) -> Tensor:
    """||O_l[W]||_F per batch row: [B]. probs [B, Hkv, G, W, N], v [B, Hkv, N, D]. Tensor
    parallel: o_weight holds this rank's heads' columns, so the block output is the all-reduced
    sum of every rank's partial product (as the model's o_proj)."""
    B, n_kv, G, W, _ = probs.shape
    heads = torch.einsum("bkgtn,bknd->btkgd", probs, v.to(probs.dtype)).reshape(B, W, -1)
    return shard.all_reduce(heads @ o_weight.to(probs.dtype).T).flatten(1).norm(dim=-1)


@register
@dataclass
class LaProx(Policy):
    window: int = 32
    max_head_factor: float = 4
    normalize: str = "layer"       # "layer", "none" or "output" (True / False: the old spellings)
    score: str = "norm_product"    # or "frobenius"
    kernel: int = 7                # average pooling over positions; 1 = none

    name: ClassVar[str] = "laprox"
    stats: ClassVar[dict] = {"score": None}
    decode_evicts: ClassVar[bool] = False

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        f = self.max_head_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1:
            raise ValueError(f"max_head_factor must be a number >= 1, got {f!r}")
        if self._normalize() not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE} (or True / False for "
                             f"'output' / 'none'), got {self.normalize!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        k = self.kernel
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernel must be an odd int >= 1 (1, 3, 5, 7, ...), got {k!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def _normalize(self):
        n = self.normalize
        return {True: "output", False: "none"}[n] if isinstance(n, bool) else n

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

    def prefix_key(self, prompt_len, max_new_tokens):
        return (self.prefill_slots(prompt_len),)   # what a chunk keeps (the cache's budgets)

    def layer_budget(self, layer, prompt_len, max_new_tokens, capacity):
        return self.prefill_slots(prompt_len)  # finish_prefill rewrites it

    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        probs = window_probs(ctx.q, ctx.k, ctx.q_pos, ctx.pos, self.window, ctx.window)
        w_o = ctx.attn.o_proj.weight
        fn = output_error_norms if self.score == "frobenius" else norm_product_scores
        win = recent_mask(ctx.pos, last_position(ctx.q_pos), self.window)
        cand = (ctx.pos >= 0) & ~win                               # outside the window
        score = fn(probs, ctx.v, w_o).masked_fill(~cand, 0.0)      # [B, Hkv, N]
        score = pool_over_positions(score, ctx.pos, self.kernel, "avg").masked_fill(~cand, 0.0)
        norm = self._normalize()
        if norm == "layer":  # all the layer's heads (every rank's, under tensor parallelism)
            total = ctx.shard.sum_heads(score.sum(dim=-1, keepdim=True))  # [B, 1, 1]
            score = score / torch.where(total > 0, total, torch.ones_like(total))
        elif norm == "output":
            out = window_output_norm(probs, ctx.v, w_o, ctx.shard)  # [B]
            score = score / torch.where(out > 0, out, torch.ones_like(out))[:, None, None]
        return {"score": score.to(ctx.stats["score"].dtype)}

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        win = recent_mask(ctx.pos, last_position(ctx.q_pos), self.window)
        return torch.where(win, INF, ctx.stats["score"])

    def finish_prefill(self, cache, model) -> None:
        """Global top-K over all layers' stored candidates (per batch row). Tensor parallel:
        every rank gathers all ranks' candidate scores and positions (in global head order) and
        runs the same selection, then applies its own heads' part."""
        sh = shard_of(model)
        layers = list(cache.layers)
        B = layers[0].pos.shape[0]
        n_kv = layers[0].pos.shape[1] * sh.world
        k_keep = len(layers) * n_kv * (self.budget - self.window)
        cands, scores, poss = [], [], []
        for lc in layers:
            pos_l = sh.gather_heads(lc.pos)                          # [B, Hkv, S] all ranks
            last = pos_l.amax(dim=-1, keepdim=True)                  # [B, Hkv, 1] prompt's last pos
            cand = (pos_l >= 0) & (pos_l <= last - self.window)      # outside the window
            cands.append(cand)
            scores.append(sh.gather_heads(lc.score).masked_fill(~cand, -INF).reshape(B, -1))
            poss.append(pos_l.reshape(B, -1))
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
            lc.pos.masked_fill_(sh.local_heads(cand & ~keep), -1)
            lc.budget.copy_(lc.retained() + headroom)
