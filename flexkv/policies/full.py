"""`full`: no compression; capacity = prompt + new tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flexkv.cache import LayerCache
from flexkv.policies.base import Policy, PrefillContext
from flexkv.policies.registry import register


@register
@dataclass
class Full(Policy):
    """Keeps every token. `budget` is ignored (None); it is the baseline all policies match when
    their budget holds the whole sequence."""

    name: ClassVar[str] = "full"
    decode_evicts: ClassVar[bool] = False

    def validate(self, prompt_len: int, max_new_tokens: int, n_layers: int) -> None:
        self.validate_prefill_only()
        if self.budget is not None:
            raise ValueError("budget must be None for policy 'full' (it keeps every token)")

    def effective(self, prompt_len: int, max_new_tokens: int) -> bool:
        return False

    def prefix_key(self, prompt_len: int, max_new_tokens: int) -> tuple:
        return ()   # every token is kept: a chunk's cache is the tokens so far

    def store(self, lc: LayerCache, ctx: PrefillContext) -> None:
        """Every token is kept: when they fit as they come (a one-shot prefill or a first chunk;
        slot order carries no meaning) they are loaded without the priority sort and the gather
        of K and V (bench/NOTES.md entry 13). A later chunk's tokens follow the cache's whole
        capacity, empty slots included, so those go through the base's top-k store."""
        if ctx.pos.shape[-1] <= lc.capacity:
            lc.load(ctx.k, ctx.v, ctx.pos, ctx.stats)
        else:
            super().store(lc, ctx)
