"""`streaming` (StreamingLLM, Xiao et al. 2023): attention sinks + a recent window.

Keeps positions `< n_sink` and the most recent `budget - n_sink`. Prefill keeps the sinks and the
prompt's tail; each decode step evicts the oldest non-sink token, so the recent part behaves as
a ring buffer over the free slot. Needs no attention statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.policies.base import INF, DecodeContext, Policy, PrefillContext
from flexkv.policies.registry import register


@register
@dataclass
class Streaming(Policy):
    n_sink: int = 4

    name: ClassVar[str] = "streaming"

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0, got {self.n_sink!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def min_budget(self) -> int:
        return self.n_sink + 1

    def protected_desc(self) -> str:
        return f"budget must exceed n_sink={self.n_sink}"

    def _keep_score(self, pos: Tensor) -> Tensor:
        return torch.where(pos < self.n_sink, INF, pos.to(torch.float32))

    def prefill_priority(self, ctx: PrefillContext) -> Tensor:
        return self._keep_score(ctx.pos)

    def decode_victim_score(self, ctx: DecodeContext) -> Tensor:
        return self._keep_score(ctx.lc.pos)
