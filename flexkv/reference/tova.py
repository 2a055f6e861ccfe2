"""Reference `tova`: score = the last query's attention averaged over ALL query heads of the layer;
keep the top C, one token set for the whole layer. Prefill uses the chunk's last real query,
decode the new token's query; no sinks, no window."""
import torch

from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy, top_indices


@register_reference("tova")
class RefTOVA(RefPolicy):
    def _keep_top(self, heads, last_query_probs):
        """last_query_probs[g]: [G, n] attention of head group g's last query over heads[g]."""
        C = self.spec.budget
        n_heads = sum(p.shape[0] for p in last_query_probs)
        layer_score = {}  # position -> mean over all query heads of the layer
        for head, probs in zip(heads, last_query_probs):
            for i in range(len(head)):
                p = int(head.pos[i])
                layer_score[p] = layer_score.get(p, 0.0) + float(probs[:, i].sum())
        out = []
        for head in heads:
            if len(head) > C:
                score = torch.tensor([layer_score[int(p)] / n_heads for p in head.pos],
                                     dtype=torch.float64)
                head = head.take(top_indices(score, head.pos, C))
            out.append(head)
        return out

    def prefill_select(self, layer, b, heads, chunks, attn):
        if chunks[0].probs.shape[1] == 0:  # the chunk is all padding for this row
            return heads
        return self._keep_top(heads, [ch.probs[:, -1] for ch in chunks])

    def decode_update(self, layer, b, heads, steps, attn):
        return self._keep_top(heads, [st.probs for st in steps])
