"""FlexAttention paths equal plain dense attention on random inputs (eager flex; the compiled
decode step runs the same score_mod and is covered by the recompile tests)."""
import math
from unittest import mock

import pytest

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from flexkv import attention
from flexkv.policies import scores

SET = settings(max_examples=15, deadline=None)  # derandomized under CI (conftest)
# tests that run eager flex several times per example (its CPU fallback costs ~1-2 s a draw)
FLEX_SET = settings(max_examples=6, deadline=None)


def dense(q, k, v, q_pos, k_pos, window=None, bias=None):
    """q [B,H,Tq,D], k/v [B,Hkv,N,D], q_pos [B,Tq], k_pos [B,Hkv,N] -> o, probs [B,H,Tq,N]."""
    G = q.shape[1] // k.shape[1]
    k, v, kp = (x.repeat_interleave(G, dim=1) for x in (k, v, k_pos))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.repeat_interleave(G, dim=1)[:, :, None, :]
    ok = (kp[:, :, None, :] >= 0) & (kp[:, :, None, :] <= q_pos[:, None, :, None])
    if window is not None:
        ok &= q_pos[:, None, :, None] - kp[:, :, None, :] < window
    p = torch.nan_to_num(s.masked_fill(~ok, -math.inf).softmax(-1), nan=0.0)
    return p @ v, p


@st.composite
def case(draw):
    B, n_kv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    N, D = draw(st.integers(1, 40)), draw(st.sampled_from([8, 16]))
    window = draw(st.one_of(st.none(), st.integers(1, 20)))
    seed = draw(st.integers(0, 1000))
    return B, n_kv, G, N, D, window, seed


@SET
@given(case(), st.booleans())
def test_decode_flex_equals_explicit(c, with_bias):
    B, n_kv, G, N = c[:4]
    q, k, v, k_pos, q_pos, window, bias = _decode_case(c, with_bias, torch.float64)
    o_ref, p_ref = dense(q, k, v, q_pos, k_pos, window, bias)
    sm = attention.masked_decode_score(k_pos, q_pos, G, window, bias)
    o_flex = flex_attention(q, k, v, score_mod=sm, enable_gqa=G > 1)
    o_blocks = flex_attention(q, k, v, score_mod=sm, enable_gqa=G > 1,
                              block_mask=attention.decode_block_mask(N, q.device))
    o_exp, p_exp = attention.explicit_decode_attention(q, k, v, k_pos, q_pos, window, bias)
    o_sdpa = attention.sdpa_decode_attention(q, k, v, k_pos, q_pos, window, bias)
    torch.testing.assert_close(o_flex, o_ref)
    torch.testing.assert_close(o_blocks, o_ref)
    torch.testing.assert_close(o_exp, o_ref)
    torch.testing.assert_close(o_sdpa, o_ref)
    torch.testing.assert_close(p_exp.reshape(B, -1, 1, N), p_ref)


@FLEX_SET
@given(case(), st.integers(0, 5))
def test_prefill_and_column_sums(c, pad):
    B, n_kv, G, T, D, window, seed = c
    pad = min(pad, T - 1)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_kv * G, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(T).expand(B, T).clone()
    pos[-1] = torch.where(torch.arange(T) < pad, -1, torch.arange(T) - pad)  # left padding
    k_pos = pos[:, None, :].expand(B, n_kv, T)
    o_ref, p_ref = dense(q, k, v, pos, k_pos, window)
    ref = p_ref.sum(dim=2).view(B, n_kv, G, T).mean(dim=2)
    for impl in (attention.flex_prefill_attention, attention.dense_prefill_attention):
        o, lse = impl(q, k, v, pos, k_pos, window, return_lse=True)  # lse None on the dense path
        torch.testing.assert_close(o, o_ref)
        cs = scores.column_sums(q, k, pos, k_pos, lse, window, block=7)
        torch.testing.assert_close(cs, ref)
    # the CUDA path (one transposed flex pass; eager here), from the flex attention's LSE
    for structural in (False, True):
        torch.testing.assert_close(scores._flex_column_sums(q, k, pos, k_pos, lse, window, None,
                                                            structural), ref)


@FLEX_SET
@given(case(), st.booleans())
def test_prefill_over_a_compressed_cache_with_bias(c, per_head):
    """Chunked prefill: queries over [cached slots (per-head positions) | chunk], with a bias."""
    B, n_kv, G, T, D, window, seed = c
    g = torch.Generator().manual_seed(seed)
    S = 6
    q = torch.randn(B, n_kv * G, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, S + T, D, generator=g, dtype=torch.float64) for _ in range(2))
    cached = torch.randint(-1, 30, (B, n_kv if per_head else 1, S), generator=g).expand(B, n_kv, S)
    q_pos = (30 + torch.arange(T)).expand(B, T)
    k_pos = torch.cat([cached, q_pos[:, None, :].expand(B, n_kv, T)], dim=2)
    bias = torch.rand(B, n_kv, S + T, generator=g, dtype=torch.float64).log()
    o_ref, p_ref = dense(q, k, v, q_pos, k_pos, window, bias)
    for impl in (attention.flex_prefill_attention, attention.dense_prefill_attention):
        o, lse = impl(q, k, v, q_pos, k_pos, window, return_lse=True, bias=bias)
        torch.testing.assert_close(o, o_ref)
        cs = scores.column_sums(q, k, q_pos, k_pos, lse, window, bias=bias)
        torch.testing.assert_close(cs, p_ref.sum(dim=2).view(B, n_kv, G, S + T).mean(dim=2))
        for structural in (False, True):
            torch.testing.assert_close(scores._flex_column_sums(q, k, q_pos, k_pos, lse, window,
                                                                bias, structural), cs)


