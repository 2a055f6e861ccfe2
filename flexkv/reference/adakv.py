"""Reference `adakv`: layer-wide top Hkv*(C-w) of the SnapKV scores decides each head's budget.

Exact rational arithmetic (`fractions.Fraction`) for the quotas
`count_g*(1-alpha) + alpha*(C-w)`; largest-remainder rounding (ties -> lower head index).
"""
from __future__ import annotations

import math
from fractions import Fraction

from flexkv.reference import register_reference
from flexkv.reference.snapkv import RefSnapKV


@register_reference("adakv")
class RefAdaKV(RefSnapKV):
    def prefill_select(self, layer, b, heads, chunks, attn):
        C, w = self.spec.budget, self.spec.window
        sel = C - w
        n_kv = len(heads)
        if len(chunks[0].q_pos) == 0 or int(chunks[0].q_pos.max()) + 1 <= C:
            return heads  # at most C prompt positions seen: nothing to drop
        # every head's candidates (outside the window) in one layer-wide ranking
        pool = []
        for g, (head, ch) in enumerate(zip(heads, chunks)):
            _, others, pooled = self.scores(head, ch)
            pool += [(pooled[j], int(head.pos[i]), g) for j, i in enumerate(others)]
        pool.sort(key=lambda t: (-t[0], -t[1], t[2]))
        count = [0] * n_kv
        for _, _, g in pool[:n_kv * sel]:
            count[g] += 1
        alpha = Fraction(self.spec.alpha).limit_denominator(10**6)
        quota = [c * (1 - alpha) + alpha * sel for c in count]
        share = [math.floor(q) for q in quota]
        short = n_kv * sel - sum(share)
        for g in sorted(range(n_kv), key=lambda g: (-(quota[g] - share[g]), g))[:short]:
            share[g] += 1
        out = []
        for g, (head, ch) in enumerate(zip(heads, chunks)):
            window, _, _ = self.scores(head, ch)
            out.append(self.select(head, ch, len(window) + share[g]))
        return out
