"""`vam` (VAM: Value-Attention Merging, ICLR 2026 submission 16725): a modifier for any policy.

Composes with every policy: `policy="h2o+vam"` (with `alpha=...` routed to the modifier) or
`VAM(base=H2O(budget=256), alpha=0.35)`. Everything else is the base policy's: capacity,
budgets, statistics, prefill, scores, eviction, merges, `budget`, the validation of its
parameters; the name is `"<base>+vam"`.

At every DECODE step, in every layer, after the base's whole step (attention, score update,
eviction, merges): the token appended at this step gets `v_t <- v_t + alpha * mean_{h in g} o_h`,
where `o_h` is query head h's attention output of this step (before `o_proj`) and g the KV group
of the head holding it. The step's own output used the unmodified `v_t`; later steps see the
updated one. Prefill is untouched. `alpha` >= 0, default 0.35 *(choice: the only value in the
authors' code)*; `alpha=0` is bit-identical to the base.

Implementation: the new token's slot is looked up by its position (`pos == this step's position`)
after the base's step rather than taken from the base's write slot, so a base that overrides
`decode_layer` composes too, and when the base evicted the new token in the same step (possible
for a policy without a protected recent window, e.g. tova) no slot matches and nothing is
written: the update is simply lost, as in the reference (where the token is gone). Static
shapes: a compare over `pos`, one gather and one scatter of `D` values per head; no host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from flexkv.policies.registry import register_modifier


@register_modifier
@dataclass
class VAM:
    base: object          # the policy whose cache this modifies (a Policy or another modifier)
    alpha: float = 0.35

    name: ClassVar[str] = "vam"  # the modifier's name; an instance is named "<base>+vam"

    def __post_init__(self):
        if not hasattr(self.base, "decode_layer"):
            raise ValueError(f"base must be a Policy object (e.g. H2O(budget=256)), got {self.base!r}")
        self.name = f"{self.base.name}+{type(self).name}"

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]

    def __getattr__(self, attr):  # everything not defined here is the base policy's
        if attr == "base" or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.base, attr)

    def validate(self, prompt_len: int, max_new_tokens: int, n_layers: int) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a < math.inf):
            raise ValueError(f"alpha must be a finite number >= 0 (default 0.35), got {a!r}")
        self.base.validate(prompt_len, max_new_tokens, n_layers)

    def decode_layer(self, attn, lc, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
                     active: Tensor) -> Tensor:
        o = self.base.decode_layer(attn, lc, q, k, v, q_pos, active)  # [B, H, 1, D], unmodified v_t
        B, n_kv, _, D = lc.v.shape
        dt = torch.promote_types(lc.v.dtype, torch.float32)
        o_mean = o.reshape(B, n_kv, -1, D).to(dt).mean(dim=2, keepdim=True)  # [B, Hkv, 1, D]
        new_tok = (lc.pos == q_pos[:, :, None]) & active[:, None, None]       # [B, Hkv, S]
        slot = new_tok.to(torch.int32).argmax(dim=-1)                         # [B, Hkv]
        old = lc.v.gather(2, slot[..., None, None].expand(B, n_kv, 1, D))      # [B, Hkv, 1, D]
        lc.put(lc.v, slot, old.to(dt) + self.alpha * o_mean, when=new_tok.any(dim=-1))
        return o
