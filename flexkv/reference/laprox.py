"""Reference `laprox` (see flexkv/policies/laprox.py and shared/METHODS.md).

Per head, float64, token by token: score_j = mean over the group's query heads h of
||a_h[W, j]|| * ||v_j W_o^(h)|| (or, score="frobenius", the Frobenius norm of the explicit
|W| x d_model matrix sum_h a_h[W, j] (outer) (v_j W_o^(h))); the tokens outside the last `window`
positions, in position order, average-pooled (kernel, zero padding counted); then divided by the
sum over all the layer's heads (normalize="layer"), by ||O_l[W]||_F ("output") or not at all
("none"); each head keeps its window plus its top floor(max_head_factor * (C - w)) other tokens;
after the prompt, one global sort of all (layer, head, token) outside the windows keeps the top
L * Hkv * (C - w) (ties: lower score, then lower position, layer, KV head are evicted first).
"""
import torch

from flexkv.reference import register_reference
from flexkv.reference.engine import F64, RefPolicy, top_indices
from flexkv.reference.snapkv import pool_1d


@register_reference("laprox")
class RefLaProx(RefPolicy):
    stat_names = ("score",)

    def prefill_select(self, layer, b, heads, chunks, attn):
        spec = self.spec
        C, w, norm_kind = spec.budget, spec.window, spec._normalize()
        head_max = int(spec.max_head_factor * (C - w))
        weight = attn.o_proj.weight.to("cpu", F64)            # [d_model, H * D]
        G, D = chunks[0].probs.shape[0], heads[0].k.shape[1]

        def w_o(h):                                            # head h's [D, d_model] slice
            return weight[:, h * D:(h + 1) * D].T

        scores, others = [], []
        for g, (head, ch) in enumerate(zip(heads, chunks)):
            score = torch.zeros(len(head), dtype=F64)
            older = []
            if len(head):
                last = int(ch.q_pos.max())
                older = sorted((i for i in range(len(head)) if head.pos[i] <= last - w),
                               key=lambda i: int(head.pos[i]))
                a = ch.probs[:, -w:, :]                        # [G, |W|, n]: window attention
                raw = []
                for j in older:
                    u = [head.v[j] @ w_o(g * G + i) for i in range(G)]
                    if spec.score == "frobenius":
                        err = sum(torch.outer(a[i, :, j], u[i]) for i in range(G))
                        raw.append(float(torch.linalg.norm(err, "fro")))
                    else:
                        raw.append(sum(float(torch.linalg.norm(a[i, :, j]) * torch.linalg.norm(u[i]))
                                       for i in range(G)) / G)
                for j, x in zip(older, pool_1d(raw, spec.kernel, "avg")):
                    score[j] = x
            scores.append(score)
            others.append(older)
        norm = 1.0
        if norm_kind == "layer":
            norm = float(sum(s.sum() for s in scores))
        elif norm_kind == "output":  # O_l[W] = sum over all query heads of A_h[W] V W_o^(h)
            out = torch.zeros(min(w, chunks[0].probs.shape[1]), weight.shape[0], dtype=F64)
            for g, (head, ch) in enumerate(zip(heads, chunks)):
                for i in range(G):
                    out += ch.probs[i, -w:] @ head.v @ w_o(g * G + i)
            norm = float(torch.linalg.norm(out))
        norm = norm if norm > 0 else 1.0
        kept = []
        for head, score, older in zip(heads, scores, others):
            head.stats["score"] = score / norm
            window = [i for i in range(len(head)) if i not in set(older)]
            idx = torch.tensor(older, dtype=torch.long)
            if len(idx) > head_max:
                idx = idx[top_indices(head.stats["score"][idx], head.pos[idx], head_max)]
            kept.append(head.take(sorted(window + idx.tolist())))
        return kept

    def finish_prefill(self, cache, model):
        C, w = self.spec.budget, self.spec.window
        n_layers, n_kv = len(cache.layers), len(cache.layers[0].heads[0])
        k_keep = n_layers * n_kv * (C - w)
        for b in range(len(cache.layers[0].heads)):
            entries = []  # (score, pos, layer, head, index) of every token outside its window
            for l, lc in enumerate(cache.layers):
                for g, head in enumerate(lc.heads[b]):
                    if len(head) == 0:
                        continue
                    last = int(head.pos.max())
                    for i in range(len(head)):
                        if head.pos[i] <= last - w:
                            entries.append((float(head.stats["score"][i]), int(head.pos[i]), l, g, i))
            entries.sort(reverse=True)                         # highest (score, pos, l, g) first
            evicted = {(l, g, i) for _, _, l, g, i in entries[k_keep:]}
            for l, lc in enumerate(cache.layers):
                for g, head in enumerate(lc.heads[b]):
                    keep = [i for i in range(len(head)) if (l, g, i) not in evicted]
                    lc.heads[b][g] = head.take(keep)