def _masked_lse(q, k, q_pos, k_pos, window=None, bias=None):
    """Reference log-sum-exp [B, H, Tq] of the masked scores (float64)."""
    G = q.shape[1] // k.shape[1]
    kk, kp = k.repeat_interleave(G, dim=1), k_pos.repeat_interleave(G, dim=1)
    s = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.repeat_interleave(G, dim=1)[:, :, None, :]
    ok = (kp[:, :, None, :] >= 0) & (kp[:, :, None, :] <= q_pos[:, None, :, None])
    if window is not None:
        ok &= q_pos[:, None, :, None] - kp[:, :, None, :] < window
    return s.masked_fill(~ok, -math.inf).logsumexp(-1)


@SET
@given(case(), st.sampled_from(["none", "random", "zero"]),
       st.sampled_from([torch.float64, torch.float32]), st.booleans(), st.integers(0, 3))
def test_causal_range_paths_equal_reference(c, bias_kind, dtype, wide_window, start):
    """One-shot prefill without padding (positions a consecutive range, the keys the queries'
    own tokens): SDPA's `is_causal` path and its LSE, and the column sums' fast paths (causal
    query blocks, the transposed flash pass) equal dense attention, as do the general masked
    paths on the same inputs (a copied k_pos is not recognised as the range)."""
    B, n_kv, G, T, D, window, seed = c
    if wide_window and window is not None:
        window += T  # no query is that far from a key: the window changes nothing
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_kv * G, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    pos = (start + torch.arange(T)).expand(B, T).contiguous()
    k_pos = pos[:, None, :].expand(B, n_kv, T)
    bias = {"none": None, "zero": torch.zeros(B, n_kv, T, dtype=torch.float64),
            "random": torch.rand(B, n_kv, T, generator=g, dtype=torch.float64).log()}[bias_kind]
    o_ref, p_ref = dense(q, k, v, pos, k_pos, window, bias)
    cs_ref = p_ref.sum(dim=2).view(B, n_kv, G, T).mean(dim=2)
    lse_ref = _masked_lse(q, k, pos, k_pos, window, bias)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    bias = None if bias is None else bias.to(dtype)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    assert attention.causal_range(pos, k_pos) and not attention.causal_range(pos, k_pos.clone())
    for kp in (k_pos, k_pos.clone()):  # the range paths, then the masked ones
        o, lse = attention.dense_prefill_attention(q, k, v, pos, kp, window, True, bias)
        torch.testing.assert_close(o.double(), o_ref, **tol)
        torch.testing.assert_close(lse.double(), lse_ref, **tol)
        torch.testing.assert_close(attention.dense_prefill_attention(q, k, v, pos, kp, window,
                                                                     bias=bias), o)
        for block in (5, 256):
            for lse_ in (lse, None):
                cs = scores.column_sums(q, k, pos, kp, lse_, window, block=block, bias=bias)
                assert cs.dtype == torch.promote_types(dtype, torch.float32)
                torch.testing.assert_close(cs.double(), cs_ref, **tol)
    eff = None if window is None or window >= T else window
    torch.testing.assert_close(scores._causal_column_sums(q, k, lse, eff, 3, bias).double(),
                               cs_ref, **tol)
    if eff is None:
        torch.testing.assert_close(scores._transposed_column_sums(q, k, lse, bias).double(),
                                   cs_ref, **tol)


@SET
@given(case(), st.sampled_from(["none", "random"]), st.sampled_from([torch.float64, torch.float32]),
       st.integers(0, 8), st.booleans())
def test_later_chunk_split_paths_equal_reference(c, bias_kind, dtype, S, empty_head):
    """A later prefill chunk on CPU, [cached slots (per-head positions, some empty) | the chunk's
    own tokens] with consecutive query positions: the attention as two flash calls merged by
    their LSEs (`_chunk_attention`, no bias) and the column sums as two transposed flash passes
    (with or without a bias) equal dense attention; so do the masked paths they replace, and a
    head whose cached slots are all empty (its cached call contributes nothing)."""
    B, n_kv, G, T, D, _, seed = c
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_kv * G, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, S + T, D, generator=g, dtype=torch.float64) for _ in range(2))
    cached = torch.randint(-1, 30, (B, n_kv, S), generator=g)
    if empty_head:
        cached[0, -1] = -1
    q_pos = (30 + torch.arange(T)).expand(B, T).contiguous()
    k_pos = torch.cat([cached, q_pos[:, None, :].expand(B, n_kv, T)], dim=2)
    bias = None if bias_kind == "none" else torch.rand(B, n_kv, S + T, generator=g,
                                                       dtype=torch.float64).log()
    o_ref, p_ref = dense(q, k, v, q_pos, k_pos, None, bias)
    lse_ref = _masked_lse(q, k, q_pos, k_pos, None, bias)
    cs_ref = p_ref.sum(dim=2).view(B, n_kv, G, S + T).mean(dim=2)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    bias = None if bias is None else bias.to(dtype)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    calls = []
    real = attention._chunk_attention
    for split in (True, False):  # the split paths, then the masked ones
        with mock.patch.object(attention, "_chunk_attention",
                               side_effect=lambda *a: calls.append(1) or real(*a)):
            o, lse = attention.dense_prefill_attention(q, k, v, q_pos, k_pos, None, True, bias,
                                                       keys_end_with_queries=split)
        torch.testing.assert_close(o.double(), o_ref, **tol)
        torch.testing.assert_close(lse.double(), lse_ref, **tol)
        cs = scores.column_sums(q, k, q_pos, k_pos, lse, bias=bias, keys_end_with_queries=split)
        torch.testing.assert_close(cs.double(), cs_ref, **tol)
    assert len(calls) == (S > 0 and bias is None)  # taken once: a chunk after cached slots, no bias


