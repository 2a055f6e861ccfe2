"""A fused split-S Triton kernel for decode attention that also yields the probabilities.

One query per sequence and KV head group (`G` query heads share a KV head). Each program takes
one (batch row, KV head) and one chunk of `CHUNK` slots, walks it in blocks of `BLOCK_S`, and
reads each K and V block once in the cache's dtype:

- scores `q.k * scale (+ bias)`, `-inf` where the slot is empty or outside the window, fp32
  accumulation (`tl.dot`), written out raw (`[B, Hkv, G, S]` fp32: 4 G bytes per slot against the
  2 * D * 2 bytes of K and V read for it);
- an online softmax over the chunk, its `(m, l)` and the unnormalised `P @ V` partial (P cast to
  V's dtype, as flash kernels do).

A few torch ops then combine the chunks (flash-decoding), giving `o` and the LSE, and turn the raw
scores into probabilities `exp(s - lse)`. It is the `"triton"` choice of
`flexkv.attention.DECODE_PROBS`; inside `torch.compile` the kernel is traced as a user-defined
Triton kernel (CUDA graphs keep working). Without Triton (CPU CI) `HAS_TRITON` is False; with
`TRITON_INTERPRET=1` set before import the kernel runs on CPU tensors (the tests use that).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs
    triton = tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)
BLOCK_S = 64
TARGET_PROGRAMS = 1024  # enough (batch row, KV head, chunk) programs to fill an H100 a few times


def supported(q: Tensor, k: Tensor) -> bool:
    """What the kernel handles: CUDA tensors (any device under `TRITON_INTERPRET=1`), fp16/bf16/fp32
    caches, head dim a power of two >= 16."""
    D = k.shape[-1]
    return (HAS_TRITON and (k.is_cuda or INTERPRET)
            and k.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and D >= 16 and (D & (D - 1)) == 0)


def chunking(S: int, rows: int) -> tuple[int, int]:
    """(CHUNK, number of chunks) for S slots and `rows` = B * Hkv (static Python ints)."""
    want = max(1, TARGET_PROGRAMS // max(1, rows))
    chunk = BLOCK_S * max(1, math.ceil(S / (want * BLOCK_S)))
    return chunk, math.ceil(S / chunk)


if HAS_TRITON:

    @triton.jit
    def _decode_probs_kernel(Q, K, V, KPOS, QPOS, BIAS, SCORES, PO, PM, PL,
                             sm_scale, S, NC, N_KV, WINDOW,
                             CHUNK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                             BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
        pid_c = tl.program_id(0)
        pid_bh = tl.program_id(1)  # b * N_KV + kv head
        b = pid_bh // N_KV
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        g_ok = offs_g < G
        q = tl.load(Q + (pid_bh * G + offs_g[:, None]) * D + offs_d[None, :],
                    mask=g_ok[:, None], other=0.0)
        qp = tl.load(QPOS + b)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = pid_c * CHUNK
        for off in range(0, CHUNK, BLOCK):
            offs_s = start + off + tl.arange(0, BLOCK)
            s_in = offs_s < S
            kb = tl.load(K + (pid_bh * S + offs_s[:, None]) * D + offs_d[None, :],
                         mask=s_in[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(kb), input_precision=PREC)              # [GP, BLOCK] fp32
            sc = (sc * sm_scale).to(tl.float32)  # inductor may pass the scale as an fp64 scalar
            kp = tl.load(KPOS + pid_bh * S + offs_s, mask=s_in, other=-1)
            ok = kp >= 0
            if HAS_WINDOW:
                ok = ok & (qp - kp < WINDOW)
            if HAS_BIAS:
                bias = tl.load(BIAS + pid_bh * S + offs_s, mask=s_in, other=0.0)
                sc = sc + bias[None, :].to(tl.float32)
            sc = tl.where(ok[None, :], sc, float("-inf"))
            tl.store(SCORES + (pid_bh * G + offs_g[:, None]) * S + offs_s[None, :], sc,
                     mask=g_ok[:, None] & s_in[None, :])
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = tl.load(V + (pid_bh * S + offs_s[:, None]) * D + offs_d[None, :],
                         mask=s_in[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
            m_i = m_new
        part = pid_bh * NC + pid_c
        tl.store(PO + (part * G + offs_g[:, None]) * D + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(PM + part * G + offs_g, m_i, mask=g_ok)
        tl.store(PL + part * G + offs_g, l_i, mask=g_ok)


def decode_attention_probs(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                           window: int | None = None, bias: Tensor | None = None):
    """q: [B, H, 1, D]; k, v: [B, Hkv, S, D]; k_pos: [B, Hkv, S]; q_pos: [B, 1]; bias:
    [B, Hkv, S] or None. Returns (o [B, H, 1, D] in q's dtype, probs [B, Hkv, G, S] fp32)."""
    if not supported(q, k):
        raise ValueError("flexkv.triton_decode needs Triton, CUDA tensors (or TRITON_INTERPRET=1), "
                         "an fp16/bf16/fp32 cache and a power-of-two head dim >= 16, got a "
                         f"{k.dtype} cache on {k.device}, head dim {k.shape[-1]} "
                         f"(Triton installed: {HAS_TRITON})")
    B, H, _, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    G = H // n_kv
    rows = B * n_kv
    chunk, nc = chunking(S, rows)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    k_pos = k_pos.contiguous()
    q_pos = q_pos.reshape(B).contiguous()
    dev = q.device
    scores = torch.empty(B, n_kv, G, S, dtype=torch.float32, device=dev)
    po = torch.empty(rows, nc, G, D, dtype=torch.float32, device=dev)
    pm = torch.empty(rows, nc, G, dtype=torch.float32, device=dev)
    pl = torch.empty(rows, nc, G, dtype=torch.float32, device=dev)
    bias_t = k_pos if bias is None else bias.contiguous()  # (unread without a bias; no alias
    # of an output: inductor's mutation analysis sees each output once)
    prec = "ieee" if k.dtype == torch.float32 else "tf32"
    gp = 16  # query rows padded to a tl.dot tile (plain Python: traced by dynamo as constants)
    while gp < G:
        gp *= 2
    _decode_probs_kernel[(nc, rows)](
        q, k, v, k_pos, q_pos, bias_t, scores, po, pm, pl,
        1.0 / math.sqrt(D), S, nc, n_kv, 0 if window is None else int(window),
        CHUNK=chunk, G=G, GP=gp, D=D, BLOCK=BLOCK_S,
        HAS_BIAS=bias is not None, HAS_WINDOW=window is not None, PREC=prec,
        num_warps=4, num_stages=2)
    return combine(scores, po, pm, pl, B, n_kv, G, q.dtype)


def combine(scores: Tensor, po: Tensor, pm: Tensor, pl: Tensor, B: int, n_kv: int, G: int,
            out_dtype: torch.dtype):
    """Merge the chunks' (m, l, P@V) partials (flash-decoding) and normalise the raw scores.
    scores: [B, Hkv, G, S]; po: [B*Hkv, NC, G, D]; pm, pl: [B*Hkv, NC, G]."""
    D = po.shape[-1]
    m = pm.amax(dim=1, keepdim=True)                    # [rows, 1, G]
    w = torch.exp(pm - m)                               # empty chunks (-inf) weigh 0
    denom = (pl * w).sum(dim=1)                         # [rows, G]
    o = (po * w[..., None]).sum(dim=1) / denom[..., None]
    lse = (m.squeeze(1) + torch.log(denom)).view(B, n_kv, G, 1)
    probs = torch.exp(scores - lse)
    return o.to(out_dtype).reshape(B, n_kv * G, 1, D), probs
