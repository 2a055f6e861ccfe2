"""FlexAttention for prefill and decode over slot caches.

Every cached token carries its original position `pos` (`-1` = empty slot or left padding), so
all masking is expressed on positions, never on slot indices: slot order carries no meaning.

- `slot_mask(q_pos, k_pos, window)`: the `mask_mod` for prefill (causal on positions, empty slots
  out, optional sliding window). Built from the small named pieces below (attention-gym style).
- `decode_attention`: one query per sequence over the cache's `S` slots. The validity mask is a
  `score_mod` (`-inf` on invalid slots) so no block mask has to be rebuilt per step, which keeps
  the step static for CUDA graphs. Policies that need the attention probabilities use the
  explicit path (`need_probs=True`); both paths are tested equal.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention

from flexkv import torch_fixes

try:  # torch >= 2.9 returns the LSE through return_aux; return_lse is deprecated
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:  # pragma: no cover
    _AuxRequest = None

_NEG_INF = float("-inf")
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
_compiled_flex = None


def allow_recompiles(n: int = 64) -> None:
    """Let one compiled function hold `n` graphs (dynamo's default is 8, past which a
    `fullgraph=True` function fails and another falls back to eager): every prefill shape of the
    compiled flex, every engine or `generate` configuration of the compiled decode step (policy,
    slot count, capacities) is a graph of the same compiled unit."""
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, key, max(getattr(cfg, key), n))


def _flex(*args, **kwargs):
    """FlexAttention, compiled on CUDA (eager flex is a slow reference there). On CPU the eager
    path is used outside compiled regions: compiled CPU flex cannot return the LSE.

    On CUDA a call with more than one query row (a prefill chunk, the column sums' transposed
    pass) asks for the main Triton kernel (`BACKEND="TRITON"`): inductor would otherwise pick
    the flex-decoding kernel for fewer than 128 rows, whose configs all fail its own
    divisibility check when rows x GQA group exceeds the 128-row sparse block (torch 2.11:
    `NoValidChoicesError` for 33 rows x 4, the first H200 run, bench/NOTES.md session 22)."""
    global _compiled_flex
    q = args[0]
    if q.is_cuda and q.shape[-2] > 1 and "kernel_options" not in kwargs:
        kwargs["kernel_options"] = {"BACKEND": "TRITON"}
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            # one graph per prefill shape (prompt/chunk length, per-layer capacity): many,
            # before dynamo would fall back to the (materialising) eager flex
            allow_recompiles()
            torch_fixes.apply()
            _compiled_flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        return _compiled_flex(*args, **kwargs)
    return flex_attention(*args, **kwargs)


# ---------------------------------------------------------------------------- mask_mods
def key_valid(k_pos: Tensor, group: int):
    """Keys in empty slots / padding are out. k_pos: [B, Hkv, S]."""

    def key_valid_mask(b, h, q_idx, kv_idx):
        return k_pos[b, h // group, kv_idx] >= 0

    return key_valid_mask


def causal_on_pos(q_pos: Tensor, k_pos: Tensor, group: int):
    """A query sees keys at positions <= its own. q_pos: [B, Tq]; k_pos: [B, Hkv, S]."""

    def causal_pos_mask(b, h, q_idx, kv_idx):
        return k_pos[b, h // group, kv_idx] <= q_pos[b, q_idx]

    return causal_pos_mask


def sliding_window(q_pos: Tensor, k_pos: Tensor, group: int, window: int):
    """Mistral's window: a query sees keys with q_pos - k_pos < window."""

    def sliding_window_mask(b, h, q_idx, kv_idx):
        return q_pos[b, q_idx] - k_pos[b, h // group, kv_idx] < window

    return sliding_window_mask


def slot_mask(q_pos: Tensor, k_pos: Tensor, group: int, window: int | None = None):
    mods = [key_valid(k_pos, group), causal_on_pos(q_pos, k_pos, group)]
    if window is not None:
        mods.append(sliding_window(q_pos, k_pos, group, window))
    return and_masks(*mods)


# ---------------------------------------------------------------------------- score_mods
def masked_decode_score(k_pos: Tensor, q_pos: Tensor, group: int, window: int | None,
                        bias: Tensor | None):
    """score_mod for decode: `-inf` on empty slots (and outside the window), plus an optional
    per-slot bias (e.g. `log(mass)`). k_pos, bias: [B, Hkv, S]; q_pos: [B, 1]."""

    def masked_decode(score, b, h, q_idx, kv_idx):
        kp = k_pos[b, h // group, kv_idx]
        ok = kp >= 0
        if window is not None:
            ok = ok & (q_pos[b, 0] - kp < window)
        if bias is not None:
            score = score + bias[b, h // group, kv_idx]
        return torch.where(ok, score, _NEG_INF)

    return masked_decode


def key_bias(bias: Tensor, group: int):
    """score_mod adding a per-key bias (e.g. `log_mass`) to every query. bias: [B, Hkv, S]."""

    def key_bias_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h // group, kv_idx]

    return key_bias_mod


def _per_head(k_pos: Tensor, n_kv: int) -> Tensor:
    return k_pos if k_pos.dim() == 3 else k_pos[:, None, :].expand(-1, n_kv, -1)


# ---------------------------------------------------------------------------- prefill
def prefill_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                      window: int | None = None, return_lse: bool = False,
                      bias: Tensor | None = None, keys_end_with_queries: bool = False):
    """q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D]; q_pos: [B, Tq]; k_pos: [B, Tk] or [B, Hkv, Tk].
    Returns o [B, H, Tq, D] (and lse [B, H, Tq] with return_lse). Fully masked queries (left
    padding) give o = 0. `bias` [B, Hkv, Tk] (optional, e.g. `log_mass`) is added to every
    query's score on key `kv` through a score_mod. `keys_end_with_queries`: the last Tq keys are
    the queries' own tokens, in order, after Tk - Tq cached slots of earlier positions (what a
    prefill chunk attends over): the flex path then builds its block mask from that structure
    (`chunk_block_mask`) instead of evaluating the mask on every entry, and the dense path splits
    the call in two (`_chunk_attention`) where the chunk's positions are a plain range."""
    if not q.is_cuda:  # eager or compiled (a compiled chunk prefill on CPU: SDPA traces)
        return dense_prefill_attention(q, k, v, q_pos, _per_head(k_pos, k.shape[1]), window,
                                       return_lse, bias, keys_end_with_queries)
    return flex_prefill_attention(q, k, v, q_pos, k_pos, window, return_lse, bias,
                                  keys_end_with_queries)


# Above this many mask entries (B x H x Tq x Tk) the prefill's block mask comes from a compiled
# `create_block_mask`, which reduces each 128 x 128 block inside the kernel; the eager one
# materialises the whole boolean mask and the mask_mod's int64 index grids (~9 B per entry:
# ~300 GB for 32 heads at a 32K prefill). Below it the eager one is cheaper than a compile.
BLOCK_MASK_EAGER_MAX = 2**26
_compiled_block_mask = None


def prefill_block_mask(mask_mod, B: int, H: int, Tq: int, Tk: int, device):
    """`create_block_mask` for a prefill; compiled above `BLOCK_MASK_EAGER_MAX` mask entries."""
    global _compiled_block_mask
    if B * H * Tq * Tk <= BLOCK_MASK_EAGER_MAX or torch.compiler.is_compiling():
        return create_block_mask(mask_mod, B, H, Tq, Tk, device=device)
    if _compiled_block_mask is None:
        torch_fixes.apply()
        _compiled_block_mask = torch.compile(create_block_mask)
    return _compiled_block_mask(mask_mod, B, H, Tq, Tk, device=device)


def _with_mask_mod(s: BlockMask, mask_mod) -> BlockMask:
    """A block structure (shared, cached) with this call's mask_mod."""
    return BlockMask(s.seq_lengths, s.kv_num_blocks, s.kv_indices, s.full_kv_num_blocks,
                     s.full_kv_indices, s.q_num_blocks, s.q_indices, s.full_q_num_blocks,
                     s.full_q_indices, s.BLOCK_SIZE, mask_mod)


@functools.lru_cache(maxsize=32)
def _chunk_blocks(Tq: int, Tk: int, device: str, full_below_diagonal: bool) -> BlockMask:
    """The block structure of `chunk_block_mask` (no mask_mod), shared by every layer."""
    bs = _BLOCK
    n_q, n_k, off = -(-Tq // bs), -(-Tk // bs), Tk - Tq
    m = torch.arange(n_q, device=device)
    q_last = torch.clamp((m + 1) * bs, max=Tq) - 1       # the block's last query row
    n_any = torch.clamp((off + q_last) // bs + 1, max=n_k)  # kv blocks 0..n_any-1 may be visible
    if full_below_diagonal:                               # wholly at or below the first row's key
        n_full = torch.minimum((off + m * bs + 1) // bs, n_any)
    else:
        n_full = torch.zeros_like(n_any)
    kb = torch.arange(n_k, device=device)
    partial_idx = torch.clamp(n_full[:, None] + kb[None, :], max=n_k - 1)
    # full-block tensors even when there are none (counts 0): one mask structure for every chunk,
    # so the compiled flex kernel is not specialised twice for the same shapes
    return BlockMask.from_kv_blocks((n_any - n_full).to(torch.int32)[None, None],
                                    partial_idx.to(torch.int32)[None, None],
                                    n_full.to(torch.int32)[None, None],
                                    kb.expand(n_q, n_k).to(torch.int32)[None, None],
                                    BLOCK_SIZE=bs, seq_lengths=(Tq, Tk))


_BLOCK = 128   # FlexAttention's default sparse block size


def chunk_block_mask(mask_mod, Tq: int, Tk: int, device, full_below_diagonal: bool = False) -> BlockMask:
    """The block mask of a prefill chunk whose last Tq keys are its queries' own tokens, in order,
    after Tk - Tq cached slots holding earlier positions: key j can be visible to query i only if
    j <= Tk - Tq + i, so every block on or below that diagonal is visited with `mask_mod` applied
    (empty slots, padding, the window) and the others are skipped. With `full_below_diagonal` (a
    one-shot causal prefill: every key valid, positions consecutive, no window) the blocks wholly
    below the diagonal are full (no mask_mod), as `create_block_mask` would find them.

    Built from block counts, O(blocks) work once per chunk shape and shared by every layer
    (B = H = 1, broadcast), where `create_block_mask` evaluates the mask on all B x H x Tq x Tk
    entries, per layer (~100 ops and ~9 bytes per entry, eagerly). Superset of the exact block
    mask, never a subset: the output is the same (tests/test_attention.py)."""
    build = _chunk_blocks.__wrapped__ if torch.compiler.is_compiling() else _chunk_blocks  # traced: no cache
    return _with_mask_mod(build(Tq, Tk, str(device), full_below_diagonal), mask_mod)


@functools.lru_cache(maxsize=32)
def _transposed_chunk_blocks(Tk: int, Tq: int, device: str, full_above_diagonal: bool) -> BlockMask:
    """The block structure of `transposed_chunk_block_mask` (no mask_mod): key row r can be
    seen by query column c only if c >= r - (Tk - Tq), so key block m visits the query blocks
    from the one holding its first row's first such column to the last; with
    `full_above_diagonal` those from the one whose first column sees the block's last row on
    are full."""
    bs = _BLOCK
    n_k, n_q, off = -(-Tk // bs), -(-Tq // bs), Tk - Tq
    m = torch.arange(n_k, device=device)
    first = torch.clamp(m * bs - off, min=0) // bs              # [n_k]
    if full_above_diagonal:                                      # every column >= the last row
        last_row = torch.clamp((m + 1) * bs, max=Tk) - 1 - off
        n_partial = torch.clamp(-(-last_row // bs), min=0, max=n_q) - first
    else:
        n_partial = n_q - first
    qb = torch.arange(n_q, device=device)
    idx = torch.clamp(first[:, None] + qb[None, :], max=n_q - 1)
    full_idx = torch.clamp((first + n_partial)[:, None] + qb[None, :], max=n_q - 1)
    # full-block tensors even when there are none (counts 0), as `_chunk_blocks` passes them
    return BlockMask.from_kv_blocks(n_partial.to(torch.int32)[None, None],
                                    idx.to(torch.int32)[None, None],
                                    (n_q - first - n_partial).to(torch.int32)[None, None],
                                    full_idx.to(torch.int32)[None, None],
                                    BLOCK_SIZE=bs, seq_lengths=(Tk, Tq))


def transposed_chunk_block_mask(mask_mod, Tk: int, Tq: int, device,
                                full_above_diagonal: bool = False) -> BlockMask:
    """`chunk_block_mask` transposed: the Tk keys of a prefill chunk ([cached slots | the chunk's
    own tokens]) as the rows, its Tq queries as the columns, `mask_mod(b, h, key, query)`. With
    `full_above_diagonal` (a one-shot causal prefill, `plain_causal`) the blocks wholly above the
    diagonal are full (no mask_mod), as `chunk_block_mask`'s below it; every other visited block
    is partial. What the column sums run on CUDA (`scores._flex_column_sums`): no per-entry mask
    evaluation, where `create_block_mask` over Tk x Tq would evaluate ~10^10 entries per layer at
    32K. Outside compiled code only (built inside a graph, inductor's CPU flex template
    miscompiled it: tests/test_attention.py)."""
    return _with_mask_mod(_transposed_chunk_blocks(Tk, Tq, str(device), full_above_diagonal),
                          mask_mod)


def plain_causal(q_pos: Tensor, k_pos: Tensor, window: int | None) -> bool:
    """A one-shot causal prefill (the keys are the queries' own tokens, positions a plain range,
    no window): the mask is causality by index, so `chunk_block_mask` may mark the blocks below
    the diagonal full."""
    return window is None and k_pos.shape[-1] == q_pos.shape[-1] and causal_range(q_pos, k_pos)


def flex_prefill_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                           window: int | None = None, return_lse: bool = False,
                           bias: Tensor | None = None, keys_end_with_queries: bool = False):
    """FlexAttention with the position block mask (the CUDA path; compiled there)."""
    B, H, Tq, _ = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    k_pos = _per_head(k_pos, n_kv)
    group = H // n_kv
    mask = slot_mask(q_pos, k_pos, group, window)
    if keys_end_with_queries:
        block_mask = chunk_block_mask(mask, Tq, Tk, q.device, plain_causal(q_pos, k_pos, window))
    else:
        block_mask = prefill_block_mask(mask, B, H, Tq, Tk, q.device)
    extra = {} if bias is None else {"score_mod": key_bias(bias, group)}
    if not return_lse:
        return _flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1, **extra)
    if _AuxRequest is not None:
        o, aux = _flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1,
                       return_aux=_AuxRequest(lse=True), **extra)
        return o, aux.lse
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1, return_lse=True, **extra)


def causal_range(q_pos: Tensor, k_pos: Tensor) -> bool:
    """True when the keys are the queries' own tokens and every row's positions are consecutive
    from a position >= 0 (a one-shot prefill without padding, the common case). The position
    mask is then plain causality by index (key j visible to query i iff j <= i, and a window W
    means i - j < W), which SDPA's `is_causal` kernel and `scores.column_sums` exploit by skipping
    the blocks above the diagonal.

    k_pos [B, Hkv, N] must be `q_pos` [B, Tq] itself broadcast over the heads (what the prefill
    passes on a first chunk): checked on strides and data pointers, without reading the data. The
    positions are then checked once per `q_pos` tensor (one host sync per prefill chunk, memoised
    across layers: every layer gets the same `q_pos` object). Never inside compiled code."""
    if torch.compiler.is_compiling() or q_pos.dim() != 2:
        return False
    B, T = q_pos.shape
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None, :]
    if (k_pos.shape[0] != B or k_pos.shape[2] != T or T == 0
            or (k_pos.shape[1] > 1 and k_pos.stride(1) != 0)
            or k_pos.data_ptr() != q_pos.data_ptr()
            or (T > 1 and k_pos.stride(2) != q_pos.stride(1))
            or (B > 1 and k_pos.stride(0) != q_pos.stride(0))):
        return False
    return plain_range(q_pos)


def plain_range(q_pos: Tensor) -> bool:
    """Whether every row of `q_pos` [B, T] is consecutive positions from one >= 0 (no padding).
    One host sync per `q_pos` tensor, memoised across layers (every layer of a chunk gets the
    same `q_pos` object). Never inside compiled code (False there)."""
    if torch.compiler.is_compiling() or q_pos.dim() != 2 or q_pos.shape[1] == 0:
        return False
    # an inference tensor (made under `torch.inference_mode()`) has no version counter to
    # notice an in-place change by: it is checked afresh each time
    memo = not q_pos.is_inference()
    ref, version, answer = _RANGE_MEMO
    if memo and ref is not None and ref() is q_pos and version == q_pos._version:
        return answer
    answer = bool((q_pos[:, 0] >= 0).all()) and (q_pos.shape[1] == 1
                                                  or bool((q_pos.diff(dim=1) == 1).all()))
    if memo:
        _RANGE_MEMO[:] = [weakref.ref(q_pos), q_pos._version, answer]
    return answer


_RANGE_MEMO: list = [None, -1, False]  # weakref to the last q_pos checked, its version, answer

try:  # SDPA's CPU flash kernel, which also returns the LSE (the public SDPA drops it)
    _FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
except (AttributeError, RuntimeError):  # pragma: no cover - older torch
    _FLASH_CPU = None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, group: int, mask: Tensor | None, causal: bool,
          want_lse: bool):
    """SDPA -> (o, lse or None). With `want_lse` (on CPU) the flash kernel's own LSE [B, H, Tq]
    (fp32+; a fully masked row gets o = 0 and lse = 0, flex gives -inf: both make the column sums'
    exp(score - lse) 0 there). That op takes no GQA flag or boolean mask: K/V are repeated per
    query head (small next to the scores) and the mask becomes additive. Not inside compiled
    code (a compiled CPU chunk prefill): torch 2.11's inductor misreads that op's LSE there
    (transposed strides; h2o's column sums came out wrong), so the LSE is None and its consumers
    normalise the rows themselves."""
    if want_lse and _FLASH_CPU is not None and q.device.type == "cpu" \
            and not torch.compiler.is_compiling():
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if mask is not None and mask.dtype == torch.bool:
            mask = _additive(mask, q.dtype)
        return _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       enable_gqa=group > 1)
    return o, None


def _additive(ok: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as the additive one SDPA's CPU flash op takes (0 where `ok`, -inf else)."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, _NEG_INF)


def dense_prefill_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                            window: int | None = None, return_lse: bool = False,
                            bias: Tensor | None = None, keys_end_with_queries: bool = False):
    """The same attention as `flex_prefill_attention` through SDPA: the CPU path (eager
    FlexAttention materialises every score with its mods re-traced; measured slower than SDPA on
    the default model). Tested equal to the flex path (tests/test_attention.py).

    When the positions are a causal range (`causal_range`: one-shot prefill, no padding) and
    neither a window shorter than the prompt nor a nonzero bias changes the mask, SDPA runs with
    `is_causal=True` and no mask: its CPU flash kernel skips the blocks above the diagonal (about
    half the work of the masked call, bench/NOTES.md). A later chunk (`keys_end_with_queries`:
    [cached slots | the chunk's own tokens], see `prefill_attention`) whose queries are such a
    range, with no bias or window, is two flash calls merged by their LSEs (`_chunk_attention`):
    the cached slots behind a per-key validity mask, the chunk with `is_causal`. Otherwise a
    dense position mask. With `return_lse` the LSE comes from the same kernel (`_sdpa`); where
    that op is missing it is `(o, None)` and `scores.column_sums` normalises the rows itself."""
    H, Tq = q.shape[1], q.shape[2]
    group = H // k.shape[1]
    k_pos = _per_head(k_pos, k.shape[1])
    if bias is not None and not torch.compiler.is_compiling() and not bool(bias.any()):
        bias = None  # all zero (log_mass before any merge): the same scores
    if bias is None and (window is None or window >= Tq) and causal_range(q_pos, k_pos):
        o, lse = _sdpa(q, k, v, group, None, True, return_lse)
        return (o, lse) if return_lse else o
    if (keys_end_with_queries and bias is None and window is None and k.shape[2] > Tq
            and _FLASH_CPU is not None and q.device.type == "cpu" and plain_range(q_pos)):
        o, lse = _chunk_attention(q, k, v, k_pos[:, :, :k.shape[2] - Tq], group)
        return (o, lse) if return_lse else o
    shared = k_pos.stride(1) == 0  # one position row for every head (one-shot prefill)
    kp = (k_pos[:, :1] if shared else k_pos)[:, :, None, :]  # [B, 1 or Hkv, 1, N]
    qp = q_pos[:, None, :, None]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok = ok & (qp - kp < window)
    if not shared:
        ok = ok.repeat_interleave(group, dim=1)
    mask = ok
    if bias is not None:
        mask = torch.where(ok, bias.repeat_interleave(group, dim=1)[:, :, None, :].to(q.dtype),
                           float("-inf"))
    o, lse = _sdpa(q, k, v, group, mask, False, return_lse)
    o = o.masked_fill(~ok.any(dim=-1, keepdim=True), 0.0)  # fully masked (padding) rows: 0
    return (o, lse) if return_lse else o


def _chunk_attention(q: Tensor, k: Tensor, v: Tensor, cached_pos: Tensor, group: int):
    """A later prefill chunk on CPU: q [B, H, T, D] over k, v [B, Hkv, n + T, D], the n cached
    slots (positions `cached_pos` [B, Hkv, n], -1 = empty, all before the chunk's) then the
    chunk's own T tokens, whose positions are a consecutive range. Every query sees every valid
    cached slot, and the chunk causally by index; so: one flash call over the cached slots with
    a per-key mask (no [T, n + T] mask to build or read), one `is_causal` call over the chunk
    (its upper triangle skipped), merged by their LSEs. -> o [B, H, T, D], lse [B, H, T]."""
    n = cached_pos.shape[-1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    valid = cached_pos.repeat_interleave(group, dim=1)[:, :, None, :] >= 0     # [B, H, 1, n]
    o_c, lse_c = _FLASH_CPU(q, k[:, :, :n], v[:, :, :n], 0.0, False,
                            attn_mask=_additive(valid, q.dtype))[:2]
    o_t, lse_t = _FLASH_CPU(q, k[:, :, n:], v[:, :, n:], 0.0, True)[:2]
    # a head with no valid cached slot: that call's rows are empty (the op reports lse 0 there)
    lse_c = lse_c.masked_fill(~valid.any(dim=-1), -math.inf)
    lse = torch.logaddexp(lse_c, lse_t)
    w_c, w_t = (lse_c - lse).exp()[..., None], (lse_t - lse).exp()[..., None]
    o = torch.where(w_c > 0, o_c * w_c, 0.0) + o_t * w_t
    return o.to(q.dtype), lse


# ---------------------------------------------------------------------------- decode
@functools.lru_cache(maxsize=16)
def _decode_blocks(S: int, device: str) -> BlockMask:
    """Every key block of a one-query decode, `_BLOCK` keys each, all visited (the masking is in
    the score_mod)."""
    n = -(-S // _BLOCK)
    blocks = torch.arange(n, dtype=torch.int32, device=device)[None, None, None]  # [1, 1, 1, n]
    return BlockMask.from_kv_blocks(torch.full((1, 1, 1), n, dtype=torch.int32, device=device),
                                    blocks, BLOCK_SIZE=_BLOCK, seq_lengths=(1, S),
                                    compute_q_blocks=False)  # forward only: no transpose ops


def decode_block_mask(S: int, device) -> BlockMask:
    """The block mask of a flex decode over S slots. Without one, flex_attention's default is a
    single sparse block of 2**30 keys, and the flex-decoding kernel splits the keys across
    thread blocks by sparse blocks (`TILE_KV = cdiv(kv_num_blocks * SPARSE_KV_BLOCK_SIZE,
    SPLIT_KV)`, torch 2.11's flex_decode template): the first split got every key, one thread
    block per (row, KV head) walked all S (the first H200 run: 168 us a layer at 4097 slots,
    92 GB/s, bench/NOTES.md session 22). With S / 128 blocks the splits share the keys."""
    build = _decode_blocks.__wrapped__ if torch.compiler.is_compiling() else _decode_blocks
    return build(S, str(device))


def use_flex_decode(q: Tensor) -> bool:
    """Flex for decode inside compiled code on CUDA (where it is the fused flex-decoding kernel);
    everywhere else SDPA (eager) or the matmul path (compiled): eager flex re-traces its
    score_mod every call, and on CPU the compiled flex decode measured ~5x slower than the
    compiled matmul path (default model, 129 slots: 1890 vs 344 ms/token, bench/NOTES.md). All
    are tested equal."""
    return q.is_cuda and torch.compiler.is_compiling()


# How a decode step gets the attention probabilities (`need_probs=True`; h2o, tova, weightedkv,
# cam, ...). Every path returns the same (o, probs) and is tested against dense attention
# (tests/test_attention.py); `bench/gpu_run.py decode-candidates` times them on the GPU.
#   "explicit": matmuls on K and V upcast to fp32: the reference. For a bf16/fp16 cache it
#               writes and re-reads an fp32 copy of the whole K and V every step.
#   "lowp":     K and V read once in their dtype: scores from a matmul with fp32 output
#               (fp32 accumulation; `bmm(out_dtype=float32)` on CUDA), softmax in fp32, P cast
#               to V's dtype for P@V (as flash kernels do). fp32/fp64 caches: as "explicit".
#               One query head per KV head, compiled: the scores as an fp32 reduction (`_qk`).
#   "flex_lse": the flex-decoding kernel for o and the LSE, then probs = exp(q.k/sqrt(D) + bias -
#               lse) from a recompute of the scores: V read once, K twice.
#   "fused":    the scores and P@V as broadcast products summed in fp32 (q*k over D, p*v over
#               the slots): inside compiled code inductor makes each one reduction kernel that
#               reads K (V) in its dtype and upcasts in registers, where cuBLAS ran P@V as a
#               small-N batched gemv (`gemmSN`, 18.5 us a layer for 512 slots on the H200,
#               bench/NOTES.md session 22). Eager, it materialises the products (a reference).
#   "triton":   one split-S Triton kernel (flexkv/triton_decode.py) reading K and V once in their
#               dtype, writing o partials and the raw scores; CUDA + bf16/fp16 only, else "lowp".
# Set it before the first compiled step (dynamo guards on it: changing it recompiles); the
# environment variable FLEXKV_DECODE_PROBS sets the default (e.g. for a GPU run, no code edit).
import os as _os  # noqa: E402

DECODE_PROBS = _os.environ.get("FLEXKV_DECODE_PROBS", "lowp")
DECODE_PROBS_PATHS = ("explicit", "lowp", "flex_lse", "fused", "triton")


def _bmm_out_dtype_supported() -> bool:
    """torch.bmm(a, b, out_dtype=torch.float32) for bf16 inputs (a CUDA kernel, torch >= 2.8)."""
    try:
        a = torch.empty(1, 1, 1, dtype=torch.bfloat16, device="meta")
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:  # noqa: BLE001 - older torch: no such overload
        return False


_BMM_OUT_DTYPE = _bmm_out_dtype_supported()
_LOW = (torch.float16, torch.bfloat16)


def decode_probs_path(q: Tensor, k: Tensor) -> str:
    """The `DECODE_PROBS` path that runs for these inputs (fallbacks where a path cannot)."""
    path = DECODE_PROBS
    if path not in DECODE_PROBS_PATHS:
        raise ValueError(f"flexkv.attention.DECODE_PROBS must be one of {DECODE_PROBS_PATHS}, "
                         f"got {path!r}")
    if path == "flex_lse" and not q.is_cuda and torch.compiler.is_compiling():
        return "lowp"  # compiled CPU flex cannot return the LSE
    if path == "triton" and not (k.is_cuda and k.dtype in _LOW):
        return "lowp"  # the kernel is for low-precision CUDA caches; fp32/fp64 lowp is exact
    return path


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                     window: int | None = None, bias: Tensor | None = None,
                     need_probs: bool = False):
    """q: [B, H, 1, D]; k, v: [B, Hkv, S, D]; k_pos: [B, Hkv, S]; q_pos: [B, 1].
    Returns (o [B, H, 1, D], probs [B, Hkv, G, S] or None). Without `need_probs`: the flex
    decoding kernel inside compiled CUDA code, one SDPA call in eager code (`use_sdpa_decode`),
    else the matmul path ("explicit" when DECODE_PROBS says so, else "lowp"); with it: the
    `DECODE_PROBS` path."""
    group = q.shape[1] // k.shape[1]
    if not need_probs and use_flex_decode(q):
        score_mod = masked_decode_score(k_pos, q_pos, group, window, bias)
        return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=group > 1,
                              block_mask=decode_block_mask(k.shape[2], q.device)), None
    if not need_probs and use_sdpa_decode(q, bias):
        return sdpa_decode_attention(q, k, v, k_pos, q_pos, window, bias), None
    path = decode_probs_path(q, k)
    if not need_probs:
        path = "explicit" if path == "explicit" else "lowp"
    o, probs = DECODE_PATHS[path](q, k, v, k_pos, q_pos, window, bias)
    return o, (probs if need_probs else None)


def explicit_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                              window: int | None = None, bias: Tensor | None = None):
    """Plain matmul + softmax decode attention that also returns the probabilities."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    group = H // n_kv
    qg = q.view(B, n_kv, group, D)
    dt = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bkgd,bksd->bkgs", qg.to(dt), k.to(dt)) / math.sqrt(D)  # [B,Hkv,G,S]
    ok = k_pos >= 0
    if window is not None:
        ok = ok & (q_pos[:, :1, None] - k_pos < window)
    if bias is not None:
        scores = scores + bias[:, :, None, :]
    scores = scores.masked_fill(~ok[:, :, None, :], _NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("bkgs,bksd->bkgd", probs, v.to(dt)).to(q.dtype)
    return o.reshape(B, H, 1, D), probs


def use_sdpa_decode(q: Tensor, bias: Tensor | None) -> bool:
    """Eager decode without probabilities (CPU `generate`, the serving engine's eager step):
    one SDPA call instead of the matmul path's ~15 ops per layer (eager dispatch is a cost on
    CPU, bench/NOTES.md entry 13). Not inside compiled code (inductor fuses the matmul path),
    not when DECODE_PROBS asks for the explicit reference, and not with a bias on a
    low-precision cache (SDPA's mask would round the bias to the cache dtype; the matmul path
    adds it to fp32 scores)."""
    return (not torch.compiler.is_compiling() and DECODE_PROBS != "explicit"
            and (bias is None or q.dtype not in _LOW))


def sdpa_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                          window: int | None = None, bias: Tensor | None = None) -> Tensor:
    """Decode attention output only, through SDPA: each KV head's G query heads are G query
    rows over that head's slots (no GQA expansion), the valid slots a boolean mask, a bias an
    additive one. q: [B, H, 1, D] -> o [B, H, 1, D]. Every active row holds at least the token
    just written; an idle row's output is discarded by the caller."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    mask = _decode_ok(k_pos, q_pos, window)  # [B, Hkv, 1, S]
    if bias is not None:
        mask = torch.where(mask, bias[:, :, None, :].to(q.dtype), _NEG_INF)
    o = F.scaled_dot_product_attention(q.reshape(B, n_kv, H // n_kv, D), k, v, attn_mask=mask)
    return o.reshape(B, H, 1, D)


def _decode_ok(k_pos: Tensor, q_pos: Tensor, window: int | None) -> Tensor:
    """[B, Hkv, 1, S] bool: the slots a decode query attends to."""
    ok = k_pos >= 0
    if window is not None:
        ok = ok & (q_pos[:, :1, None] - k_pos < window)
    return ok[:, :, None, :]


def _qk(q: Tensor, k: Tensor) -> Tensor:
    """q: [B, H, 1, D], k: [B, Hkv, S, D] -> unscaled scores [B, Hkv, G, S] in fp32 (fp64 for
    fp64), reading K once in its dtype: a bf16/fp16 K goes through a matmul with fp32 output on
    CUDA (fp32 accumulation); on CPU (no such kernel) it is upcast, as in the explicit path.
    Otherwise one batched `matmul` over [B, Hkv] (the same bmm inside, and the fewest ops for an
    eager CPU step to dispatch)."""
    B, H, _, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, n_kv, H // n_kv, D)
    if k.dtype in _LOW and H == n_kv and torch.compiler.is_compiling():
        # one query row per KV head: with `coordinate_descent_tuning` (the compiled CUDA decode
        # step's, flexkv.generate) inductor rewrites a one-row bmm as a reduction and casts it
        # back to the inputs' dtype, dropping `out_dtype` (torch 2.11-2.13: bf16 scores). The
        # same reduction written out keeps fp32 and reads K once in its dtype.
        return _qk_summed(q, k)
    if k.dtype in _LOW and k.is_cuda and _BMM_OUT_DTYPE:
        s = torch.bmm(qg.reshape(B * n_kv, H // n_kv, D).to(k.dtype),
                      k.reshape(B * n_kv, S, D).transpose(1, 2), out_dtype=torch.float32)
        return s.view(B, n_kv, H // n_kv, S)
    if k.dtype in _LOW:
        return torch.matmul(qg.float(), k.float().transpose(-1, -2))
    return torch.matmul(qg if qg.dtype == k.dtype else qg.to(k.dtype), k.transpose(-1, -2))


def _qk_summed(q: Tensor, k: Tensor) -> Tensor:
    """q: [B, H, 1, D], k: [B, Hkv, S, D] -> unscaled scores [B, Hkv, G, S] as a sum over D of
    broadcast products in fp32 (fp64 for fp64): inside compiled code one reduction kernel that
    reads K in its dtype and upcasts in registers."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(B, n_kv, H // n_kv, 1, D).to(dt)
    return (qg * k[:, :, None].to(dt)).sum(-1)


def _pv(probs: Tensor, v: Tensor) -> Tensor:
    """probs: [B, Hkv, G, S] (fp32 or wider), v: [B, Hkv, S, D] -> [B, Hkv, G, D] in v's dtype:
    P cast to V's dtype, one matmul (fp32 accumulation inside the kernel), V read once."""
    return torch.matmul(probs if probs.dtype == v.dtype else probs.to(v.dtype), v)


def _masked_scores(scores: Tensor, k_pos: Tensor, q_pos: Tensor, window: int | None,
                   bias: Tensor | None) -> Tensor:
    """Scaled scores [B, Hkv, G, S] plus the bias, -inf on the slots a decode query skips."""
    if bias is not None:
        scores = scores + bias[:, :, None, :]
    return torch.where(_decode_ok(k_pos, q_pos, window), scores, _NEG_INF)


def lowp_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                          window: int | None = None, bias: Tensor | None = None):
    """Decode attention + probabilities reading K and V once in their dtype ("lowp")."""
    B, H, _, D = q.shape
    scores = _masked_scores(_qk(q, k) / math.sqrt(D), k_pos, q_pos, window, bias)
    probs = torch.softmax(scores, dim=-1)
    o = _pv(probs, v)
    return (o if o.dtype == q.dtype else o.to(q.dtype)).reshape(B, H, 1, D), probs


def fused_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                           window: int | None = None, bias: Tensor | None = None):
    """Decode attention + probabilities as two fp32 reductions of broadcast products ("fused"):
    scores[b, h, g, s] = sum_d q.k, o[b, h, g, d] = sum_s p.v, for inductor to fuse."""
    B, H, _, D = q.shape
    raw = _qk_summed(q, k) / math.sqrt(D)                           # [B, Hkv, G, S]
    probs = torch.softmax(_masked_scores(raw, k_pos, q_pos, window, bias), dim=-1)
    o = (probs[..., None] * v[:, :, None].to(probs.dtype)).sum(-2)  # [B, Hkv, G, D]
    return o.to(q.dtype).reshape(B, H, 1, D), probs


def flex_lse_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                              window: int | None = None, bias: Tensor | None = None):
    """Flex decoding (o and the LSE, masks and bias in its score_mod) plus a recompute of the
    scores: probs = exp(q.k/sqrt(D) + bias - lse) ("flex_lse")."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    G = H // n_kv
    sm = masked_decode_score(k_pos, q_pos, G, window, bias)
    blocks = decode_block_mask(k.shape[2], q.device)
    if _AuxRequest is not None:
        o, aux = _flex(q, k, v, score_mod=sm, block_mask=blocks, enable_gqa=G > 1,
                       return_aux=_AuxRequest(lse=True))
        lse = aux.lse
    else:  # pragma: no cover - torch < 2.9
        o, lse = _flex(q, k, v, score_mod=sm, block_mask=blocks, enable_gqa=G > 1,
                       return_lse=True)
    scores = _masked_scores(_qk(q, k) / math.sqrt(D), k_pos, q_pos, window, bias)
    probs = torch.exp(scores - lse.reshape(B, n_kv, G, 1).to(scores.dtype))
    return o, probs


from flexkv import triton_decode as _triton_decode  # noqa: E402 - Triton is optional there


def triton_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                            window: int | None = None, bias: Tensor | None = None):
    """The fused split-S Triton kernel ("triton"; flexkv/triton_decode.py); "lowp" where the
    kernel cannot run (no Triton, head dim not a power of two)."""
    if not _triton_decode.supported(q, k):
        return lowp_decode_attention(q, k, v, k_pos, q_pos, window, bias)
    return _triton_decode.decode_attention_probs(q, k, v, k_pos, q_pos, window, bias)


DECODE_PATHS = {"explicit": explicit_decode_attention, "lowp": lowp_decode_attention,
                "flex_lse": flex_lse_decode_attention, "fused": fused_decode_attention,
                "triton": triton_decode_attention}
