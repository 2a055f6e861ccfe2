"""Reference `cam`: StreamingLLM layout; each evicted token (in position order) merges its value
into the next m = min(merge_tokens, later kept) kept tokens: v_i += v_e * p / m,
p = clamp(S_e / mean(S_receivers), 0, 1), or with denominator="max" p = clamp(A_e / max over the
kept tokens of A, 0, 1), A = this step's attention (decode) or this chunk's column sums (prefill);
the Bernoulli gate u < p with stochastic=True."""
import torch

from flexkv.reference import register_reference
from flexkv.reference.engine import RefPolicy


@register_reference("cam")
class RefCaM(RefPolicy):
    def __init__(self, spec):
        super().__init__(spec)
        self.log_mass = spec.bias == "log_mass"
        self.stat_names = ("score",) + (("merged",) if self.log_mass else ())
        self.u = None

    def build_cache(self, model, batch, prompt_len, max_new_tokens, capacities=None):
        if self.spec.stochastic:  # the same draws as the static cache: a copy of the generator
            g = torch.Generator(device=self.spec.gate_generator.device)
            g.set_state(self.spec.gate_generator.get_state())
            a = model.args
            shape = (a.num_hidden_layers, batch, a.num_key_value_heads, prompt_len + max_new_tokens)
            self.u = torch.rand(shape, generator=g, device=g.device, dtype=torch.float64).cpu()
        return super().build_cache(model, batch, prompt_len, max_new_tokens)

    def bias(self, head):
        return torch.log1p(head.stats["merged"]) if self.log_mass else None

    def keep_and_merge(self, layer, b, g, head, A):
        """Keep sinks + the most recent budget - sinks; merge every other token, oldest first."""
        C, s, m_max = self.spec.budget, self.spec.n_sink, self.spec.merge_tokens
        if len(head) <= C:
            return head
        by_pos = sorted(range(len(head)), key=lambda i: int(head.pos[i]))
        sinks = [i for i in by_pos if head.pos[i] < s]
        rest = [i for i in by_pos if head.pos[i] >= s]
        kept = sinks + rest[len(rest) - (C - len(sinks)):]
        S = head.stats["score"]
        for e in by_pos:
            if e in kept:
                continue
            receivers = [i for i in by_pos if i in kept and head.pos[i] > head.pos[e]][:m_max]
            if not receivers:
                continue
            m = len(receivers)
            if self.spec.denominator == "max":
                num, den = float(A[e]), max(float(A[i]) for i in kept)
            else:
                num, den = float(S[e]), sum(float(S[i]) for i in receivers) / m
            p = min(max(num / den, 0.0), 1.0) if den > 0 else 1.0
            if self.spec.stochastic:
                p = 1.0 if float(self.u[layer, b, g, int(head.pos[e])]) < p else 0.0
            for i in receivers:
                head.v[i] = head.v[i] + head.v[e] * p / m
                if self.log_mass:
                    head.stats["merged"][i] += p / m * (1.0 + float(head.stats["merged"][e]))
        return head.take(sorted(kept))

    def prefill_select(self, layer, b, heads, chunks, attn):
        out = []
        for g, (head, ch) in enumerate(zip(heads, chunks)):
            A = ch.probs.sum(dim=1).mean(dim=0)          # this chunk's column sums
            head.stats["score"] = head.stats["score"] + A
            out.append(self.keep_and_merge(layer, b, g, head, A))
        return out

    def decode_update(self, layer, b, heads, steps, attn):
        out = []
        for g, (head, st) in enumerate(zip(heads, steps)):
            A = st.probs.mean(dim=0)                     # this step's attention
            head.stats["score"] = head.stats["score"] + A
            out.append(self.keep_and_merge(layer, b, g, head, A))
        return out
