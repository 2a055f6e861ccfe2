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
        if self.k.is_cuda:  # CUDA graphs: the step's state keeps its addresses across replays
            for buf in self.buffers():
                torch._dynamo.mark_static_address(buf)

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    def stats(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.stat_names}

    def retained(self) -> Tensor:
        """Tokens held per head: [B, H_kv]."""
        return (self.pos >= 0).sum(-1)

    def free_slot(self) -> tuple[Tensor, Tensor]:
        """An empty slot per head and whether there is one: ([B, H_kv] index, [B, H_kv] bool).
        The index is the first empty slot (the first minimum of pos, which is -1); where a head has
        none it points at a kept token, so a write must be gated by the bool (`write(when=)`)."""
        least, slot = self.pos.min(dim=-1)  # the index of the first minimum, as argmin's
        return slot, least < 0

    def at(self, slot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Advanced index of one slot per (row, head): `buf[lc.at(slot)]` with `slot` [B, H_kv] is
        [B, H_kv] for pos and statistics, [B, H_kv, D] for k and v."""
        B, n_kv = slot.shape
        return (torch.arange(B, device=slot.device)[:, None],
                torch.arange(n_kv, device=slot.device)[None, :], slot)

    def put(self, buf: Tensor, slot: Tensor, new: Tensor, when: Tensor | None = None) -> None:
        """Write one entry per (row, head): `buf[b, h, slot[b, h]] = new[b, h, 0]` where `when`
        [B, H_kv] (bool, default everywhere) holds; `buf` is one of this cache's buffers, `new`
        [B, H_kv, 1] (or [B, H_kv, 1, D] for k / v, as `buf.gather(2, ...)` of one slot gives).
        Compiled: an `index_put_`, which inductor does in place; a `scatter_` there copies the
        whole buffer out and back every step (inductor does not reinplace it; bench/NOTES.md,
        session 14). Eager: a `scatter_` (in place there, and fewer ops to dispatch)."""
        if new.dtype != buf.dtype:
            new = new.to(buf.dtype)
        go = None if when is None else when.view(*when.shape, *([1] * (new.dim() - 2)))
        if torch.compiler.is_compiling():
            at = self.at(slot)
            if go is not None:
                new = torch.where(go, new, buf[at][:, :, None])
            buf[at] = new[:, :, 0]
            return
        _scatter(buf, _slot_index(slot, buf), new, go)

    def add(self, buf: Tensor, slot: Tensor, delta: Tensor) -> None:
        """`buf[b, h, slot[b, h, i]] += delta[b, h, i]`: slot [B, H_kv, m] (distinct per head),
        delta [B, H_kv, m] (or [B, H_kv, m, D] for k / v). Compiled: read, add, `index_put_` of
        the m entries (in place, as `put`); eager: one `scatter_add_` (for a 2-byte float:
        gather, add, and `_scatter`'s bit-for-bit write)."""
        if delta.dtype != buf.dtype:
            delta = delta.to(buf.dtype)
        if torch.compiler.is_compiling():
            B, n_kv, _ = slot.shape
            at = (torch.arange(B, device=slot.device)[:, None, None],
                  torch.arange(n_kv, device=slot.device)[None, :, None], slot)
            buf[at] = buf[at] + delta
            return
        idx = slot if buf.dim() == 3 else slot[..., None].expand(-1, -1, -1, buf.shape[-1])
        if buf.dtype in _BITS:  # the slots are distinct: read, add (rounded once, as
            _scatter(buf, idx, buf.gather(2, idx) + delta, None)  # scatter_add_), write
            return
        buf.scatter_add_(2, idx, delta)

    def write(self, slot: Tensor, k: Tensor, v: Tensor, pos: Tensor,
              stats: dict[str, Tensor] | None = None, when: Tensor | None = None) -> None:
        """Write one token per head into `slot` [B, H_kv] where `when` [B, H_kv] (bool, default
        everywhere) holds; elsewhere the slot keeps its content. k, v: [B, H_kv, 1, D]; pos: [B, 1]
        (or [B, H_kv]); statistics of the slot are reset to 0 unless given ([B, H_kv])."""
        B, n_kv = slot.shape
        new = {"k": k, "v": v, "pos": pos.expand(B, n_kv)[:, :, None]}
        for name in self.stat_names:
            val = (stats or {}).get(name)
            new[name] = val[:, :, None] if val is not None else None
        if torch.compiler.is_compiling():
            for name, val in new.items():
                buf = getattr(self, name)
                self.put(buf, slot, buf.new_zeros(B, n_kv, 1) if val is None else val, when)
            return
        # eager: one slot index and one gate for every buffer (CPU pays per op dispatched)
        idx, idx_kv = _slot_index(slot, self.pos), _slot_index(slot, self.k)
        go = None if when is None else when.reshape(B, n_kv, 1)
        go_kv = None if go is None else go.reshape(B, n_kv, 1, 1)
        _scatter(self.k, idx_kv, k, go_kv)
        _scatter(self.v, idx_kv, v, go_kv)
        for name in ("pos",) + self.stat_names:
            val = new[name]
            _scatter(getattr(self, name), idx, 0 if val is None else val, go)

    def evict(self, slot: Tensor, when: Tensor) -> None:
        """Empty `slot` [B, H_kv] where `when` [B, H_kv] (bool) holds; no host sync."""
        if torch.compiler.is_compiling():
            self.put(self.pos, slot, torch.full_like(slot, -1)[:, :, None], when)
            return
        B, n_kv = slot.shape
        _scatter(self.pos, slot.reshape(B, n_kv, 1), -1, when.reshape(B, n_kv, 1))

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

    def slot_buffers(self) -> tuple[str, ...]:
        """The buffers indexed by slot along dim 2: K, V, positions, statistics."""
        return ("k", "v", "pos") + self.stat_names

    def snapshot_row(self, row: int, n: int) -> dict[str, Tensor]:
        """Copies of row `row`'s buffers, the slot-indexed ones cut after slot `n` (past the last
        held one, so nothing held is lost): a state `restore_row` puts back."""
        slot = set(self.slot_buffers())
        return {name: (buf[row][:, :n] if name in slot else buf[row]).clone()
                for name, buf in self.named_buffers()}

    def restore_row(self, snap: dict[str, Tensor], row: int) -> None:
        """Row `row` holds the state of `snap` (`snapshot_row`): its tokens, statistics, budgets
        and policy-owned buffers; the slots past the snapshot's are empty."""
        self.clear_rows(row)
        slot = set(self.slot_buffers())
        for name, src in snap.items():
            dst = getattr(self, name)[row]
            (dst[:, :src.shape[1]] if name in slot else dst).copy_(src)

    def clear_rows(self, rows) -> None:
        """Empty batch rows `rows` (an int, a slice or an index tensor): every slot free, every
        statistic 0 (outside any compiled step: a serving slot freed for the next request)."""
        self.pos[rows] = -1
        for name in self.stat_names:
            getattr(self, name)[rows] = 0

    def copy_row(self, src: "LayerCache", src_row: int, dst_row: int) -> None:
        """Copy row `src_row` of `src` (same layout: heads, capacity, head dim, statistics) into
        row `dst_row` of this cache: every buffer, budgets and policy-owned ones included. A
        buffer whose last dimension differs (a per-position table such as cam's pre-drawn gates)
        is copied over the common prefix."""
        mine = dict(self.named_buffers())
        for name, buf in src.named_buffers():
            if name not in mine:
                raise ValueError(f"copy_row: the destination cache has no buffer {name!r}")
            dst = mine[name][dst_row]
            n = min(dst.shape[-1], buf.shape[-1])
            dst[..., :n].copy_(buf[src_row][..., :n])


def _slot_index(slot: Tensor, buf: Tensor) -> Tensor:
    """`slot` [B, H_kv] as a `gather` / `scatter_` index along dim 2 of `buf`: [B, H_kv, 1] for
    pos and statistics, [B, H_kv, 1, D] for k and v."""
    idx = slot[:, :, None]
    return idx if buf.dim() == 3 else idx[..., None].expand(-1, -1, 1, buf.shape[-1])


# torch's CPU `scatter_` / `scatter_add_` of a 2-byte float (bf16, fp16) passes over the whole
# buffer: 157 / 146 us a call into a [1, 3, 4129, 64] bf16 K cache against 1.4 us in fp32 (torch
# 2.13; a bf16 decode step at 4K spent 6 ms a step in them, bench/NOTES.md session 24). The same
# bits written through int16 views take the integer kernel.
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _scatter(buf: Tensor, idx: Tensor, new: Tensor | float, go: Tensor | None) -> None:
    """Eager `buf[..., idx] = new` along dim 2 where `go` holds (broadcast over idx's shape;
    elsewhere the entry keeps its value); `new` a tensor of idx's shape or a scalar."""
    if go is not None:
        new = torch.where(go, new, buf.gather(2, idx))
    elif not isinstance(new, Tensor):
        if buf.dtype not in _BITS:
            buf.scatter_(2, idx, new)
            return
        new = torch.full(idx.shape, new, dtype=buf.dtype, device=buf.device)
    if new.dtype != buf.dtype:
        new = new.to(buf.dtype)
    bits = _BITS.get(buf.dtype)
    if bits is None:
        buf.scatter_(2, idx, new)
    else:
        buf.view(bits).scatter_(2, idx, new.view(bits))


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

    @property
    def batch(self) -> int:
        return self.layers[0].pos.shape[0]

    def clear_rows(self, rows) -> None:
        for lc in self.layers:
            lc.clear_rows(rows)

    def snapshot_row(self, row: int) -> list[dict[str, Tensor]]:
        """Row `row`'s state, every layer, in the least memory that restores it (`restore_row`):
        each layer's slots cut after its last held one (one host read for all layers). A kept
        prefill state of `full` after a short prefix is then that prefix's size, not the slot's."""
        held = [(lc.pos[row] >= 0).any(dim=0) for lc in self.layers]          # [S_l] each
        last = torch.stack([(h * torch.arange(1, h.shape[0] + 1, device=h.device)).max()
                            for h in held]).tolist()
        return [lc.snapshot_row(row, n) for lc, n in zip(self.layers, last)]

    def restore_row(self, snap: list[dict[str, Tensor]], row: int) -> None:
        for lc, layer in zip(self.layers, snap, strict=True):
            lc.restore_row(layer, row)

    def copy_row(self, src: "KVCache", src_row: int, dst_row: int) -> None:
        """Row `src_row` of `src` into row `dst_row` here, every layer (see LayerCache.copy_row)."""
        for mine, theirs in zip(self.layers, src.layers, strict=True):
            mine.copy_row(theirs, src_row, dst_row)
