"""Reference `keydiff`: score_j = -cos(k_j, mean_i k_i/||k_i||) over the head's cached keys; keep
the top C (the `window` most recent positions always kept); decode evicts the argmin outside the
window, the anchor including the new key."""
import math

import torch

from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy, keep_recent_and_top, lowest_index

EPS = 1e-12


def key_diff_scores(keys):
    """keys: [n, D] float64 -> [n] = -cos(k_j, anchor), anchor = mean of the unit keys."""
    units = [k / max(math.sqrt(float(k @ k)), EPS) for k in keys]
    anchor = sum(units) / len(units)
    anchor_norm = max(math.sqrt(float(anchor @ anchor)), EPS)
    return torch.tensor([-float(u @ anchor) / anchor_norm for u in units], dtype=torch.float64)


@register_reference("keydiff")
class RefKeyDiff(RefPolicy):
    def prefill_select(self, layer, b, heads, chunks, attn):
        C, w = self.spec.budget, self.spec.window
        out = []
        for head, ch in zip(heads, chunks):
            if len(head) > C:  # then the chunk has real queries
                last = int(ch.q_pos.max())
                score = key_diff_scores(head.k)
                head = keep_recent_and_top(head, score, last, w, C)
            out.append(head)
        return out

    def decode_update(self, layer, b, heads, steps, attn):
        C, w = self.spec.budget, self.spec.window
        out = []
        for head, st in zip(heads, steps):
            if len(head) > C:
                evictable = head.pos <= st.q_pos - w
                head = head.drop(lowest_index(key_diff_scores(head.k), head.pos, evictable))
            out.append(head)
        return out
