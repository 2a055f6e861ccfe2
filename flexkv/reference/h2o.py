"""Reference `h2o`: S_j = cumulative group-mean attention; keep the recent w plus the top C - w."""

from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy, keep_recent_and_top, lowest_index


@register_reference("h2o")
class RefH2O(RefPolicy):
    stat_names = ("score",)

    def prefill_select(self, layer, b, heads, chunks, attn):
        C, w = self.spec.budget, self.spec.w
        out = []
        for head, ch in zip(heads, chunks):
            head.stats["score"] = head.stats["score"] + ch.probs.sum(dim=1).mean(dim=0)
            if len(head) > C:
                last = int(ch.q_pos.max())
                head = keep_recent_and_top(head, head.stats["score"], last, w, C)
            out.append(head)
        return out

    def decode_update(self, layer, b, heads, steps, attn):
        C, w = self.spec.budget, self.spec.w
        out = []
        for head, st in zip(heads, steps):
            head.stats["score"] = head.stats["score"] + st.probs.mean(dim=0)
            if len(head) > C:
                evictable = head.pos <= st.q_pos - w
                head = head.drop(lowest_index(head.stats["score"], head.pos, evictable))
            out.append(head)
        return out
