"""Reference `snapkv`: score by the last `window` queries' attention, pool, keep top C - w + window.

Per head: s_j = sum over the chunk's last `window` queries of the group-mean attention, for the
tokens outside the last `window` positions; pool s along the tokens sorted by position (kernel k,
windows clipped at the ends: for "max" the same as zero padding since s >= 0; for "avg" the sum
over the clipped window divided by k, i.e. zero padding counted); keep the top
`keep - len(window)` by pooled s (ties keep the higher position) plus the window. Decode appends.
"""
from __future__ import annotations

from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy


def pool_1d(s: list[float], kernel: int, mode: str) -> list[float]:
    """Pool a list of scores (in position order): max, or the sum over the window clipped at the
    ends divided by `kernel` (zero padding counted, as `F.avg_pool1d`)."""
    r = kernel // 2
    if mode == "avg":
        return [sum(s[max(0, j - r):j + r + 1]) / kernel for j in range(len(s))]
    return [max(s[max(0, j - r):j + r + 1]) for j in range(len(s))]


@register_reference("snapkv")
class RefSnapKV(RefPolicy):
    def build_cache(self, model, batch, prompt_len, max_new_tokens, capacities=None):
        self.prompt_len = prompt_len
        self.n_layers = model.args.num_hidden_layers
        return super().build_cache(model, batch, prompt_len, max_new_tokens)

    def layer_keep(self, layer: int) -> int:
        """Tokens one head of `layer` keeps (window included)."""
        return self.spec.budget

    def scores(self, head, chunk):
        """-> (window indices, other indices sorted by position, pooled score of each other)."""
        w, k = self.spec.window, self.spec.kernel
        last = int(chunk.q_pos.max())
        window = [i for i in range(len(head)) if int(head.pos[i]) > last - w]
        others = sorted((i for i in range(len(head)) if int(head.pos[i]) <= last - w),
                        key=lambda i: int(head.pos[i]))
        group_mean = chunk.probs[:, -w:, :].mean(dim=0)  # [<= w queries, n tokens]
        s = [float(group_mean[:, i].sum()) for i in others]
        return window, others, pool_1d(s, k, self.spec.pool)

    def select(self, head, chunk, keep: int):
        """Keep the window plus the top `keep - len(window)` others by pooled score."""
        if len(head) <= keep:
            return head
        window, others, pooled = self.scores(head, chunk)
        ranked = sorted(range(len(others)), key=lambda j: (-pooled[j], -int(head.pos[others[j]])))
        chosen = [others[j] for j in ranked[:keep - len(window)]]
        return head.take(sorted(window + chosen))

    def prefill_select(self, layer, b, heads, chunks, attn):
        keep = self.layer_keep(layer)
        return [self.select(head, ch, keep) for head, ch in zip(heads, chunks)]
