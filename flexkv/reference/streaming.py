"""Reference `streaming`: keep positions < n_sink and the most recent budget - n_sink."""

from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy


@register_reference("streaming")
class RefStreaming(RefPolicy):
    def _keep(self, head):
        C, s = self.spec.budget, self.spec.n_sink
        if len(head) <= C:
            return head
        sinks = [i for i in range(len(head)) if head.pos[i] < s]
        rest = sorted((i for i in range(len(head)) if head.pos[i] >= s), key=lambda i: int(head.pos[i]))
        return head.take(sorted(sinks + rest[len(rest) - (C - len(sinks)):]))

    def prefill_select(self, layer, b, heads, chunks, attn):
        return [self._keep(h) for h in heads]

    def decode_update(self, layer, b, heads, steps, attn):
        return [self._keep(h) for h in heads]
