"""Static slot caches: all cache mechanics live here.

Per layer: `k, v: [B, H_kv, S, D]`, `pos: [B, H_kv, S]` int64 (original position, `-1` = empty),
`budget: [B, H_kv]` int64 (tokens a head may keep between decode steps; per-head budgets are
validity inside the fixed capacity `S`), plus the statistics a policy declares (`score`,
`count`, `mass`, ... each `[B, H_kv, S]`). Everything is a registered buffer so CUDA graphs see
static addresses. Slot order carries no meaning; every operation is a tensor op with tensor
indices (no `.item()`, no data-dependent shapes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerCache(nn.Module):
    def __init__(self, batch: int, n_kv: int, capacity: int, head_dim: int, *,
                 dtype: torch.dtype, device, stats: dict[str, torch.dtype] | None = None,
                 budget: int | Tensor | None = None):
        super().__init__()
        shape = (batch, n_kv, capacity)
        self.register_buffer("k", torch.zeros(*shape, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(*shape, head_dim, dtype=dtype, device=device))
        self.register_buffer("pos", torch.full(shape, -1, dtype=torch.long, device=device))
        if budget is None:
            budget = capacity
        budget = torch.as_tensor(budget, dtype=torch.long, device=device).expand(batch, n_kv)
        self.register_buffer("budget", budget.clone())
        self.stat_names = tuple(stats or {})
        for name, sdtype in (stats or {}).items():
            self.register_buffer(name, torch.zeros(shape, dtype=sdtype, device=device))

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    def stats(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.stat_names}

    def retained(self) -> Tensor:
        """Tokens held per head: [B, H_kv]."""
        return (self.pos >= 0).sum(-1)

    def free_slot(self) -> Tensor:
        """An empty slot per head, [B, H_kv] (the first one: argmin of pos, whose minimum is -1)."""
        return self.pos.argmin(dim=-1)

    def write(self, slot: Tensor, k: Tensor, v: Tensor, pos: Tensor,
              stats: dict[str, Tensor] | None = None) -> None:
        """Write one token per head into `slot` [B, H_kv]. k, v: [B, H_kv, 1, D]; pos: [B, 1]
        (or [B, H_kv]); statistics of the slot are reset to 0 unless given ([B, H_kv])."""
        B, n_kv = slot.shape
        idx = slot[:, :, None]
        self.k.scatter_(2, idx[..., None].expand(-1, -1, 1, k.shape[-1]), k)
        self.v.scatter_(2, idx[..., None].expand(-1, -1, 1, v.shape[-1]), v)
        self.pos.scatter_(2, idx, pos.expand(B, n_kv)[:, :, None])
        for name in self.stat_names:
            val = (stats or {}).get(name)
            buf = getattr(self, name)
            if val is None:
                buf.scatter_(2, idx, torch.zeros_like(idx, dtype=buf.dtype))
            else:
                buf.scatter_(2, idx, val[:, :, None].to(buf.dtype))

    def evict(self, slot: Tensor, when: Tensor) -> None:
        """Empty `slot` [B, H_kv] where `when` [B, H_kv] (bool) holds; no host sync."""
        idx = slot[:, :, None]
        old = self.pos.gather(2, idx)
        self.pos.scatter_(2, idx, torch.where(when[:, :, None], torch.full_like(old, -1), old))

    def load(self, k: Tensor, v: Tensor, pos: Tensor, stats: dict[str, Tensor] | None = None) -> None:
        """Replace the whole content with `n <= S` tokens per head (prefill): k, v [B, H_kv, n, D],
        pos [B, H_kv, n] (-1 = empty), stats [B, H_kv, n]. The remaining slots become empty."""
        n = pos.shape[-1]
        if n > self.capacity:
            raise RuntimeError(f"cannot load {n} tokens into {self.capacity} slots")
        self.pos.fill_(-1)
        self.k[:, :, :n].copy_(k)
        self.v[:, :, :n].copy_(v)
        self.pos[:, :, :n].copy_(pos)
        for name in self.stat_names:
            buf = getattr(self, name)
            buf.zero_()
            if stats is not None and name in stats:
                buf[:, :, :n].copy_(stats[name])

    def kv_bytes(self) -> int:
        """Bytes of K and V storage held (allocated slots, not only the retained tokens)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class KVCache(nn.Module):
    """All layers' caches; `layers[l]` may have its own capacity (pyramid budgets)."""

    def __init__(self, layers: list[LayerCache]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def kv_bytes(self) -> int:
        return sum(lc.kv_bytes() for lc in self.layers)

    def retained(self) -> Tensor:
        """Retained tokens per (layer, batch, head): [L, B, H_kv]."""
        return torch.stack([lc.retained() for lc in self.layers])

    def slots(self) -> int:
        """Allocated slots summed over layers and heads (per sequence)."""
        return sum(lc.pos.shape[1] * lc.capacity for lc in self.layers)
