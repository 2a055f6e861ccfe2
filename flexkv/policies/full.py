"""`full`: no compression; capacity = prompt + new tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flexkv.policies.base import Policy
from flexkv.policies.registry import register


@register
@dataclass
class Full(Policy):
    """Keeps every token. `budget` is ignored (None); it is the baseline all policies match when
    their budget holds the whole sequence."""

    name: ClassVar[str] = "full"
    decode_evicts: ClassVar[bool] = False

    def validate(self, prompt_len: int, max_new_tokens: int, n_layers: int) -> None:
        if self.budget is not None:
            raise ValueError("budget must be None for policy 'full' (it keeps every token)")

    def effective(self, prompt_len: int, max_new_tokens: int) -> bool:
        return False
