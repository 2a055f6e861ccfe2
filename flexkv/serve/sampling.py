"""Per-request sampling for the serving engine: one static-shape function over all slots.

Every slot has its own temperature, top-k, top-p and seed as tensors (`[S]`), so requests with
different settings share one call and changing them never recompiles. Randomness is a
counter-based hash of (seed, step) instead of a stateful generator: a request's draws depend only
on its own seed and how many tokens it has produced, never on which slot it sits in or on what
else is running, so a seeded request is reproducible regardless of the batch.

A row's token is drawn by inverse transform sampling: one hashed uniform per row, against the
cumulative distribution of its kept tokens taken in token-id order. Top-k and top-p only decide
a value cutoff, so how the cutoff is found (a sort of the whole row, the `candidates` largest,
or none when no row cuts) never changes which token is drawn.
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


def candidates_hint(params) -> int | None:
    """`sample_slots`' `candidates` for rows with these settings (objects with `top_k`, `top_p`,
    e.g. `SamplingParams`): 0 when none cuts, the largest top-k when every row that cuts has a
    top-k, else None (a row cuts by top-p alone: its cutoff needs the whole row sorted)."""
    cutting = [p for p in params if p.top_k > 0 or p.top_p < 1]
    if not cutting:
        return 0
    if all(p.top_k > 0 for p in cutting):
        return max(p.top_k for p in cutting)
    return None


def sample_slots(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
                 step: Tensor, candidates: int | None = None) -> Tensor:
    """logits [S, V]; temperature, top_p [S] float; top_k, seed, step [S] int64 -> tokens [S].

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature and
    cut to the tokens at or above a cutoff value: the `top_k`-th largest (0 = no cut), and the
    smallest value of the shortest descending prefix whose mass (after the top-k cut) reaches
    `top_p` (1 = no cut); tokens tied at the cutoff are kept. One uniform u per row then picks
    the first token, in token-id order, whose cumulative kept mass exceeds u times the total.
    No host sync.

    `candidates`, a hint the caller gives from what it knows of the rows (the engine: the
    requests' settings), only makes finding the cutoff cheaper; the token is the same:
    None: any rows (the cutoff from a sort of each row); c > 0: every row with a cut has
    `0 < top_k <= c` (the c largest only); 0: no row cuts (no sort)."""
    S, V = logits.shape
    greedy = logits.argmax(dim=-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None].float()                          # [S, V]
    if candidates == 0:
        cut = torch.full((S, 1), float("-inf"), device=logits.device)
    else:
        c = V if candidates is None else min(candidates, V)
        vals = (scaled.sort(dim=-1, descending=True).values if c == V
                else scaled.topk(c, dim=-1).values)                       # [S, c], descending
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(1, c)
        kth = vals.gather(-1, (k - 1)[:, None])                           # the top-k cutoff
        vals = vals.masked_fill(vals < kth, float("-inf"))
        p = vals.softmax(dim=-1)
        reached = ((p.cumsum(dim=-1) - p) >= top_p[:, None].float()) & (top_p < 1)[:, None]
        last = (~reached).sum(dim=-1, keepdim=True) - 1                   # the nucleus' last
        cut = torch.maximum(kth, vals.gather(-1, last))
        no_cut = (top_k <= 0) & (top_p >= 1)
        cut = cut.masked_fill(no_cut[:, None], float("-inf"))
    kept = scaled.masked_fill(scaled < cut, float("-inf"))
    cdf = kept.softmax(dim=-1).double().cumsum(dim=-1)                    # [S, V], token-id order
    u = uniform(seed, step, 1) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).clamp(max=V - 1)[:, 0]
    return torch.where(temperature > 0, drawn, greedy)
