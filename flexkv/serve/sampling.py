"""Per-request sampling for the serving engine: one static-shape function over all slots.

Every slot has its own temperature, top-k, top-p and seed as tensors (`[S]`), so requests with
different settings share one call and changing them never recompiles. Randomness is a
counter-based hash of (seed, step) instead of a stateful generator: a request's draws depend only
on its own seed and how many tokens it has produced, never on which slot it sits in or on what
else is running, so a seeded request is reproducible regardless of the batch.

A row's token is drawn by inverse transform sampling: one hashed uniform per row, against the
cumulative distribution of its kept tokens taken in token-id order. Top-k and top-p only decide
a cutoff value, found by a radix select over the values' bits (no sort of the vocabulary), or
from the k largest when the caller knows a bound on the rows' top-k; how it is found never
changes which token is drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_STEP = _i64(0xD1B54A32D192ED03)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a well-mixed 64-bit hash."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniform(seed: Tensor, step: Tensor, n: int) -> Tensor:
    """Uniform draws in (0, 1), float64, [S, n]: one per (slot's seed, slot's step, index)."""
    key = splitmix64(seed * _STEP + step)                             # [S]
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    bits = splitmix64(key[:, None] ^ splitmix64(idx)[None, :])       # [S, n]
    return (_shr(bits, 11).to(torch.float64) + 0.5) / float(1 << 53)


@dataclass(frozen=True)
class CutHint:
    """What the caller of `sample_slots` knows of its rows' settings (the engine: from the
    requests' `SamplingParams`), which only spares work: `top_k` is at least every row's top-k
    (0: no row has one), `top_p` whether some row has a top-p below 1, `top_p_alone` whether
    such a row has no top-k (its nucleus may reach past any top-k bound)."""
    top_k: int
    top_p: bool
    top_p_alone: bool


def cut_hint(params) -> CutHint:
    """The `CutHint` of rows with these settings (objects with `top_k` and `top_p`)."""
    params = list(params)
    return CutHint(max((p.top_k for p in params), default=0), any(p.top_p < 1 for p in params),
                   any(p.top_p < 1 and p.top_k <= 0 for p in params))


_ONE = float(1 << 52)   # masses in fixed point: exact sums in any order, so every way of finding
                        # a cutoff agrees to the last bit


def _order_keys(x: Tensor) -> Tensor:
    """float32 [...] -> int64 keys in [0, 2**32), ordered as the values (-0.0 as +0.0)."""
    b = (x + 0.0).view(torch.int32).to(torch.int64)
    return b ^ ((b >> 63) | (1 << 31))          # negatives: ~b; the rest: b + 2**31


def _key_values(keys: Tensor) -> Tensor:
    """The float32 values of `_order_keys` keys (its inverse)."""
    b = torch.where(keys >= 1 << 31, keys - (1 << 31), ~keys)
    return b.to(torch.int32).view(torch.float32)


def _largest_key_reaching(keys: Tensor, weight: Tensor, need: Tensor) -> Tensor:
    """Per row, the largest key K whose at-or-above weight, `weight[keys >= K].sum()`, reaches
    `need` [S, 1] (int64 weights; the smallest key if none does): a radix select over the 32
    key bits, each pass a histogram of the row's weight per digit (what lies below or above the
    current range in a bucket of its own) and a search in its running sum; no sort. 16-bit
    digits (two passes) for vocabulary-sized rows, 8-bit (four) for short ones. -> [S, 1]."""
    S, V = keys.shape
    bits = 16 if V >= 1 << 14 else 8
    B = 1 << bits
    prefix = torch.zeros(S, 1, dtype=torch.int64, device=keys.device)
    total = weight.sum(dim=1, keepdim=True)
    for shift in range(32 - bits, -1, -bits):
        bucket = ((keys - (prefix << (shift + bits))) >> shift).clamp(-1, B) + 1  # 0 .. B + 1
        hist = torch.zeros(S, B + 2, dtype=weight.dtype, device=keys.device)
        below = hist.scatter_add_(1, bucket, weight).cumsum(dim=1)   # [S, B + 2]: under digit j - 1
        # digit d reaches `need` while total - below[d] >= need (`below` is non-decreasing)
        digit = torch.searchsorted(below, total - need, right=True).clamp(max=B) - 1
        prefix = (prefix << bits) | digit.clamp(min=0)
    return prefix


def sample_slots(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
                 step: Tensor, hint: CutHint | None = None) -> Tensor:
    """logits [S, V]; temperature, top_p [S] float; top_k, seed, step [S] int64 -> tokens [S].

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature and
    cut to the tokens at or above a cutoff: the `top_k`-th largest value (0 = no cut), and the
    largest value whose at-or-above probability, after the top-k cut, reaches `top_p` (1 = no
    cut: the nucleus, the shortest descending prefix with that mass; masses in 2**-52 fixed
    point); tokens tied at a cutoff are kept. One uniform u per row then picks the first token,
    in token-id order, whose cumulative kept probability exceeds u times the total. No sort of
    the vocabulary, no host sync.

    `hint` (`cut_hint` of the rows' settings), if given, only spares work: no cutoff where no
    row cuts, the top-k cutoff (and, without a `top_p_alone` row, the nucleus) from the
    `hint.top_k` largest values instead of radix selects over the row; the token is the same."""
    S, V = logits.shape
    greedy = logits.argmax(dim=-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None].float()                          # [S, V]
    if hint is not None and hint.top_k <= 0 and not hint.top_p:
        p = scaled.softmax(dim=-1)                                        # no row cuts
    else:
        none = torch.full((S, 1), float("-inf"), device=logits.device)
        keys = top = None
        if hint is None:
            keys = _order_keys(scaled)
            kth = _key_values(_largest_key_reaching(keys, torch.ones_like(keys), top_k[:, None]))
        elif hint.top_k > 0:
            top = scaled.topk(min(hint.top_k, V), dim=-1)                 # [S, c], descending
            kth = top.values.gather(-1, top_k.clamp(1, top.values.shape[1])[:, None] - 1)
        else:
            kth = none
        cut = torch.where((top_k > 0)[:, None], kth, none)                # the top-k cutoff
        p = scaled.masked_fill(scaled < cut, float("-inf")).softmax(dim=-1)
        if hint is None or hint.top_p:
            need = (top_p.double() * _ONE).round().long()[:, None]
            if top is not None and not hint.top_p_alone:                  # within the top-k
                mass = (p.gather(-1, top.indices).double() * _ONE).round().long()
                last = (mass.cumsum(dim=-1) < need).sum(-1, keepdim=True)
                nucleus = top.values.gather(-1, last.clamp(max=top.values.shape[1] - 1))
            else:
                keys = _order_keys(scaled) if keys is None else keys
                mass = (p.double() * _ONE).round().long()                 # [S, V] fixed point
                nucleus = _key_values(_largest_key_reaching(keys, mass, need))
            cut = torch.where((top_p < 1)[:, None], torch.maximum(cut, nucleus), cut)
        p = p.masked_fill(scaled < cut, 0.0)
    cdf = p.double().cumsum(dim=-1)                                       # [S, V], token-id order
    u = uniform(seed, step, 1) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).clamp(max=V - 1)[:, 0]
    return torch.where(temperature > 0, drawn, greedy)
