"""`pyramidkv` (PyramidKV, Cai et al. 2024): SnapKV selection with per-layer budgets.

Lower layers attend broadly, upper layers focus, so the budget shrinks linearly with depth while
the total matches SnapKV's. With C = budget, w = window, T = prompt length, L = layers and
`beta`: `min = (C-w) // beta`, `max = 2(C-w) - min`; if `max > T-w` then `max = T-w` and
`min = 2(C-w) - max`; `step = (max-min) // (L-1)` *(choice: step = 0 when L == 1, so a one-layer
model keeps `max + w`)*; layer `l` keeps `max - l*step` tokens by SnapKV's pooled window score
plus the window. If `T <= C` nothing is compressed (every layer keeps the prompt); if
`C < T < 2(C-w)` every layer falls back to uniform SnapKV (keeps `C`), as KVCache-Factory's
`PyramidKVCluster` (Zefan-Cai/PyramidKV) does.

Scoring, pooling, the window, ties and chunked prefill are SnapKV's (see `flexkv.policies.snapkv`):
each chunk's selection keeps at most the layer's budget. The per-layer capacities are static:
`layer budget + max_new_tokens` slots (decode appends without eviction).

Parameters: `budget`, `window` (32), `kernel` (5), `pool` ("avg"), `beta` (20, int >= 1): the
window, kernel and pooling are SnapKV's defaults (its authors' code; KVCache-Factory's
`init_pyramidkv` uses the same window 32, kernel 5, avgpool).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flexkv.policies.registry import register
from flexkv.policies.snapkv import SnapKV, _is_int


def pyramid_budgets(budget: int, window: int, prompt_len: int, n_layers: int, beta: int) -> list[int]:
    """Tokens each layer keeps after the prompt (window included)."""
    if prompt_len <= budget:
        return [prompt_len] * n_layers
    sel = budget - window
    if prompt_len < 2 * sel:  # too short for the pyramid: uniform SnapKV (KVCache-Factory)
        return [budget] * n_layers
    lo = sel // beta
    hi = 2 * sel - lo
    if hi > prompt_len - window:
        hi = prompt_len - window
        lo = 2 * sel - hi
    step = (hi - lo) // (n_layers - 1) if n_layers > 1 else 0
    return [hi - layer * step + window for layer in range(n_layers)]


@register
@dataclass
class PyramidKV(SnapKV):
    beta: int = 20

    name: ClassVar[str] = "pyramidkv"

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not _is_int(self.beta) or self.beta < 1:
            raise ValueError(f"beta must be an int >= 1, got {self.beta!r}")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def prefill_keep(self, layer: int, prompt_len: int) -> int:
        return pyramid_budgets(self.budget, self.window, prompt_len, self.n_layers, self.beta)[layer]

    def max_capacities(self, model, max_prompt_len: int, max_new_tokens: int) -> list[int]:
        """A shorter prompt gives the upper layers MORE tokens (`min` rises when `max` is
        capped at T - w), so each layer's slot count is the maximum over every prompt length."""
        self.bind_model(model)
        n_layers = self.n_layers
        most = [0] * n_layers
        for T in range(1, max_prompt_len + 1):
            if not self.effective(T, max_new_tokens):
                keep = [T] * n_layers
            else:
                keep = pyramid_budgets(self.budget, self.window, T, n_layers, self.beta)
            most = [max(m, k) for m, k in zip(most, keep)]
        return [m + max_new_tokens for m in most]
