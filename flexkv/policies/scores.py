"""Attention statistics shared by the policies (static-shape tensor code, no host sync).

Shapes: B batch, H query heads, Hkv KV heads, G = H / Hkv, N cached tokens, W window queries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flexkv import attention
from flexkv.attention import causal_range

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


def column_sums(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, lse: Tensor | None,
                window: int | None = None, block: int = 256, bias: Tensor | None = None,
                keys_end_with_queries: bool = False) -> Tensor:
    """H2O's prefill score: sum over all queries of the group-mean attention each key receives,
    recomputed blockwise from the attention's log-sum-exp (never materialises Tq x N at once).
    lse: [B, H, Tq], or None: then each block's rows are normalised directly (a softmax).
    bias: [B, Hkv, N], the score bias the attention used (if any). -> [B, Hkv, N].
    `keys_end_with_queries`: the keys are [cached slots of earlier positions | the queries' own
    tokens] (a prefill chunk, as in `attention.prefill_attention`).

    On CUDA (with the LSE) one FlexAttention pass computes them for any mask
    (`_flex_column_sums`), except inside compiled code (a compiled prefill chunk: the blockwise
    path below, which inductor fuses; the flex pass's block mask built inside a graph was
    miscompiled by inductor's CPU flex template). Elsewhere, with the LSE and positions that
    are a causal range (`attention.causal_range`: one-shot prefill without padding), query block
    [s, e) only scores keys [s - window + 1, e) (`_causal_column_sums`): about half the work of
    the general masked path. On CPU without a window, the sums are transposed flash passes
    (`_transposed_column_sums`), for a later chunk whose queries are such a range too: one over
    the cached slots, one causal over the chunk."""
    B, H, Tq, _ = q.shape
    n_kv, N = k.shape[1], k.shape[2]
    dt = torch.promote_types(q.dtype, torch.float32)
    if lse is not None and q.is_cuda and not torch.compiler.is_compiling():
        return _flex_column_sums(q, k, q_pos, k_pos, lse, window, bias, keys_end_with_queries)
    if lse is not None and N == Tq and causal_range(q_pos, k_pos):
        if window is not None and window >= Tq:
            window = None  # no query is that far from a key
        if window is None and q.device.type == "cpu" and _transposed_ok():
            return _transposed_column_sums(q, k, lse, bias)
        return _causal_column_sums(q, k, lse, window, block, bias)
    if (lse is not None and keys_end_with_queries and window is None and N > Tq
            and q.device.type == "cpu" and attention.plain_range(q_pos) and _transposed_ok()):
        n = N - Tq
        b_c, b_t = (None, None) if bias is None else (bias[..., :n], bias[..., n:])
        cached = _transposed_column_sums(q, k[:, :, :n], lse, b_c, causal=False)
        return torch.cat([cached.masked_fill(k_pos[:, :, :n] < 0, 0.0),
                          _transposed_column_sums(q, k[:, :, n:], lse, b_t)], dim=2)
    q, k = q.to(dt), k.to(dt)  # once, not per block
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
            p = torch.exp(logits - lse_g[:, :, :, s:e, None])  # padding rows: exp(-inf - lse) = 0
        p = torch.nan_to_num(p, nan=0.0)
        out += p.sum(dim=3).mean(dim=2)
    return out


def _causal_column_sums(q: Tensor, k: Tensor, lse: Tensor, window: int | None, block: int,
                        bias: Tensor | None) -> Tensor:
    """`column_sums` when key j is visible to query i iff j <= i (and i - j < window): indices
    are positions. Per query block [s, e): scores on keys [lo, e) only (lo = s - window + 1, else
    0), `exp(score - lse)` in place, -inf on the few masked pairs (the diagonal block's upper
    triangle, the window's lower edge) before the exp, then the sum over the block's queries and
    heads. q [B, H, T, D], k [B, Hkv, T, D], lse [B, H, T] -> [B, Hkv, T] (fp32, fp64 for fp64)."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    G = H // n_kv
    dt = torch.promote_types(q.dtype, torch.float32)
    qs = (q.to(dt) * (1.0 / math.sqrt(D))).view(B, n_kv, G, T, D)  # upcast and scale once
    kt = k.to(dt).transpose(-1, -2)                                  # [B, Hkv, D, T]
    lse_g = lse.to(dt).view(B, n_kv, G, T)
    bias = None if bias is None else bias.to(dt)
    out = torch.zeros(B, n_kv, T, dtype=dt, device=q.device)
    idx = torch.arange(T, device=q.device)
    for s in range(0, T, block):
        e = min(T, s + block)
        t = e - s
        lo = 0 if window is None else max(0, s - window + 1)
        qb = qs[:, :, :, s:e].reshape(B, n_kv, G * t, D)
        p = torch.matmul(qb, kt[..., lo:e])                          # [B, Hkv, G*t, e-lo]
        pv = p.view(B, n_kv, G, t, e - lo)
        pv.sub_(lse_g[:, :, :, s:e, None])
        if bias is not None:
            p.add_(bias[:, :, None, lo:e])
        # the only masked pairs: keys after the query (columns [s, e)) and, with a window, keys
        # at least `window` before it (columns < e - window)
        cols = [(s, e)]
        if window is not None and lo < min(e - window, s):
            cols.append((lo, min(e - window, s)))
        qi = idx[s:e, None]
        for c0, c1 in cols:
            kj = idx[None, c0:c1]
            bad = kj > qi
            if window is not None:
                bad = bad | (qi - kj >= window)
            pv[..., c0 - lo:c1 - lo].masked_fill_(bad, -INF)
        p.exp_()
        out[..., lo:e] += p.sum(dim=2)
    return out / G


def _transposed_column_sums(q: Tensor, k: Tensor, lse: Tensor, bias: Tensor | None,
                            causal: bool = True) -> Tensor:
    """`column_sums` on CPU, no window, for plain causality (key j visible to query i iff j <= i)
    or, with `causal=False`, for keys every query sees (a chunk's valid cached slots; the caller
    zeroes the empty ones).

    c_j = sum_{i >= j} exp(q_i.k_j / sqrt(D) + b_j - lse_i) is itself a log-sum-exp: that of the
    attention run backwards, with the keys as queries, the queries as keys and `-lse_i` as an
    additive key bias, which is causal once both sequences are reversed. SDPA's CPU flash kernel
    computes it with its causal block skipping and returns its LSE, so the scores are computed
    once more inside the kernel, in cache, never materialised: about one more causal attention
    pass (bench/NOTES.md). q [B, H, Tq, D], k [B, Hkv, N, D] (N = Tq when causal), lse
    [B, H, Tq] -> [B, Hkv, N]."""
    B, H, Tq, _ = q.shape
    n_kv, N = k.shape[1], k.shape[2]
    G = H // n_kv
    dt = torch.promote_types(q.dtype, torch.float32)  # -lse as a mask must not round to bf16
    # bf16 q and k stay bf16: the kernel accumulates their (exact) products in fp32, as it would
    # fp32 copies' (LSE within 1e-4 of the fp32 pass at 4K), on AMX where the CPU has it (2.7x
    # faster at 4K, bench/NOTES.md session 24); it takes the fp32 mask as it is
    qk = q.dtype if q.dtype == torch.bfloat16 else dt
    order = (lambda x: x.flip(2)) if causal else (lambda x: x)   # reversed sequences if causal
    keys = order(q.to(qk))                                       # [B, H, Tq, D]
    queries = order(k.to(qk).repeat_interleave(G, dim=1))        # one copy per query head
    # [B, H, 1, Tq]; contiguous: the kernel is ~3x slower on a strided mask (the flash op's own
    # LSE is laid out [B, T, H])
    key_bias = order(lse.to(dt)).neg().contiguous()[:, :, None, :]
    # the values are never used (only the LSE is): the keys stand in, no extra tensor
    _, lse_t = attention._FLASH_CPU(queries, keys, keys, 0.0, causal, attn_mask=key_bias)[:2]
    lse_t = order(lse_t).view(B, n_kv, G, N)
    if bias is not None:
        lse_t = lse_t + bias.to(dt)[:, :, None, :]
    return lse_t.exp().mean(dim=2)


# The value head dim of a FlexAttention pass run for its LSE alone: the smallest the Triton
# template's `tl.dot` takes (a power of 2 >= 16); FlexAttention allows it to differ from the QK one.
LSE_ONLY_VALUE_DIM = 16


def _flex_column_sums(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, lse: Tensor,
                      window: int | None, bias: Tensor | None,
                      keys_end_with_queries: bool = False) -> Tensor:
    """`column_sums` as one FlexAttention pass (the CUDA path; compiled there, eager elsewhere):
    the attention transposed. Each key j (repeated for the G query heads of its KV head) is a
    query row over the chunk's queries; a score_mod subtracts each query's LSE and the mask is
    `attention.slot_mask` with the roles swapped, so row (h, j)'s LSE is
    log sum_i exp(q_hi.k_j / sqrt(D) - lse_hi) = log c_hj, in the attention's dtype with fp32
    accumulation, never materialised: one QK^T and a P @ V only `LSE_ONLY_VALUE_DIM` wide (the
    values are zeros, never used), where the blockwise path runs fp32 matmuls and ~5 elementwise
    passes over every score. With `keys_end_with_queries` the block mask is the chunk's
    structure transposed (`attention.transposed_chunk_block_mask`: the blocks no query can see
    are skipped, nothing evaluated per entry; on a one-shot causal prompt the blocks every query
    of which sees every key are full, no mask_mod), else `attention.prefill_block_mask`.
    q [B, H, Tq, D], k [B, Hkv, N, D], q_pos [B, Tq], k_pos [B, Hkv, N], lse [B, H, Tq],
    bias [B, Hkv, N] -> [B, Hkv, N] (fp32, fp64 for fp64)."""
    B, H, Tq, D = q.shape
    n_kv, N = k.shape[1], k.shape[2]
    G = H // n_kv
    dt = torch.promote_types(q.dtype, torch.float32)
    rows = k.repeat_interleave(G, dim=1) if G > 1 else k       # [B, H, N, D]
    q_lse = lse.to(dt)
    query_sees_key = attention.slot_mask(q_pos, k_pos, G, window)

    def minus_query_lse(score, b, h, r, c):
        return score - q_lse[b, h, c]

    def key_seen_by_query(b, h, r, c):
        return query_sees_key(b, h, c, r)

    if keys_end_with_queries:
        mask = attention.transposed_chunk_block_mask(key_seen_by_query, N, Tq, q.device,
                                                     attention.plain_causal(q_pos, k_pos, window))
    else:
        mask = attention.prefill_block_mask(key_seen_by_query, B, H, N, Tq, q.device)
    # values: zeros of LSE_ONLY_VALUE_DIM, never read back (only the LSE is): the kernel's
    # P @ V costs 16/D of a full-width pass, and no aliased input (the keys themselves as
    # values crash dynamo's guard check on flex's next call, torch 2.13)
    vals = q.new_zeros(B, H, Tq, LSE_ONLY_VALUE_DIM)
    if attention._AuxRequest is not None:
        _, aux = attention._flex(rows, q, vals, score_mod=minus_query_lse, block_mask=mask,
                                 return_aux=attention._AuxRequest(lse=True))
        row_lse = aux.lse
    else:  # pragma: no cover - torch < 2.9
        _, row_lse = attention._flex(rows, q, vals, score_mod=minus_query_lse, block_mask=mask,
                                     return_lse=True)
    row_lse = row_lse.to(dt).view(B, n_kv, G, N)               # -inf: no query sees the key
    if bias is not None:
        row_lse = row_lse + bias.to(dt)[:, :, None, :]
    return row_lse.exp().mean(dim=2)


_TRANSPOSED: list = []  # [bool] once checked


def _transposed_ok() -> bool:
    """Whether `_transposed_column_sums` can run here (SDPA's CPU flash op with `is_causal` and a
    broadcast additive mask together): checked once against `_causal_column_sums` on a small
    float64 case, so a torch whose kernel differs falls back to the blockwise path."""
    if not _TRANSPOSED:
        ok = False
        if attention._FLASH_CPU is not None:
            try:
                g = torch.Generator().manual_seed(0)
                q = torch.randn(1, 2, 13, 8, generator=g, dtype=torch.float64)
                k = torch.randn(1, 1, 13, 8, generator=g, dtype=torch.float64)
                b = torch.randn(1, 1, 13, generator=g, dtype=torch.float64)
                kr = k.repeat_interleave(2, dim=1)
                _, lse = attention._FLASH_CPU(q, kr, kr, 0.0, True)
                got = _transposed_column_sums(q, k, lse, b)
                ok = bool(torch.allclose(got, _causal_column_sums(q, k, lse, None, 4, b),
                                         rtol=1e-9, atol=1e-12))
            except (RuntimeError, TypeError, ValueError):
                ok = False
        _TRANSPOSED.append(ok)
    return _TRANSPOSED[0]


def pool_over_positions(score: Tensor, pos: Tensor, kernel: int, mode: str = "max") -> Tensor:
    """Max- or average-pool (`mode` "max" / "avg"; stride 1, padding kernel//2, zero padding
    counted in the average, as `F.avg_pool1d`'s default and SnapKV's code) along the order of
    positions, not slots. score, pos: [B, Hkv, N]; empty slots contribute 0 (what they get back
    is meaningless: callers mask them)."""
    if kernel <= 1:
        return score
    order = pos.argsort(dim=-1, stable=True)
    s = score.gather(-1, order).masked_fill(pos.gather(-1, order) < 0, 0.0)
    B, Hk, N = s.shape
    pool = F.avg_pool1d if mode == "avg" else F.max_pool1d
    pooled = pool(s.reshape(B * Hk, 1, N), kernel, stride=1, padding=kernel // 2)
    pooled = pooled.reshape(B, Hk, N)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)


def recent_mask(pos: Tensor, last_pos: Tensor, w: int) -> Tensor:
    """Slots holding one of the `w` most recent positions (pos > last - w). last_pos: [B, 1]."""
    return (pos >= 0) & (pos > last_pos[:, :, None] - w)


def last_position(q_pos: Tensor) -> Tensor:
    """[B, T] -> [B, 1] the newest position (per row; padding is -1 and on the left)."""
    return q_pos.amax(dim=-1, keepdim=True)
