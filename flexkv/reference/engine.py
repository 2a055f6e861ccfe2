"""The eager reference engine: per (batch row, KV head) token lists, float64 attention, loops.

A reference policy plugs into the model through the same two hooks as a compiled one
(`prefill_layer`, `decode_layer`), so `flexkv.generate(..., reference=True)` runs the same model
with readable, dynamic-shape bookkeeping. Each policy's reference (a `RefPolicy` subclass in this
package) transcribes shared/METHODS.md one to one through three per-head hooks:

- `prefill_select(layer, b, heads, chunk)`: after a prefill chunk, which tokens each head keeps.
- `decode_update(layer, b, heads, step)`: after a decode step's attention, update statistics and
  evict (skipped when the policy runs with `prefill_only=True`: decode then appends).
- `finish_prefill(cache)`: after the whole prompt (global selections).

Nothing here is compiled or fast; it is what the static-shape implementations are tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

F64 = torch.float64


@dataclass
class Head:
    """The tokens one (batch row, KV head) holds. pos: [n]; k, v: [n, D] (float64); stats: [n]."""
    pos: Tensor
    k: Tensor
    v: Tensor
    stats: dict = field(default_factory=dict)

    def take(self, idx: Tensor) -> "Head":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Head(self.pos[idx], self.k[idx], self.v[idx], {n: s[idx] for n, s in self.stats.items()})

    def drop(self, i: int) -> "Head":
        keep = torch.tensor([j for j in range(len(self.pos)) if j != i], dtype=torch.long)
        return self.take(keep)

    def __len__(self) -> int:
        return len(self.pos)


@dataclass
class Chunk:
    """What a prefill chunk tells one head. probs[g_local]: [Tq, n] attention of the chunk's
    queries (only real, non-padding ones) over the head's tokens (cached then the chunk's)."""
    q: Tensor        # [G, Tq, D] float64 queries of the group's heads
    q_pos: Tensor    # [Tq]
    probs: Tensor    # [G, Tq, n]
    last: bool       # final chunk of the prompt


@dataclass
class Step:
    """What a decode step tells one head. probs: [G, n] over the head's tokens (new one last)."""
    q: Tensor        # [G, D]
    q_pos: int
    probs: Tensor    # [G, n]
    out: Tensor      # [G, D] attention output per query head


class RefLayerCache:
    def __init__(self, batch: int, n_kv: int, head_dim: int, stat_names):
        self.heads = [[Head(torch.zeros(0, dtype=torch.long), torch.zeros(0, head_dim, dtype=F64),
                            torch.zeros(0, head_dim, dtype=F64),
                            {n: torch.zeros(0, dtype=F64) for n in stat_names})
                       for _ in range(n_kv)] for _ in range(batch)]

    @property
    def pos(self) -> Tensor:
        """[B, Hkv, max n] padded with -1 (for reporting like the static cache)."""
        n = max((len(h) for row in self.heads for h in row), default=0)
        out = torch.full((len(self.heads), len(self.heads[0]), n), -1, dtype=torch.long)
        for b, row in enumerate(self.heads):
            for g, h in enumerate(row):
                out[b, g, :len(h)] = h.pos
        return out

    def retained(self) -> Tensor:
        return torch.tensor([[len(h) for h in row] for row in self.heads])


class RefCache:
    def __init__(self, layers):
        self.layers = layers

    def retained(self) -> Tensor:
        return torch.stack([lc.retained() for lc in self.layers])


