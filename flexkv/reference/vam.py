"""Reference `vam`: the base policy's reference, then after each decode step the token appended
at this step gets v_t <- v_t + alpha * mean over the group's query heads of their attention output."""
from flexkv.reference import reference_for, register_reference
from flexkv.reference.engine import RefPolicy


@register_reference("vam")
class RefVAM(RefPolicy):
    def __init__(self, spec):
        super().__init__(spec)
        self.base = reference_for(spec.base)
        self.stat_names = self.base.stat_names

    # everything but value_update is the base's
    def build_cache(self, model, batch, prompt_len, max_new_tokens, capacities=None):
        return self.base.build_cache(model, batch, prompt_len, max_new_tokens, capacities)

    def prefill_layer(self, attn, lc, q, k, v, q_pos, info):
        return self.base.prefill_layer(attn, lc, q, k, v, q_pos, info)

    def finish_prefill(self, cache, model):
        self.base.finish_prefill(cache, model)

    def bias(self, head):
        return self.base.bias(head)

    def decode_update(self, layer, b, heads, steps, attn):
        return self.base.decode_update(layer, b, heads, steps, attn)

    def value_update(self, layer, b, heads, steps, attn):
        heads = self.base.value_update(layer, b, heads, steps, attn)
        for head, st in zip(heads, steps):
            for i in range(len(head)):
                if int(head.pos[i]) == st.q_pos:  # the token appended at this step (if still kept)
                    head.v = head.v.clone()
                    head.v[i] = head.v[i] + self.spec.alpha * st.out.mean(dim=0)
        return heads
