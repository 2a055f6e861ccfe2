"""`tova` (Token Omission Via Attention, Oren et al. 2024, "Transformers are Multi-State RNNs").

Score of a cached token = the attention the layer's **last query** gives it, averaged over **all**
query heads of the layer (not per KV group); keep the top `budget` tokens. Every KV head of a layer
therefore holds the same token set. Prefill: one top-`budget` selection with the prompt's last
query (chunked prefill: after each chunk, with the chunk's last query over cached + chunk tokens).
Decode: after the step's attention over the `budget` kept tokens + the new one, evict the
`argmin` of the layer-averaged attention. No sinks, no recent window, no accumulated statistics
(the score is the current query's attention only). Needs the decode probabilities.

Static form: slot layouts may differ between the KV heads of a layer (the policy never relies on
them being equal), so the per-head scores are aligned **by position** (each head's slots sorted
by `pos`; all heads hold the same positions, hence the same sorted order), averaged over the
`Hkv x G` query heads, and scattered back to every head's slots. The identical per-position score
and the shared tie-break (lower position evicted) make every head evict the same position.
Parameters: `budget` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from flexkv.distributed import SINGLE, Shard
from flexkv.policies.base import DecodeContext, Policy, PrefillContext
from flexkv.policies.registry import register
from flexkv.policies.scores import window_probs


def layer_mean_by_position(probs: Tensor, pos: Tensor, shard: Shard = SINGLE) -> Tensor:
    """Mean over all query heads of a layer, token by token (matched through `pos`, not slots).

    probs: [B, Hkv, G, N] attention of one query per head; pos: [B, Hkv, N], the same position set
    in every KV head of a row (empty slots -1). -> [B, Hkv, N]: each slot gets the layer score of
    the token it holds (identical across heads). Tensor parallel: the heads of every rank (all
    ranks hold the same positions too), one all-reduce of [B, 1, N]."""
    order = pos.argsort(dim=-1, stable=True)                     # [B, Hkv, N] slots by position
    per_head = probs.sum(dim=2).gather(-1, order)                # [B, Hkv, N] in position order
    n_heads = probs.shape[1] * probs.shape[2] * shard.world
    layer = (shard.sum_heads(per_head, dim=1) / n_heads).expand_as(per_head)  # [B, Hkv, N]
    return layer.new_empty(layer.shape).scatter_(-1, order, layer)


@register
@dataclass
class TOVA(Policy):
    name: ClassVar[str] = "tova"
    needs_decode_probs: ClassVar[bool] = True

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        # the chunk's last query (per row: left padding sits on the left, so it is a real one
        # whenever the row has any real query in the chunk; an all-padding row gets zeros)
        last = window_probs(ctx.q, ctx.k, ctx.q_pos, ctx.pos, 1, ctx.window)[:, :, :, 0]  # [B,Hkv,G,N]
        return layer_mean_by_position(last, ctx.pos, ctx.shard)

    def decode_victim_score(self, ctx: DecodeContext) -> Tensor:
        return layer_mean_by_position(ctx.probs, ctx.lc.pos, ctx.shard)  # probs: [B, Hkv, G, S]
