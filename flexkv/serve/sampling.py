"""Per-request sampling for the serving engine: one static-shape function over all slots.

Every slot has its own temperature, top-k, top-p and seed as tensors (`[S]`), so requests with
different settings share one call and changing them never recompiles. Randomness is a
counter-based hash of (seed, step, token id) instead of a stateful generator: a request's draws
depend only on its own seed and how many tokens it has produced, never on which slot it sits in
or on what else is running, so a seeded request is reproducible regardless of the batch.
"""
from __future__ import annotations

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


def sample_slots(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
                 step: Tensor) -> Tensor:
    """logits [S, V]; temperature, top_p [S] float; top_k, seed, step [S] int64 -> tokens [S].

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut
    to the `top_k` largest (0 = no cut; ties at the k-th value are kept, as `flexkv.sample`
    does) and to the smallest prefix of the sorted distribution whose mass reaches `top_p`, and
    a token is drawn with the Gumbel-max trick from the hashed uniforms. No host sync."""
    S, V = logits.shape
    greedy = logits.argmax(dim=-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None].float()
    sorted_l, order = scaled.sort(dim=-1, descending=True)                # [S, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(1, V)
    kth = sorted_l.gather(-1, (k - 1)[:, None])
    sorted_l = sorted_l.masked_fill(sorted_l < kth, float("-inf"))
    p = sorted_l.softmax(dim=-1)
    drop = (p.cumsum(dim=-1) - p) >= top_p[:, None].float()              # keep the prefix reaching top_p
    sorted_l = sorted_l.masked_fill(drop, float("-inf"))
    u = uniform(seed, step, V).gather(-1, order)                          # keyed by token id
    gumbel = -torch.log(-torch.log(u))
    choice = (sorted_l.double() + gumbel).argmax(dim=-1, keepdim=True)
    drawn = order.gather(-1, choice)[:, 0]
    return torch.where(temperature > 0, drawn, greedy)