def test_later_chunk_split_needs_a_plain_range():
    """Left padding (the compiled prefill's last chunk), a window or a bias keep the masked path."""
    B, n_kv, G, S, T, D = 1, 1, 2, 4, 6, 8
    q = torch.randn(B, n_kv * G, T, D, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, S + T, D, dtype=torch.float64) for _ in range(2))
    plain = (10 + torch.arange(T)).expand(B, T).contiguous()
    padded = torch.where(torch.arange(T) < 2, -1, 8 + torch.arange(T)).expand(B, T).contiguous()
    for q_pos, window, bias in [(padded, None, None), (plain, 3, None),
                                (plain, None, torch.rand(B, n_kv, S + T, dtype=torch.float64))]:
        k_pos = torch.cat([torch.arange(S).expand(B, n_kv, S), q_pos[:, None, :]], dim=2)
        o_ref, _ = dense(q, k, v, q_pos, k_pos, window, bias)
        with mock.patch.object(attention, "_chunk_attention", side_effect=AssertionError):
            o = attention.dense_prefill_attention(q, k, v, q_pos, k_pos, window, bias=bias,
                                                  keys_end_with_queries=True)
        torch.testing.assert_close(o, o_ref)


def test_causal_range_detection():
    """`causal_range` accepts q_pos itself broadcast over the heads with consecutive positions
    from >= 0, and nothing else; its memo follows in-place changes of q_pos."""
    B, n_kv, T = 2, 3, 6
    pos = torch.arange(T).expand(B, T).contiguous()
    k_pos = pos[:, None, :].expand(B, n_kv, T)
    assert attention.causal_range(pos, k_pos) and attention.causal_range(pos, pos)
    assert attention.causal_range(pos[:, 2:], pos[:, None, 2:].expand(B, n_kv, T - 2))
    assert not attention.causal_range(pos, k_pos.clone())            # not q_pos's own data
    assert not attention.causal_range(pos[:, 1:], k_pos[..., :-1])   # other tokens
    assert not attention.causal_range(pos[:, 1:], k_pos)             # more keys than queries
    pad = torch.where(torch.arange(T) < 2, -1, torch.arange(T) - 2).expand(B, T).contiguous()
    assert not attention.causal_range(pad, pad[:, None, :].expand(B, n_kv, T))  # left padding
    gap = (2 * torch.arange(T)).expand(B, T).contiguous()
    assert not attention.causal_range(gap, gap[:, None, :].expand(B, n_kv, T))
    assert attention.causal_range(pos, k_pos)
    pos[1, 3] = 9  # in place: the memo must not answer for the old values
    assert not attention.causal_range(pos, k_pos)


def test_causal_range_of_inference_tensors():
    """Positions made under `torch.inference_mode()` (no version counter) are checked afresh
    each time: an in-place change is seen, and nothing raises."""
    B, n_kv, T = 2, 3, 6
    with torch.inference_mode():
        pos = torch.arange(T).expand(B, T).contiguous()
        k_pos = pos[:, None, :].expand(B, n_kv, T)
        assert attention.causal_range(pos, k_pos) and attention.causal_range(pos, k_pos)
        pos[1, 3] = 9
        assert not attention.causal_range(pos, k_pos)
    assert not attention.causal_range(pos, k_pos)  # outside inference mode too