def _attend(q: Tensor, q_pos: Tensor, head: Head, window: int | None, bias: Tensor | None = None):
    """q: [G, Tq, D] float64, q_pos: [Tq] over head's tokens -> probs [G, Tq, n], out [G, Tq, D]."""
    s = torch.einsum("gtd,nd->gtn", q, head.k) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    ok = head.pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok = ok & (q_pos[:, None] - head.pos[None, :] < window)
    s = s.masked_fill(~ok[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p, torch.einsum("gtn,nd->gtd", p, head.v)


class RefPolicy:
    """Reference counterpart of a compiled policy `spec` (its hyperparameters are read from it)."""

    stat_names: tuple[str, ...] = ()

    def __init__(self, spec):
        self.spec = spec

    # hooks (overridden per policy)
    def prefill_select(self, layer: int, b: int, heads: list[Head], chunks: list[Chunk], attn) -> list[Head]:
        return heads

    def decode_update(self, layer: int, b: int, heads: list[Head], steps: list[Step], attn) -> list[Head]:
        return heads

    def finish_prefill(self, cache: RefCache, model) -> None:
        pass

    def bias(self, head: Head) -> Tensor | None:
        return None

    def value_update(self, layer, b, heads, steps, attn) -> list[Head]:
        return heads

    # ------------------------------------------------------------------ plumbing
    def build_cache(self, model, batch: int, prompt_len: int, max_new_tokens: int,
                    capacities=None) -> RefCache:
        a = model.args
        return RefCache([RefLayerCache(batch, a.num_key_value_heads, a.head_dim, self.stat_names)
                         for _ in range(a.num_hidden_layers)])

    def prefill_layer(self, attn, lc: RefLayerCache, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
                      info) -> Tensor:
        dev = q.device  # the reference keeps its lists on the CPU, whatever the model's device
        q, k, v, q_pos = q.cpu(), k.cpu(), v.cpu(), q_pos.cpu()
        B, H, T, D = q.shape
        n_kv = k.shape[1]
        G = H // n_kv
        out = torch.zeros(B, H, T, D, dtype=F64)
        last = info.last
        for b in range(B):
            real = q_pos[b] >= 0
            qp = q_pos[b][real]
            heads, chunks = [], []
            for g in range(n_kv):
                old = lc.heads[b][g]
                new = Head(qp.clone(), k[b, g][real].to(F64), v[b, g][real].to(F64),
                           {n: torch.zeros(len(qp), dtype=F64) for n in self.stat_names})
                head = Head(torch.cat([old.pos, new.pos]), torch.cat([old.k, new.k]),
                            torch.cat([old.v, new.v]),
                            {n: torch.cat([old.stats[n], new.stats[n]]) for n in self.stat_names})
                qg = q[b, g * G:(g + 1) * G][:, real].to(F64)
                probs, o = _attend(qg, qp, head, attn.window, self.bias(head))
                out[b, g * G:(g + 1) * G, real] = o
                heads.append(head)
                chunks.append(Chunk(qg, qp, probs, last))
            lc.heads[b] = self.prefill_select(attn.layer_idx, b, heads, chunks, attn)
        return out.to(dev, q.dtype)

    def decode_layer(self, attn, lc: RefLayerCache, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
                     active: Tensor) -> Tensor:
        dev = q.device
        q, k, v, q_pos, active = q.cpu(), k.cpu(), v.cpu(), q_pos.cpu(), active.cpu()
        B, H, _, D = q.shape
        n_kv = k.shape[1]
        G = H // n_kv
        out = torch.zeros(B, H, 1, D, dtype=F64)
        for b in range(B):
            if not bool(active[b]):  # an idle row: nothing written, output 0
                continue
            p = int(q_pos[b, 0])
            heads, steps = [], []
            for g in range(n_kv):
                old = lc.heads[b][g]
                head = Head(torch.cat([old.pos, torch.tensor([p])]),
                            torch.cat([old.k, k[b, g].to(F64)]), torch.cat([old.v, v[b, g].to(F64)]),
                            {n: torch.cat([s, torch.zeros(1, dtype=F64)]) for n, s in old.stats.items()})
                qg = q[b, g * G:(g + 1) * G].to(F64)  # [G, 1, D]
                probs, o = _attend(qg, torch.tensor([p]), head, attn.window, self.bias(head))
                out[b, g * G:(g + 1) * G] = o
                heads.append(head)
                steps.append(Step(qg[:, 0], p, probs[:, 0], o[:, 0]))
            if not getattr(self.spec, "prefill_only", False):  # prefill_only: decode appends
                heads = self.decode_update(attn.layer_idx, b, heads, steps, attn)
            lc.heads[b] = self.value_update(attn.layer_idx, b, heads, steps, attn)
        return out.to(dev, q.dtype)


# ---------------------------------------------------------------------- helpers for references
def lowest_index(score: Tensor, pos: Tensor, evictable: Tensor) -> int:
    """Index of the minimum score among evictable tokens; ties toward the lower position."""
    best = None
    for i in range(len(pos)):
        if not bool(evictable[i]):
            continue
        key = (float(score[i]), int(pos[i]))
        if best is None or key < best[0]:
            best = (key, i)
    return best[1]


def top_indices(score: Tensor, pos: Tensor, n: int) -> Tensor:
    """Indices of the `n` highest scores; ties keep the higher position (evict the older)."""
    order = sorted(range(len(pos)), key=lambda i: (-float(score[i]), -int(pos[i])))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


def keep_recent_and_top(head: Head, score: Tensor, last: int, w: int, C: int) -> Head:
    """Keep the positions > last - w, plus the top C - |recent| of the older ones by `score`."""
    recent = [i for i in range(len(head)) if head.pos[i] > last - w]
    older = torch.tensor([i for i in range(len(head)) if head.pos[i] <= last - w], dtype=torch.long)
    top = top_indices(score[older], head.pos[older], C - len(recent))
    return head.take(sorted(recent + older[top].tolist()))
