"""Reference `kvmerger`: outside the window, cut the older tokens (position order) at the C - w - 1
lowest adjacent key cosine similarities; each run becomes one token, the Gaussian-kernel weighted
mean of its keys and values around the pivot (largest pooled SnapKV window score), stored at the
pivot's position. Layers in skip_layers use SnapKV selection. Repeated after every prefill chunk."""
import math

import torch

from flexkv.reference import register_reference
from flexkv.reference.engine import Head, RefPolicy, top_indices
from flexkv.reference.snapkv import pool_1d


def cosine(a, b) -> float:
    return float((a * b).sum() / max(float(a.norm() * b.norm()), 1e-12))


@register_reference("kvmerger")
class RefKVMerger(RefPolicy):
    def __init__(self, spec):
        super().__init__(spec)
        self.log_mass = spec.bias == "log_mass"
        self.stat_names = ("merged",) if self.log_mass else ()

    def build_cache(self, model, batch, prompt_len, max_new_tokens, capacities=None):
        L = model.args.num_hidden_layers
        skip = (0, 1, L - 1) if self.spec.skip_layers is None else self.spec.skip_layers
        self.skip = {s % L for s in skip if -L <= s < L}
        return super().build_cache(model, batch, prompt_len, max_new_tokens)

    def bias(self, head):
        return torch.log1p(head.stats["merged"]) if self.log_mass else None

    def prefill_select(self, layer, b, heads, chunks, attn):
        return [self.select(layer, head, ch) for head, ch in zip(heads, chunks)]

    def select(self, layer, head, ch):
        C, w, kernel, eps = self.spec.budget, self.spec.window, self.spec.kernel, self.spec.eps
        if len(head) <= C:
            return head
        last = int(ch.q_pos.max())
        by_pos = sorted(range(len(head)), key=lambda i: int(head.pos[i]))
        window = [i for i in by_pos if head.pos[i] > last - w]
        older = [i for i in by_pos if head.pos[i] <= last - w]
        # SnapKV window score: the last w queries' group-mean attention, summed over the window,
        # then pooled (spec.pool) over the older tokens' neighbours in position order
        raw = ch.probs[:, -w:].sum(dim=1).mean(dim=0)  # [n]
        pooled = dict(zip(older, pool_1d([float(raw[j]) for j in older], kernel, self.spec.pool)))
        if layer in self.skip:  # SnapKV: top C - w older tokens by pooled score, plus the window
            idx = torch.tensor(older)
            top = top_indices(torch.tensor([pooled[i] for i in older]), head.pos[idx], C - len(window))
            return head.take(sorted(window + idx[top].tolist()))
        # merging sets: runs of older tokens cut at the C - w - 1 lowest neighbour similarities
        sims = [cosine(head.k[older[a]], head.k[older[a + 1]]) for a in range(len(older) - 1)]
        cuts = sorted(sorted(range(len(sims)), key=lambda a: (sims[a], a))[:C - w - 1])
        sets, start = [], 0
        for a in cuts:
            sets.append(older[start:a + 1])
            start = a + 1
        sets.append(older[start:])
        pos, ks, vs, merged = [], [], [], []
        for members in sets:
            p = max(members, key=lambda i: (pooled[i], float(raw[i]), -int(head.pos[i])))
            d = [float(((head.k[p] - head.k[i]) ** 2).sum()) for i in members]
            var = sum(d) / len(d) + eps
            g = [math.exp(-di / (2 * var)) for di in d]
            weights = [gi / sum(g) for gi in g]
            pos.append(int(head.pos[p]))
            ks.append(sum(wi * head.k[i] for wi, i in zip(weights, members)))
            vs.append(sum(wi * head.v[i] for wi, i in zip(weights, members)))
            if self.log_mass:  # mass = tokens folded in = sum of the members' masses
                merged.append(sum(1.0 + float(head.stats["merged"][i]) for i in members) - 1.0)
        rest = head.take(window)
        stats = {"merged": torch.cat([torch.tensor(merged, dtype=torch.float64),
                                      rest.stats["merged"]])} if self.log_mass else {}
        return Head(torch.cat([torch.tensor(pos), rest.pos]), torch.cat([torch.stack(ks), rest.k]),
                    torch.cat([torch.stack(vs), rest.v]), stats)