def test_prefill_lse_fallbacks(monkeypatch):
    """Without SDPA's CPU flash op the dense path returns (o, None) and the column sums
    normalise rows themselves; without the transposed pass they use the causal blocks; a bf16
    model's column sums stay within bf16 rounding of the fp64 reference."""
    g = torch.Generator().manual_seed(0)
    B, n_kv, G, T, D = 2, 2, 3, 45, 16
    q = torch.randn(B, n_kv * G, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(T).expand(B, T).contiguous()
    k_pos = pos[:, None, :].expand(B, n_kv, T)
    o_ref, p_ref = dense(q, k, v, pos, k_pos)
    cs_ref = p_ref.sum(dim=2).view(B, n_kv, G, T).mean(dim=2)
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    o, lse = attention.dense_prefill_attention(qb, kb, vb, pos, k_pos, return_lse=True)
    assert lse.dtype == torch.float32
    cs = scores.column_sums(qb, kb, pos, k_pos, lse)
    assert cs.dtype == torch.float32
    torch.testing.assert_close(cs.double(), cs_ref, atol=0.05, rtol=0.03)
    monkeypatch.setattr(scores, "_TRANSPOSED", [False])
    o, lse = attention.dense_prefill_attention(q, k, v, pos, k_pos, return_lse=True)
    torch.testing.assert_close(scores.column_sums(q, k, pos, k_pos, lse), cs_ref)
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    o, lse = attention.dense_prefill_attention(q, k, v, pos, k_pos, return_lse=True)
    assert lse is None
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(scores.column_sums(q, k, pos, k_pos, None, block=7), cs_ref)


def test_bf16_column_sums_equal_those_of_fp32_copies():
    """The transposed column-sum pass keeps a bf16 model's q and k in bf16 (AMX on CPUs that
    have it): its sums equal those computed from fp32 copies of the same values to ~1e-4 (the
    kernel's accumulation order), far inside bf16's own rounding; one-shot and a later chunk."""
    g = torch.Generator().manual_seed(3)
    B, n_kv, G, T, D = 1, 2, 3, 300, 64
    q = torch.randn(B, n_kv * G, T, D, generator=g).bfloat16()
    k, v = (torch.randn(B, n_kv, T, D, generator=g).bfloat16() for _ in range(2))
    pos = torch.arange(T).expand(B, T).contiguous()
    k_pos = pos[:, None, :].expand(B, n_kv, T)
    _, lse = attention.dense_prefill_attention(q, k, v, pos, k_pos, return_lse=True)
    cs = scores.column_sums(q, k, pos, k_pos, lse)
    torch.testing.assert_close(cs, scores.column_sums(q.float(), k.float(), pos, k_pos, lse),
                               rtol=2e-4, atol=1e-6)
    n = 100  # a later chunk: 100 cached slots (two empty), then the 200 queries' own tokens
    cached = torch.arange(n).expand(B, n_kv, n).clone()
    cached[:, :, 5:7] = -1
    kp = torch.cat([cached, pos[:, None, n:].expand(B, n_kv, T - n)], dim=2)
    qc, qp = q[:, :, n:], pos[:, n:]
    _, lse = attention.dense_prefill_attention(qc, k, v, qp, kp, return_lse=True,
                                               keys_end_with_queries=True)
    cs = scores.column_sums(qc, k, qp, kp, lse, keys_end_with_queries=True)
    ref = scores.column_sums(qc.float(), k.float(), qp, kp, lse, keys_end_with_queries=True)
    torch.testing.assert_close(cs, ref, rtol=2e-4, atol=1e-6)


def test_compiled_flex_decode_score_mod():
    """The decode score_mod (validity, window, bias) traces with fullgraph through dynamo and AOT
    autograd and equals dense attention. It is the CUDA decode path (test_cuda.py compiles it
    with inductor's Triton template); CPU decode takes the explicit path, so inductor's CPU flex
    template (~25 s to compile here) would test code no CPU user runs. With the decode block
    mask built inside the graph (`attention.decode_block_mask`: 3 key blocks of 128, the last
    partial), as the compiled step builds it."""
    g = torch.Generator().manual_seed(0)
    B, n_kv, G, N, D = 2, 2, 2, 300, 16
    q = torch.randn(B, n_kv * G, 1, D, generator=g)
    k, v = (torch.randn(B, n_kv, N, D, generator=g) for _ in range(2))
    k_pos = torch.randint(-1, 50, (B, n_kv, N), generator=g)
    k_pos[..., 0] = 50
    q_pos = torch.full((B, 1), 50)
    bias = torch.rand(B, n_kv, N, generator=g).log()
    sm = attention.masked_decode_score(k_pos, q_pos, G, 20, bias)

    def step(q, k, v):
        return flex_attention(q, k, v, score_mod=sm, enable_gqa=True,
                              block_mask=attention.decode_block_mask(k.shape[2], q.device))

    o = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    assert attention.decode_block_mask(N, "cpu").kv_num_blocks.tolist() == [[[3]]]
    torch.testing.assert_close(o, dense(q, k, v, q_pos, k_pos, 20, bias)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S", [1, 128, 300])
def test_flex_decode_splits_the_keys_into_blocks(monkeypatch, S):
    """The flex decode (the compiled CUDA path, forced here) passes a block mask of ceil(S / 128)
    key blocks, every one visited: without one, flex_attention's default single 2**30-key block
    made torch 2.11's flex-decoding kernel walk every key in one thread block per head (the
    first H200 run, bench/NOTES.md session 22). Same output as dense attention."""
    c = (1, 2, 4, S, 16, None, 5)
    q, k, v, k_pos, q_pos, window, bias = _decode_case(c, True, torch.float64)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("block_mask"))
        return flex_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "use_flex_decode", lambda q: True)
    monkeypatch.setattr(attention, "flex_attention", spy)
    o, probs = attention.decode_attention(q, k, v, k_pos, q_pos, window, bias)
    n = -(-S // 128)
    assert probs is None and len(seen) == 1 and seen[0] is not None
    assert seen[0].kv_num_blocks.tolist() == [[[n]]]
    assert seen[0].kv_indices.tolist() == [[[list(range(n))]]]
    assert seen[0].BLOCK_SIZE == (128, 128) and seen[0].seq_lengths == (1, S)
    torch.testing.assert_close(o, dense(q, k, v, q_pos, k_pos, window, bias)[0])


def _decode_case(c, with_bias, dtype):
    B, n_kv, G, N, D, window, seed = c
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_kv * G, 1, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    k_pos = torch.randint(-1, 50, (B, n_kv, N), generator=g)
    k_pos[..., 0] = 50  # the new token itself is always cached
    q_pos = torch.full((B, 1), 50)
    bias = torch.rand(B, n_kv, N, generator=g, dtype=torch.float64).log() if with_bias else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), k_pos, q_pos, window, cast(bias)


