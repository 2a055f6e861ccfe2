"""`cam` (CaM, Zhang et al., ICML 2024): StreamingLLM eviction; victims merge into later tokens.

Layout as `streaming`: keep positions `< n_sink` (default 4) and the most recent
`budget - n_sink`. When token e leaves the recent window it is evicted and its value is merged
into the next `m` kept tokens by position, `m = min(merge_tokens, number of later kept tokens)`
(merge_tokens default 32) *(choice: capped, the merge never reaches past the newest token; the
same m is the mean's length and the divisor)*:
`p = clamp(S_e / mean(S_receivers), 0, 1)` (p = 1 if that mean is 0 *(choice)*) and
`v_i += v_e * p / m` for each receiver, S = cumulative attention (statistic `score`, accumulated
as h2o: prefill column sums from the LSE, `+= probs` every decode step): the paper's Eq. 14
(mean denominator, additive merge), as the authors' streaming code and kvpress's CAMPress.
`denominator="max"` is the authors' QA code (KVCache-Factory's `CAMKVCluster` copies it):
`p = clamp(A_e / max_{j kept} A_j, 0, 1)` with A the current step's attention (group mean): at
decode the step's probabilities, at prefill the chunk's column sums (its queries' attention
summed); kept = the sinks and the recent window that stay (the QA code's max also covers e
itself, which the clamp makes equivalent); p = 1 if that max is 0 *(choice)*.
The merge is additive, so a value that keeps receiving merges grows along a long stream (by about
1/(1 - mean p), without bound at p = 1): a property of the method, not a bug; the quality
benchmark's streaming perplexity reports the kept values' norm (`vnorm_growth`).
*(choice: this expectation is the default.)* `stochastic=True` draws the paper's Bernoulli gate
instead: merge (`v_i += v_e / m`) iff `u_e < p`, with uniforms from the explicit
`gate_generator` (a torch.Generator, required then; not called `generator`, which
`flexkv.generate` takes for sampling). A generator cannot be traced inside the compiled decode
step, so the uniforms are drawn when the cache is built, from a copy of the generator:
`torch.rand((L, B, Hkv, T + N), dtype=float64)`, one per (layer, row, KV head, position), stored
as the buffer `gate_u` [B, Hkv, T + N] of each layer; the token evicted at position p uses
`u[l, b, h, p]` *(choice: indexed by the evicted token's position, i.e. one draw per (layer, row,
head) per decode step, which also covers prefill's evictions; the generator is read, not
advanced, so every generate call with this policy, and the reference, sees the same draws)*.
Prefill (one-shot, and after each chunk): the evicted tokens merge in one batch, in position
order, the same way. With this layout they are all older than every kept non-sink token, so they
share the same receivers (the m oldest kept non-sinks), and as S and the receivers stay fixed the
order does not change the sum.
`bias="log_mass"`: the evicted token's mass is spread `p/m` (`gate/m`) to each receiver
*(choice)*; see flexkv.policies.merging.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.distributed import kv_heads_total, shard_of
from flexkv.policies.base import DecodeContext, PrefillContext
from flexkv.policies.merging import (
    CumulativeAttention,
    MergingPolicy,
    first_after,
    first_after_slots,
    kept_mask,
)
from flexkv.policies.registry import register
from flexkv.policies.streaming import Streaming

DENOMINATORS = ("mean", "max")


@register
@dataclass
class CaM(CumulativeAttention, MergingPolicy, Streaming):
    merge_tokens: int = 32
    stochastic: bool = False
    gate_generator: torch.Generator | None = None
    denominator: str = "mean"  # "mean" (paper Eq. 14) or "max" (the authors' QA code)

    name: ClassVar[str] = "cam"

    def validate(self, prompt_len, max_new_tokens, n_layers):
        if not isinstance(self.merge_tokens, int) or self.merge_tokens < 1:
            raise ValueError(f"merge_tokens must be an int >= 1, got {self.merge_tokens!r}")
        if self.denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {self.denominator!r}")
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"stochastic must be True or False, got {self.stochastic!r}")
        gen = self.gate_generator
        if gen is not None and not isinstance(gen, torch.Generator):
            raise ValueError(f"gate_generator must be a torch.Generator or None, got {gen!r}")
        if self.stochastic and self.gate_generator is None:
            raise ValueError("gate_generator (a torch.Generator) is required with stochastic=True")
        super().validate(prompt_len, max_new_tokens, n_layers)

    def build_cache(self, model, batch, prompt_len, max_new_tokens, capacities=None):
        cache = super().build_cache(model, batch, prompt_len, max_new_tokens, capacities)
        if self.stochastic:
            g = torch.Generator(device=self.gate_generator.device)
            g.set_state(self.gate_generator.get_state())
            u = torch.rand((len(cache.layers), batch, kv_heads_total(model),
                            prompt_len + max_new_tokens), generator=g, device=g.device,
                           dtype=torch.float64)
            u = shard_of(model).local_heads(u, dim=2)  # tensor parallel: this rank's heads' draws
            for lc, u_l in zip(cache.layers, u):  # [B, Hkv, T + N] per layer, its own storage
                # (not views of one tensor: a compiled step's layer regions need unaliased inputs)
                lc.register_buffer("gate_u", u_l.to(device=lc.score.device, dtype=lc.score.dtype,
                                                    copy=True))
        return cache

    def prefix_key(self, prompt_len: int, max_new_tokens: int) -> tuple:
        if self.stochastic:   # the gates' uniforms are drawn per (prompt + new) length
            return (prompt_len, max_new_tokens)
        return super().prefix_key(prompt_len, max_new_tokens)

    def prefill_scores(self, ctx: PrefillContext) -> dict[str, Tensor]:
        stats = super().prefill_scores(ctx)  # score += this chunk's column sums
        if self.denominator == "max":       # the chunk's own attention (not a cached statistic)
            stats["step"] = stats["score"] - ctx.stats["score"]
        return stats

    def _gate(self, lc, num: Tensor, den: Tensor, n_recv: Tensor, pos_e: Tensor) -> Tensor:
        """Per evicted token: p = clamp(num / den, 0, 1) (or the Bernoulli draw u < p), over m.
        All [B, Hkv, n]."""
        p = torch.where(den > 0, (num / den).clamp(0.0, 1.0), 1.0)
        if self.stochastic:
            p = (lc.gate_u.gather(2, pos_e.clamp(min=0)) < p).to(p.dtype)
        return p / n_recv.clamp(min=1)

    # ------------------------------------------------------------------ prefill
    def store(self, lc, ctx: PrefillContext) -> None:
        keep = kept_mask(self.prefill_priority(ctx), ctx.pos, ctx.budget)    # [B, Hkv, N]
        gone = (ctx.pos >= 0) & ~keep
        big = torch.iinfo(ctx.pos.dtype).max
        oldest_gone = torch.where(gone, ctx.pos, big).amin(-1)               # [B, Hkv]
        recv = first_after(ctx.pos, keep, oldest_gone, self.merge_tokens)    # shared receivers
        S = ctx.stats["score"]
        n_recv = recv.sum(-1, keepdim=True)
        if self.denominator == "max":
            A = ctx.stats["step"]
            num, den = A, torch.where(keep, A, 0.0).amax(-1, keepdim=True)
        else:
            num, den = S, torch.where(recv, S, 0.0).sum(-1, keepdim=True) / n_recv.clamp(min=1)
        gate = torch.where(gone, self._gate(lc, num, den, n_recv, ctx.pos), 0.0)  # [B, Hkv, N]
        added = torch.einsum("bhn,bhnd->bhd", gate, ctx.v.to(gate.dtype))    # sum_e gate_e v_e
        v = torch.where(recv[..., None], ctx.v + added[:, :, None].to(ctx.v.dtype), ctx.v)
        stats = dict(ctx.stats)
        if "merged" in stats:
            mass = (gate * (1.0 + stats["merged"])).sum(-1, keepdim=True)
            stats["merged"] = torch.where(recv, stats["merged"] + mass, stats["merged"])
        super().store(lc, replace(ctx, v=v, stats=stats))

    # ------------------------------------------------------------------ decode
    def decode_evict(self, ctx: DecodeContext, victim: Tensor, when: Tensor) -> None:
        lc = ctx.lc
        vi = victim[..., None]                                               # [B, Hkv, 1]
        pos_e = lc.pos.gather(2, vi)
        # the receivers as m slots per head (not a mask over all S: the merge then touches m
        # values of V, not the whole of it)
        recv, ok = first_after_slots(lc.pos, lc.pos >= 0, pos_e[..., 0], self.merge_tokens)
        ok = ok & when[..., None]                                            # [B, Hkv, m]
        n_recv = ok.sum(-1, keepdim=True)
        if self.denominator == "max":                                        # this step's attention
            A = ctx.probs.mean(dim=2)                                        # [B, Hkv, S]
            kept = (lc.pos >= 0) & (torch.arange(A.shape[-1], device=A.device) != vi)
            num, den = A.gather(2, vi), torch.where(kept, A, 0.0).amax(-1, keepdim=True)
        else:
            num = lc.score.gather(2, vi)
            S_recv = torch.where(ok, lc.score.gather(2, recv), 0.0)          # [B, Hkv, m]
            den = S_recv.sum(-1, keepdim=True) / n_recv.clamp(min=1)
        gate = self._gate(lc, num, den, n_recv, pos_e)                       # [B, Hkv, 1]
        D = lc.v.shape[-1]
        v_e = lc.v.gather(2, vi[..., None].expand(-1, -1, 1, D))
        add = (gate[..., None] * v_e.to(gate.dtype)).to(lc.v.dtype)          # [B, Hkv, 1, D]
        lc.add(lc.v, recv, torch.where(ok[..., None], add, 0.0))
        if self.bias == "log_mass":
            lc.add(lc.merged, recv, torch.where(ok, gate * (1.0 + lc.merged.gather(2, vi)), 0.0))
        lc.evict(victim, when)
