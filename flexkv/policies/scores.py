"""Attention statistics shared by the policies (static-shape tensor code, no host sync).

Shapes: B batch, H query heads, Hkv KV heads, G = H / Hkv, N cached tokens, W window queries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

INF = float("inf")


def group_queries(q: Tensor, n_kv: int) -> Tensor:
    """[B, H, T, D] -> [B, Hkv, G, T, D]."""
    B, H, T, D = q.shape
    return q.view(B, n_kv, H // n_kv, T, D)


def masked_scores(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Scaled logits of queries q [B, H, Tq, D] on keys k [B, Hkv, N, D] with the position
    mask (causal, empty slots, sliding window) applied as -inf. -> [B, Hkv, G, Tq, N] (float32+)."""
    n_kv, D = k.shape[1], k.shape[-1]
    qg = group_queries(q, n_kv)
    dt = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bkgtd,bknd->bkgtn", qg.to(dt), k.to(dt)) / math.sqrt(D)
    kp = k_pos[:, :, None, None, :]
    qp = q_pos[:, None, None, :, None]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok = ok & (qp - kp < window)
    return s.masked_fill(~ok, -INF)


def window_probs(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, w: int,
                 window: int | None = None, bias: Tensor | None = None) -> Tensor:
    """Attention probabilities of the last `w` queries (SnapKV's observation window), causal
    inside the window. -> [B, Hkv, G, w, N]. Fully masked rows (padding) give zeros.
    bias: [B, Hkv, N], a score bias the attention uses (e.g. `log_mass`), if any."""
    s = masked_scores(q[:, :, -w:], k, q_pos[:, -w:], k_pos, window)
    if bias is not None:
        s = s + bias[:, :, None, None, :]
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)


def column_sums(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, lse: Tensor,
                window: int | None = None, block: int = 256, bias: Tensor | None = None) -> Tensor:
    """H2O's prefill score: sum over all queries of the group-mean attention each key receives,
    recomputed blockwise from FlexAttention's log-sum-exp (never materialises Tq x N at once).
    lse: [B, H, Tq], or None (the CPU attention path): then each block's rows are normalised
    directly. bias: [B, Hkv, N], the score bias the attention used (if any). -> [B, Hkv, N]."""
    B, H, Tq, _ = q.shape
    n_kv = k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    lse_g = None if lse is None else lse.view(B, n_kv, H // n_kv, Tq).to(dt)
    out = torch.zeros(B, n_kv, k.shape[2], dtype=dt, device=k.device)
    for s in range(0, Tq, block):
        e = min(Tq, s + block)
        logits = masked_scores(q[:, :, s:e], k, q_pos[:, s:e], k_pos, window)
        if bias is not None:
            logits = logits + bias[:, :, None, None, :]
        if lse_g is None:
            p = torch.softmax(logits, dim=-1)
        else:
            p = torch.exp(logits - lse_g[:, :, :, s:e, None])  # padding rows: exp(-inf - -inf)
        p = torch.nan_to_num(p, nan=0.0)
        out += p.sum(dim=3).mean(dim=2)
    return out


def pool_over_positions(score: Tensor, pos: Tensor, kernel: int) -> Tensor:
    """Max-pool (stride 1, padding kernel//2) along the order of positions, not slots.
    score, pos: [B, Hkv, N]; empty slots contribute 0 and get 0."""
    if kernel <= 1:
        return score
    order = pos.argsort(dim=-1, stable=True)
    s = score.gather(-1, order).masked_fill(pos.gather(-1, order) < 0, 0.0)
    B, Hk, N = s.shape
    pooled = F.max_pool1d(s.reshape(B * Hk, 1, N), kernel, stride=1, padding=kernel // 2)
    pooled = pooled.reshape(B, Hk, N)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)


def recent_mask(pos: Tensor, last_pos: Tensor, w: int) -> Tensor:
    """Slots holding one of the `w` most recent positions (pos > last - w). last_pos: [B, 1]."""
    return (pos >= 0) & (pos > last_pos[:, :, None] - w)


def last_position(q_pos: Tensor) -> Tensor:
    """[B, T] -> [B, 1] the newest position (per row; padding is -1 and on the left)."""
    return q_pos.amax(dim=-1, keepdim=True)