@SET
@given(case(), st.booleans(), st.sampled_from([torch.float64, torch.float32]))
def test_decode_probs_paths_equal_dense(c, with_bias, dtype):
    """Every `DECODE_PROBS` path equals dense attention, and equals the explicit (reference)
    path within 1e-12 (fp64) / 1e-6 (fp32): for fp32/fp64 caches nothing is read differently."""
    q, k, v, k_pos, q_pos, window, bias = _decode_case(c, with_bias, dtype)
    B, N = q.shape[0], k.shape[2]
    o_ref, p_ref = dense(*(x.double() for x in (q, k, v)), q_pos, k_pos, window,
                         None if bias is None else bias.double())
    o_exp, p_exp = attention.explicit_decode_attention(q, k, v, k_pos, q_pos, window, bias)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for name, fn in attention.DECODE_PATHS.items():
        o, p = fn(q, k, v, k_pos, q_pos, window, bias)
        assert o.dtype == dtype and o.shape == q.shape, name
        assert p.dtype == dtype and p.shape == p_exp.shape, name
        torch.testing.assert_close(o, o_exp, atol=tol, rtol=0, msg=lambda m: f"{name}: o: {m}")
        torch.testing.assert_close(p, p_exp, atol=tol, rtol=0, msg=lambda m: f"{name}: p: {m}")
        torch.testing.assert_close(o.double(), o_ref, atol=10 * tol, rtol=0)
        torch.testing.assert_close(p.double().reshape(B, -1, 1, N), p_ref, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("path", attention.DECODE_PROBS_PATHS)
def test_decode_attention_follows_decode_probs(monkeypatch, path):
    """`decode_attention(need_probs=True)` runs the `DECODE_PROBS` path (bf16 cache on CPU:
    within bf16 rounding of dense fp64 attention); an unknown name is a ValueError."""
    c = (2, 2, 4, 37, 16, 20, 3)
    q, k, v, k_pos, q_pos, window, bias = _decode_case(c, True, torch.bfloat16)
    monkeypatch.setattr(attention, "DECODE_PROBS", path)
    o, p = attention.decode_attention(q, k, v, k_pos, q_pos, window, bias, need_probs=True)
    o_ref, p_ref = dense(*(x.double() for x in (q, k, v)), q_pos, k_pos, window, bias.double())
    assert o.dtype == torch.bfloat16 and p.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, atol=3e-2, rtol=0)
    torch.testing.assert_close(p.double().reshape(p_ref.shape), p_ref, atol=1e-2, rtol=0)
    o2, none = attention.decode_attention(q, k, v, k_pos, q_pos, window, bias)
    assert none is None
    torch.testing.assert_close(o2.double(), o_ref, atol=3e-2, rtol=0)
    monkeypatch.setattr(attention, "DECODE_PROBS", "nope")
    with pytest.raises(ValueError, match="DECODE_PROBS"):
        attention.decode_attention(q, k, v, k_pos, q_pos, window, bias, need_probs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_decode_without_probs_takes_sdpa_when_exact(monkeypatch, dtype, with_bias):
    """Eager decode without probabilities runs one SDPA call, except with a bias on a
    low-precision cache (the bias would be rounded to bf16 in SDPA's mask) and under the
    explicit reference; every case equals dense attention."""
    c = (2, 2, 4, 37, 16, 20, 3)
    q, k, v, k_pos, q_pos, window, bias = _decode_case(c, with_bias, dtype)
    calls = []
    real = attention.sdpa_decode_attention
    monkeypatch.setattr(attention, "sdpa_decode_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    o, none = attention.decode_attention(q, k, v, k_pos, q_pos, window, bias)
    assert none is None and o.dtype == dtype
    assert len(calls) == (0 if with_bias and dtype == torch.bfloat16 else 1)
    o_ref, _ = dense(*(x.double() for x in (q, k, v)), q_pos, k_pos, window,
                     None if bias is None else bias.double())
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=0)
    monkeypatch.setattr(attention, "DECODE_PROBS", "explicit")
    attention.decode_attention(q, k, v, k_pos, q_pos, window, bias)
    assert len(calls) == (0 if with_bias and dtype == torch.bfloat16 else 1)


@SET
@given(case(), st.booleans())
def test_split_s_combine_equals_dense(c, with_bias):
    """The Triton kernel's chunk partials, emulated in torch, merge (`triton_decode.combine`)
    into dense attention's o and probabilities (the kernel itself: test_triton_decode_kernel)."""
    from flexkv import triton_decode as td

    q, k, v, k_pos, q_pos, window, bias = _decode_case(c, with_bias, torch.float64)
    B, H, _, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    G = H // n_kv
    chunk, nc = 8, -(-S // 8)
    s = (q.view(B, n_kv, G, D) @ k.transpose(-1, -2)) / math.sqrt(D)
    if bias is not None:
        s = s + bias[:, :, None, :]
    ok = k_pos[:, :, None, :] >= 0
    if window is not None:
        ok = ok & (q_pos[:, :, None, None] - k_pos[:, :, None, :] < window)
    s = s.masked_fill(~ok, -math.inf)
    po = torch.zeros(B * n_kv, nc, G, D, dtype=q.dtype)
    pm = torch.full((B * n_kv, nc, G), -math.inf, dtype=q.dtype)
    pl = torch.zeros(B * n_kv, nc, G, dtype=q.dtype)
    for ci in range(nc):
        sc = s[..., ci * chunk:(ci + 1) * chunk].reshape(B * n_kv, G, -1)
        m = sc.amax(-1)
        p = torch.exp(sc - torch.where(m.isinf(), 0.0, m)[..., None])
        pm[:, ci], pl[:, ci] = m, p.sum(-1)
        po[:, ci] = p @ v[:, :, ci * chunk:(ci + 1) * chunk].reshape(B * n_kv, -1, D)
    o, probs = td.combine(s, po, pm, pl, B, n_kv, G, q.dtype)
    o_ref, p_ref = dense(q, k, v, q_pos, k_pos, window, bias)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(probs.reshape(p_ref.shape), p_ref)
    assert td.chunking(S, B * n_kv)[0] % td.BLOCK_S == 0


def test_triton_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    """With Triton installed (a CUDA build of torch on a machine without a GPU), CPU tensors go to
    "lowp" instead of a kernel launch that finds no driver; under TRITON_INTERPRET=1 they run."""
    from flexkv import triton_decode as td

    q, k = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(td, "HAS_TRITON", True)
    monkeypatch.setattr(td, "INTERPRET", False)
    assert not td.supported(q, k)
    with pytest.raises(ValueError, match="CUDA tensors"):
        td.decode_attention_probs(q, k, k, torch.zeros(1, 2, 8, dtype=torch.long),
                                  torch.zeros(1, 1, dtype=torch.long))
    monkeypatch.setattr(td, "INTERPRET", True)
    assert td.supported(q, k)
    assert not td.supported(q, k[..., :12])  # head dim not a power of two


def test_triton_decode_kernel():
    """The Triton kernel itself equals dense attention: on CUDA, or on CPU under Triton's
    interpreter (TRITON_INTERPRET=1 set before flexkv is imported; skipped without Triton)."""
    from flexkv import triton_decode as td

    if not td.HAS_TRITON:
        pytest.skip("Triton is not installed")
    import os
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    for c, with_bias in [((2, 2, 4, 37, 16, 20, 3), True), ((1, 1, 1, 200, 32, None, 4), False),
                         ((2, 2, 2, 5, 16, 2, 5), True)]:
        # (Triton 3.6's interpreter computes bf16 tl.dot wrongly: bf16 is checked on CUDA only)
        for dtype in (torch.float32, torch.bfloat16) if dev == "cuda" else (torch.float32,):
            q, k, v, k_pos, q_pos, window, bias = (
                None if x is None else x.to(dev) if not isinstance(x, int) else x
                for x in _decode_case(c, with_bias, dtype))
            o, p = td.decode_attention_probs(q, k, v, k_pos, q_pos, window,
                                             None if bias is None else bias.float())
            o_ref, p_ref = dense(*(x.double() for x in (q, k, v)), q_pos, k_pos, window,
                                 None if bias is None else bias.double())
            atol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(o.double(), o_ref, atol=atol, rtol=0)
            torch.testing.assert_close(p.double().reshape(p_ref.shape), p_ref,
                                       atol=atol if dtype == torch.float32 else 1e-2, rtol=0)


def test_large_prefill_block_mask_is_compiled_and_equal(monkeypatch):
    """Above BLOCK_MASK_EAGER_MAX entries the prefill's block mask comes from a compiled
    create_block_mask (no B x H x T x T mask in memory: what a 32K CUDA prefill needs); it equals
    the eager one on a padded, windowed mask with per-head cached positions."""
    B, n_kv, G, S, T = 2, 2, 2, 40, 300
    g = torch.Generator().manual_seed(0)
    cached = torch.randint(-1, 200, (B, n_kv, S), generator=g)
    q_pos = (200 + torch.arange(T)).expand(B, T).clone()
    q_pos[1, :7] = -1                                         # a padded row
    k_pos = torch.cat([cached, q_pos[:, None, :].expand(B, n_kv, T)], dim=2)
    mask = attention.slot_mask(q_pos, k_pos, G, window=96)
    H, Tk = n_kv * G, S + T
    eager = attention.create_block_mask(mask, B, H, T, Tk, device="cpu")
    monkeypatch.setattr(attention, "BLOCK_MASK_EAGER_MAX", B * H * T * Tk - 1)
    compiled = attention.prefill_block_mask(mask, B, H, T, Tk, "cpu")
    assert attention._compiled_block_mask is not None
    for name in ("kv_num_blocks", "full_kv_num_blocks"):   # partial / full blocks per row
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name
    assert torch.equal(eager.to_dense(), compiled.to_dense())


@st.composite
def chunk_case(draw):
    """A prefill chunk over a cache: block-spanning sizes (FlexAttention's blocks are 128)."""
    B, n_kv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    S = draw(st.sampled_from([0, 0, 5, 128, 200]))           # cached slots (0: a first chunk)
    T = draw(st.sampled_from([1, 7, 128, 129, 300]))
    pad = draw(st.integers(0, T - 1)) if draw(st.booleans()) else 0
    window = draw(st.one_of(st.none(), st.sampled_from([1, 50, 200])))
    return B, n_kv, G, S, T, pad, window, draw(st.integers(0, 1000)), draw(st.booleans())


def _chunk_inputs(c):
    B, n_kv, G, S, T, pad, window, seed, per_head = c
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_kv * G, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n_kv, S + T, 8, generator=g, dtype=torch.float64) for _ in range(2))
    start = 300
    q_pos = (start + torch.arange(T)).expand(B, T).clone()
    q_pos[-1] = torch.where(torch.arange(T) < pad, -1, start + torch.arange(T) - pad)  # left pad
    cached = torch.randint(-1, start, (B, n_kv if per_head else 1, S), generator=g).expand(B, n_kv, S)
    k_pos = torch.cat([cached, q_pos[:, None, :].expand(B, n_kv, T)], dim=2) if S else \
        q_pos[:, None, :].expand(B, n_kv, T)
    return q, k, v, q_pos, k_pos, window


