"""Reference `pyramidkv`: SnapKV selection, layer l keeps `max - l*step` plus the window; a prompt
shorter than 2(C - w) keeps C in every layer (uniform SnapKV, as KVCache-Factory)."""
from __future__ import annotations

from flexkv.reference import register_reference
from flexkv.reference.snapkv import RefSnapKV


@register_reference("pyramidkv")
class RefPyramidKV(RefSnapKV):
    def layer_keep(self, layer: int) -> int:
        C, w, beta = self.spec.budget, self.spec.window, self.spec.beta
        T, L = self.prompt_len, self.n_layers
        if T <= C:  # SnapKV compresses only prompts longer than the budget
            return T
        if T < 2 * (C - w):  # too short for the pyramid: uniform SnapKV
            return C
        min_keep = (C - w) // beta
        max_keep = 2 * (C - w) - min_keep
        if max_keep > T - w:
            max_keep = T - w
            min_keep = 2 * (C - w) - max_keep
        step = (max_keep - min_keep) // (L - 1) if L > 1 else 0
        return max_keep - layer * step + w
