"""Reference `laprox` (a RECONSTRUCTION, see flexkv/policies/laprox.py and METHODS.md).

Per head, float64: E = sum_{h in g} a_h[W, j] (outer) (v_j W_o^(h)) built explicitly as a
|W| x d_model matrix, score = ||E||_F (optionally / ||O_l[W]||_F); each head keeps its window
plus its top floor(max_head_factor * (C - w)) other tokens; after the prompt, one global sort of
all (layer, head, token) outside the windows keeps the top L * Hkv * (C - w) (ties: lower score,
then lower position, then lower layer, then lower KV head are evicted first).
"""
import torch

from flexkv.reference import register_reference
from flexkv.reference.engine import F64, RefPolicy, top_indices


@register_reference("laprox")
class RefLaProx(RefPolicy):
    stat_names = ("score",)

    def prefill_select(self, layer, b, heads, chunks, attn):
        C, w = self.spec.budget, self.spec.window
        head_max = int(self.spec.max_head_factor * (C - w))
        weight = attn.o_proj.weight.to(F64)                    # [d_model, H * D]
        G, D = chunks[0].probs.shape[0], heads[0].k.shape[1]

        def w_o(h):                                            # head h's [D, d_model] slice
            return weight[:, h * D:(h + 1) * D].T

        norm = 1.0
        if self.spec.normalize:  # O_l[W] = sum over all query heads of A_h[W] V W_o^(h)
            out = torch.zeros(min(w, chunks[0].probs.shape[1]), weight.shape[0], dtype=F64)
            for g, (head, ch) in enumerate(zip(heads, chunks)):
                for i in range(G):
                    out += ch.probs[i, -w:] @ head.v @ w_o(g * G + i)
            if torch.linalg.norm(out) > 0:
                norm = torch.linalg.norm(out)
        kept = []
        for g, (head, ch) in enumerate(zip(heads, chunks)):
            if len(head) == 0:
                kept.append(head)
                continue
            a = ch.probs[:, -w:, :]                            # [G, |W|, n]: window attention
            score = torch.zeros(len(head), dtype=F64)
            for j in range(len(head)):
                err = torch.zeros(a.shape[1], weight.shape[0], dtype=F64)  # E: [|W|, d_model]
                for i in range(G):
                    err += torch.outer(a[i, :, j], head.v[j] @ w_o(g * G + i))
                score[j] = torch.linalg.norm(err, "fro") / norm
            head.stats["score"] = score
            last = int(ch.q_pos.max())
            window = [i for i in range(len(head)) if head.pos[i] > last - w]
            older = torch.tensor([i for i in range(len(head)) if head.pos[i] <= last - w],
                                 dtype=torch.long)
            if len(older) > head_max:
                older = older[top_indices(score[older], head.pos[older], head_max)]
            kept.append(head.take(sorted(window + older.tolist())))
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