@settings(max_examples=6, deadline=None)
@given(chunk_case())
@example((1, 1, 2, 0, 129, 0, None, 0, False))     # one-shot causal: full blocks, a 1-row last block
@example((2, 2, 2, 200, 300, 17, 50, 1, True))     # cache + chunk, padding, window, per-head slots
def test_chunk_block_mask_gives_the_exact_attention(c):
    """The flex prefill path with the structural block mask (`keys_end_with_queries`, what every
    prefill chunk takes on CUDA) equals dense attention and its LSE: padded rows, per-head cached
    positions with empty slots, windows, sizes across several 128-blocks, first chunks (whose
    causal blocks become full when the positions are a plain range)."""
    q, k, v, q_pos, k_pos, window = _chunk_inputs(c)
    o_ref, _ = dense(q, k, v, q_pos, k_pos, window)
    o, lse = attention.flex_prefill_attention(q, k, v, q_pos, k_pos, window, return_lse=True,
                                              keys_end_with_queries=True)
    torch.testing.assert_close(o, o_ref)
    ok = o_ref.abs().sum(-1) > 0                       # rows with a visible key
    torch.testing.assert_close(lse[ok], _masked_lse(q, k, q_pos, k_pos, window)[ok])


def assert_structure_covers(q, k, q_pos, k_pos, window):
    """Every (query, key) entry the position mask lets through lies in a block that
    `chunk_block_mask` visits. Returns (the block mask, the dense mask [B, H, Tq, Tk], full)."""
    T, Tk, G, bs = q.shape[2], k.shape[2], q.shape[1] // k.shape[1], 128
    kp = k_pos.repeat_interleave(G, dim=1)[:, :, None, :]
    ok = (kp >= 0) & (kp <= q_pos[:, None, :, None])                     # [B, H, T, Tk]
    if window is not None:
        ok &= q_pos[:, None, :, None] - kp < window
    full = attention.plain_causal(q_pos, k_pos, window)
    mine = attention.chunk_block_mask(attention.slot_mask(q_pos, k_pos, G, window), T, Tk,
                                      q.device, full)
    visited = mine.to_dense().bool()[0, 0]                               # [Q blocks, KV blocks]
    cells = visited.repeat_interleave(bs, 0)[:T].repeat_interleave(bs, 1)[:, :Tk]
    assert (cells | ~ok).all(), "a visible key lies in a skipped block"
    return mine, ok, full


