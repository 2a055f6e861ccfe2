"""Reference `weightedkv`: a_j = S_j / c_j (cumulative attention over the number of queries that
attended to j, both counted literally here); protected sinks + recent window; evicted values merge
into the next kept token by position (the previous one if none), weighted by a."""
import torch

from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy, lowest_index, top_indices


def attends(q_pos, pos, window):
    """[Tq, n] bool: query at q_pos[t] attends to the token at pos[i]."""
    ok = pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok = ok & (q_pos[:, None] - pos[None, :] < window)
    return ok


@register_reference("weightedkv")
class RefWeightedKV(RefPolicy):
    def __init__(self, spec):
        super().__init__(spec)
        self.log_mass = spec.bias == "log_mass"
        self.stat_names = ("score", "count") + (("merged",) if self.log_mass else ())

    def bias(self, head):
        return torch.log1p(head.stats["merged"]) if self.log_mass else None

    @staticmethod
    def avg(head):
        return head.stats["score"] / head.stats["count"]

    def merge(self, head, groups):
        """groups: {kept index m: [evicted indices merged into m]}; v_m <- weighted mean."""
        a, v = self.avg(head), head.v.clone()
        for m, js in groups.items():
            members = [m] + js
            total = sum(float(a[i]) for i in members)
            if total > 0:
                head.v[m] = sum(a[i] * v[i] for i in members) / total
            if self.log_mass:
                head.stats["merged"][m] += sum(1.0 + float(head.stats["merged"][j]) for j in js)

    def neighbour(self, head, j, kept):
        later = [i for i in kept if head.pos[i] > head.pos[j]]
        if later:
            return min(later, key=lambda i: int(head.pos[i]))
        return max((i for i in kept if head.pos[i] < head.pos[j]), key=lambda i: int(head.pos[i]))

    def prefill_select(self, layer, b, heads, chunks, attn):
        C, w, s = self.spec.budget, self.spec.window, self.spec.n_sink
        out = []
        for head, ch in zip(heads, chunks):
            head.stats["score"] = head.stats["score"] + ch.probs.sum(dim=1).mean(dim=0)
            seen = attends(ch.q_pos, head.pos, attn.window).sum(0)  # chunk queries seeing j
            head.stats["count"] = head.stats["count"] + seen
            if len(head) > C:
                last = int(ch.q_pos.max())
                protected = [i for i in range(len(head))
                             if head.pos[i] < s or head.pos[i] > last - w]
                others = torch.tensor([i for i in range(len(head)) if i not in protected])
                top = top_indices(self.avg(head)[others], head.pos[others], C - len(protected))
                kept = sorted(protected + others[top].tolist())
                groups = {m: [] for m in kept}
                for j in range(len(head)):
                    if j not in kept:
                        groups[self.neighbour(head, j, kept)].append(j)
                self.merge(head, groups)
                head = head.take(kept)
            out.append(head)
        return out

    def decode_update(self, layer, b, heads, steps, attn):
        C, w, s = self.spec.budget, self.spec.window, self.spec.n_sink
        out = []
        for head, st in zip(heads, steps):
            head.stats["score"] = head.stats["score"] + st.probs.mean(dim=0)
            seen = attends(torch.tensor([st.q_pos]), head.pos, attn.window)[0]
            head.stats["count"] = head.stats["count"] + seen
            if len(head) > C:
                evictable = (head.pos >= s) & (head.pos <= st.q_pos - w)
                j = lowest_index(self.avg(head), head.pos, evictable)
                kept = [i for i in range(len(head)) if i != j]
                self.merge(head, {self.neighbour(head, j, kept): [j]})
                head = head.drop(j)
            out.append(head)
        return out
