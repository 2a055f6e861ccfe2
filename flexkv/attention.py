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

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

try:  # torch >= 2.9 returns the LSE through return_aux; return_lse is deprecated
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:  # pragma: no cover
    _AuxRequest = None

_NEG_INF = float("-inf")
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
_compiled_flex = None


def _flex(*args, **kwargs):
    """FlexAttention, compiled on CUDA (eager flex is a slow reference there). On CPU the eager
    path is used outside compiled regions: compiled CPU flex cannot return the LSE."""
    global _compiled_flex
    q = args[0]
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            # one graph per prefill shape (prompt/chunk length, per-layer capacity): allow many
            # before dynamo would fall back to the (materialising) eager flex
            cfg = torch._dynamo.config
            if hasattr(cfg, "recompile_limit"):
                cfg.recompile_limit = max(cfg.recompile_limit, 64)
            else:  # pragma: no cover - older torch
                cfg.cache_size_limit = max(cfg.cache_size_limit, 64)
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
                      bias: Tensor | None = None):
    """q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D]; q_pos: [B, Tq]; k_pos: [B, Tk] or [B, Hkv, Tk].
    Returns o [B, H, Tq, D] (and lse [B, H, Tq] with return_lse). Fully masked queries (left
    padding) give o = 0. `bias` [B, Hkv, Tk] (optional, e.g. `log_mass`) is added to every
    query's score on key `kv` through a score_mod."""
    B, H, Tq, _ = q.shape
    n_kv = k.shape[1]
    k_pos = _per_head(k_pos, n_kv)
    group = H // n_kv
    if not q.is_cuda and not torch.compiler.is_compiling():
        return dense_prefill_attention(q, k, v, q_pos, k_pos, window, return_lse, bias)
    return flex_prefill_attention(q, k, v, q_pos, k_pos, window, return_lse, bias)


def flex_prefill_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                           window: int | None = None, return_lse: bool = False,
                           bias: Tensor | None = None):
    """FlexAttention with the position block mask (the CUDA path; compiled there)."""
    B, H, Tq, _ = q.shape
    n_kv = k.shape[1]
    k_pos = _per_head(k_pos, n_kv)
    group = H // n_kv
    mask = slot_mask(q_pos, k_pos, group, window)
    block_mask = create_block_mask(mask, B, H, Tq, k.shape[2], device=q.device)
    extra = {} if bias is None else {"score_mod": key_bias(bias, group)}
    if not return_lse:
        return _flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1, **extra)
    if _AuxRequest is not None:
        o, aux = _flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1,
                       return_aux=_AuxRequest(lse=True), **extra)
        return o, aux.lse
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1, return_lse=True, **extra)


def dense_prefill_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                            window: int | None = None, return_lse: bool = False,
                            bias: Tensor | None = None):
    """The same attention as `flex_prefill_attention` through SDPA with a dense position mask:
    the CPU path (eager FlexAttention materialises every score with its mods re-traced; measured
    slower than SDPA on the default model). With `return_lse` it returns `(o, None)`: the LSE is
    not computed here, its consumer (`scores.column_sums`) normalises the rows itself, which costs
    the same pass the LSE would. Tested equal to the flex path (tests/test_attention.py)."""
    H = q.shape[1]
    group = H // k.shape[1]
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
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)
    o = o.masked_fill(~ok.any(dim=-1, keepdim=True), 0.0)  # fully masked (padding) rows: 0
    return (o, None) if return_lse else o


# ---------------------------------------------------------------------------- decode
def use_flex_decode(q: Tensor) -> bool:
    """Flex for decode inside compiled code on CUDA (where it is the fused flex-decoding kernel);
    everywhere else the explicit path: eager flex re-traces its score_mod every call, and on CPU
    the compiled flex decode measured ~5x slower than the compiled explicit path (default model,
    129 slots: 1890 vs 344 ms/token, bench/NOTES.md). Both are tested equal."""
    return q.is_cuda and torch.compiler.is_compiling()


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                     window: int | None = None, bias: Tensor | None = None,
                     need_probs: bool = False):
    """q: [B, H, 1, D]; k, v: [B, Hkv, S, D]; k_pos: [B, Hkv, S]; q_pos: [B, 1].
    Returns (o [B, H, 1, D], probs [B, Hkv, G, S] or None)."""
    group = q.shape[1] // k.shape[1]
    if not need_probs and use_flex_decode(q):
        score_mod = masked_decode_score(k_pos, q_pos, group, window, bias)
        return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=group > 1), None
    o, probs = explicit_decode_attention(q, k, v, k_pos, q_pos, window, bias)
    return o, (probs if need_probs else None)


def explicit_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, q_pos: Tensor,
                              window: int | None = None, bias: Tensor | None = None):
    """Plain matmul + softmax decode attention that also returns the probabilities."""
    B, H, _, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
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