@settings(max_examples=12, deadline=None)
@given(chunk_case())
def test_chunk_block_mask_covers_every_visible_key(c):
    """Every (query, key) entry that the mask lets through lies in a block the structural block
    mask visits, and a block it marks full (no mask_mod applied) is visible on every real query
    row; on a one-shot causal prefill it has exactly create_block_mask's full blocks, except a
    last, short query block (create_block_mask counts its padding rows as masked)."""
    q, k, v, q_pos, k_pos, window = _chunk_inputs(c)
    B, H, T = q.shape[0], q.shape[1], q.shape[2]
    Tk, bs = k.shape[2], 128
    mine, ok, full = assert_structure_covers(q, k, q_pos, k_pos, window)
    visited = mine.to_dense().bool()[0, 0]
    if not full:
        assert (mine.full_kv_num_blocks == 0).all()
        return
    for m in range(visited.shape[0]):
        for b in mine.full_kv_indices[0, 0, m, :int(mine.full_kv_num_blocks[0, 0, m])].tolist():
            assert ok[:, :, m * bs:(m + 1) * bs, b * bs:(b + 1) * bs].all(), (m, b)
    exact = attention.create_block_mask(mine.mask_mod, B, H, T, Tk, device="cpu").full_kv_num_blocks
    whole = T // bs                                                      # query blocks without padding
    assert torch.equal(mine.full_kv_num_blocks[..., :whole].expand_as(exact[..., :whole]),
                       exact[..., :whole])


@pytest.mark.vectorized  # CPU flex's template needs the vector ISA
@pytest.mark.parametrize("c", [(2, 2, 2, 200, 300, 17, 50, 1, True)])  # cache + chunk, pad, window
def test_chunk_block_mask_in_the_compiled_kernel(c):
    """Eager flex (the CPU tests above) applies the mask_mod everywhere and ignores the block
    structure; the compiled kernel (CUDA's path; inductor's CPU template here) skips the blocks
    the mask leaves out and applies no mask_mod on full blocks, so a wrong structure shows only
    there. A chunk after a cache (~15 s of compile); the full blocks of a one-shot causal prompt
    are the transposed test's second case below (this direction's are exactly
    create_block_mask's, checked eagerly above)."""
    q, k, v, q_pos, k_pos, window = _chunk_inputs(c)
    G = q.shape[1] // k.shape[1]
    full = attention.plain_causal(q_pos, k_pos, window)
    assert full == (c[3] == 0)
    bm = attention.chunk_block_mask(attention.slot_mask(q_pos, k_pos, G, window), q.shape[2],
                                    k.shape[2], "cpu", full)
    torch._dynamo.reset()
    o = torch.compile(flex_attention, fullgraph=True, dynamic=False)(
        q.float(), k.float(), v.float(), block_mask=bm, enable_gqa=G > 1)
    o_ref, _ = dense(q, k, v, q_pos, k_pos, window)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(chunk_case())
@example((2, 2, 2, 200, 300, 17, 50, 1, True))     # cache + chunk, padding, window, per-head slots
@example((1, 1, 2, 0, 256, 0, None, 0, False))     # one-shot causal, whole blocks: full blocks
@example((1, 1, 2, 0, 129, 0, None, 0, False))     # one-shot causal, a 1-row last block
def test_transposed_chunk_block_mask_covers_every_visible_pair(c):
    """The column sums' block mask on CUDA (keys as rows, queries as columns): every (key,
    query) pair the position mask lets through lies in a visited block; a block marked full (no
    mask_mod: only on a one-shot causal prompt) is visible on every real (key, query) pair, and
    with whole blocks they are exactly create_block_mask's full blocks; the sums from it equal
    dense attention's (eager flex)."""
    q, k, v, q_pos, k_pos, window = _chunk_inputs(c)
    B, H, T, Tk, G, bs = *q.shape[:3], k.shape[2], q.shape[1] // k.shape[1], 128
    _, ok, full = assert_structure_covers(q, k, q_pos, k_pos, window)   # [B, H, T, Tk]
    key_ok = ok.transpose(-1, -2)                                        # [B, H, Tk, T]
    fwd = attention.slot_mask(q_pos, k_pos, G, window)
    mine = attention.transposed_chunk_block_mask(lambda b, h, r, c: fwd(b, h, c, r), Tk, T, "cpu",
                                                 full)
    visited = mine.to_dense().bool()[0, 0]                               # [key blocks, query blocks]
    cells = visited.repeat_interleave(bs, 0)[:Tk].repeat_interleave(bs, 1)[:, :T]
    assert (cells | ~key_ok).all(), "a visible pair lies in a skipped block"
    if not full:
        assert (mine.full_kv_num_blocks == 0).all()
    for m in range(visited.shape[0]):
        for b in mine.full_kv_indices[0, 0, m, :int(mine.full_kv_num_blocks[0, 0, m])].tolist():
            assert key_ok[:, :, m * bs:(m + 1) * bs, b * bs:(b + 1) * bs].all(), (m, b)
    if full and T % bs == 0:
        exact = attention.create_block_mask(mine.mask_mod, B, H, Tk, T, device="cpu")
        assert torch.equal(mine.full_kv_num_blocks.expand_as(exact.full_kv_num_blocks),
                           exact.full_kv_num_blocks)
    o_ref, p_ref = dense(q, k, v, q_pos, k_pos, window)
    lse = _masked_lse(q, k, q_pos, k_pos, window)
    ref = p_ref.sum(dim=2).view(q.shape[0], k.shape[1], G, Tk).mean(dim=2)
    torch.testing.assert_close(scores._flex_column_sums(q, k, q_pos, k_pos, lse, window, None, True),
                               ref)


@pytest.mark.vectorized  # CPU flex's template needs the vector ISA
@pytest.mark.parametrize("c", [(2, 2, 2, 200, 300, 17, 50, 1, True),   # cache + chunk, pad, window
                               (1, 1, 2, 0, 300, 0, None, 0, False)])    # one-shot causal: full blocks
def test_transposed_chunk_block_mask_in_the_compiled_kernel(c):
    """The transposed structure in the compiled kernel (which skips unvisited blocks and applies
    no mask_mod on full ones, where eager flex does neither): the column sums' pass (keys as rows
    over the queries, the queries' LSE subtracted) gives dense attention's output for that
    problem; a chunk after a cache, with padding, a window and per-head slots, and a one-shot
    causal prompt (~10 s of compile each), with values as narrow as the column sums'
    (`LSE_ONLY_VALUE_DIM`, not the QK head dim). The mask is built outside the graph, as the
    column sums build it: built inside one, this kernel came out wrong (torch 2.13), so a
    compiled prefill chunk keeps the blockwise column sums."""
    q, k, v, q_pos, k_pos, window = _chunk_inputs(c)
    B, H, T, D = q.shape
    Tk, G = k.shape[2], H // k.shape[1]
    _, ok, _ = assert_structure_covers(q, k, q_pos, k_pos, window)      # [B, H, T, Tk]
    lse = _masked_lse(q, k, q_pos, k_pos, window).float()
    lse = torch.where(lse.isfinite(), lse, 0.0)                          # padded queries: masked anyway
    fwd = attention.slot_mask(q_pos, k_pos, G, window)
    full = attention.plain_causal(q_pos, k_pos, window)
    assert full == (c[3] == 0)
    bm = attention.transposed_chunk_block_mask(lambda b, h, r, c: fwd(b, h, c, r), Tk, T, "cpu",
                                               full)
    assert bool((bm.full_kv_num_blocks > 0).any()) == full
    rows = k.repeat_interleave(G, dim=1).float()
    vals = torch.randn(B, H, T, scores.LSE_ONLY_VALUE_DIM, dtype=torch.float64)  # as they run
    torch._dynamo.reset()
    o = torch.compile(flex_attention, fullgraph=True, dynamic=False)(
        rows, q.float(), vals.float(), block_mask=bm,
        score_mod=lambda s, b, h, r, c: s - lse[b, h, c])
    s = rows.double() @ q.transpose(-1, -2) / math.sqrt(D) - lse.double()[:, :, None, :]
    p = torch.nan_to_num(s.masked_fill(~ok.transpose(-1, -2), -math.inf).softmax(-1), nan=0.0)
    torch.testing.assert_close(o.double(), p @ vals, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy, kw", [("full", {}), ("h2o", {"budget": 150}), ("snapkv", {"budget": 150}),
                                        ("streaming", {"budget": 150}), ("cam", {"budget": 150})])
def test_model_prefill_through_the_flex_chunk_path_equals_dense(tiny_llama_dir, monkeypatch, policy, kw):
    """The CUDA prefill path (flex with the structural block mask) at the model's real call sites:
    a float64 tiny llama, a left-padded batch of two 300-token prompts in chunks of 130 (several
    128-blocks, cached slots ahead of every chunk after the first), 6 greedy tokens. Forcing the
    flex path on CPU gives the dense path's tokens, logits and kept positions, and at every call
    the chunk structure covers every (query, key) the real positions let through (eager flex
    ignores the block structure, so that is checked directly). h2o's and cam's column sums take
    the CUDA path too (one transposed flex pass over the chunk's transposed structure)."""
    import flexkv
    from flexkv.policies import h2o as h2o_module
    from flexkv.policies import merging as merging_module

    model, _ = flexkv.load_model(tiny_llama_dir, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.args.vocab_size, (2, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0                                            # a left-padded row

    def run():
        out = flexkv.generate(model, ids, max_new_tokens=6, policy=policy, prefill_chunk=130,
                              attention_mask=mask, output_logits=True, **kw)
        return out.tokens, out.logits, [lc.pos.clone() for lc in out.cache.layers]

    dense_tokens, dense_logits, dense_pos = run()
    calls = []

    def flex_everywhere(q, k, v, q_pos, k_pos, window=None, return_lse=False, bias=None,
                        keys_end_with_queries=False):
        calls.append(keys_end_with_queries)
        assert_structure_covers(q, k, q_pos, attention._per_head(k_pos, k.shape[1]), window)
        return attention.flex_prefill_attention(q, k, v, q_pos, k_pos, window, return_lse, bias,
                                                keys_end_with_queries)

    cs_calls = []

    def flex_column_sums(q, k, q_pos, k_pos, lse, window=None, block=256, bias=None,
                         keys_end_with_queries=False):  # the CUDA path's column sums
        cs_calls.append(keys_end_with_queries)
        return scores._flex_column_sums(q, k, q_pos, k_pos, lse, window, bias, keys_end_with_queries)

    monkeypatch.setattr(attention, "prefill_attention", flex_everywhere)
    monkeypatch.setattr(h2o_module, "column_sums", flex_column_sums)
    monkeypatch.setattr(merging_module, "column_sums", flex_column_sums)
    tokens, logits, pos = run()
    assert calls and all(calls)                                 # every call site declares the layout
    assert all(cs_calls) and bool(cs_calls) == (policy in ("h2o", "cam"))
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits)
    for a, b in zip(pos, dense_pos):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["one-row", "gqa2"])
def test_compiled_lowp_scores_stay_fp32_for_bf16(heads):
    """The lowp path's scores over a bf16 cache are fp32-accurate inside compiled code, also with
    one query head per KV head, where the CUDA step's coordinate-descent tuning would turn the
    one-row `bmm(out_dtype=float32)` into a reduction cast back to bf16 (flexkv computes that
    reduction itself there): probabilities within 1e-4 of fp64 attention, where bf16 scores
    (up to ~16 here) would be off by ~3e-2."""
    H, n_kv = heads
    g = torch.Generator().manual_seed(0)
    q = (4 * torch.randn(1, H, 1, 32, generator=g)).bfloat16()
    k, v = (torch.randn(1, n_kv, 40, 32, generator=g).bfloat16() for _ in range(2))
    k_pos = torch.arange(40).expand(1, n_kv, 40).contiguous()
    q_pos = torch.full((1, 1), 40)
    torch._dynamo.reset()
    f = torch.compile(attention.lowp_decode_attention, fullgraph=True)
    o, p = f(q, k, v, k_pos, q_pos)
    _, p_ref = attention.explicit_decode_attention(q.double(), k.double(), v.double(), k_pos, q_pos)
    torch.testing.assert_close(p.double(), p_ref, atol=1e-6, rtol=1e-4)
    assert o.dtype == torch.bfloat16
