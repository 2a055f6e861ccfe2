"""flexkv.torch_fixes: the backport of inductor's CPU fusion fix (torch < 2.12)."""
from __future__ import annotations

import pytest
import torch

from flexkv import torch_fixes


def merge_step(score, q, k, pos, v):
    """cam's decode step in miniature: `score += probs`, then a gate that reads the new score at
    the victim and its receivers, and an in-place merge into V. Without the fix, torch 2.11's CPU
    backend wrote `score` inside the softmax kernel and then recomputed `score + probs` from the
    written buffer in the gate's kernel (V off by ~1e-3 here; pytorch/pytorch#177631)."""
    probs = torch.softmax(torch.einsum("bhgd,bhsd->bhgs", q, k), -1)    # [B, H, G, S]
    out = torch.einsum("bhgs,bhsd->bhgd", probs, v)
    score.add_(probs.mean(dim=2))                                       # [B, H, S]
    victim = pos.argmin(-1, keepdim=True)                               # [B, H, 1]
    after = torch.where(pos > pos.gather(2, victim), pos, 1 << 40)
    recv = after.topk(3, -1, largest=False).indices                     # [B, H, 3]
    gate = (score.gather(2, victim) / score.gather(2, recv).mean(-1, keepdim=True)).clamp(0, 1) / 3
    v_e = v.gather(2, victim[..., None].expand(-1, -1, 1, v.shape[-1]))
    B, H, _ = recv.shape
    at = (torch.arange(B)[:, None, None], torch.arange(H)[None, :, None], recv)
    v[at] = v[at] + gate[..., None] * v_e
    pos.scatter_(2, victim, -1)
    return out


def _inputs(B=2, H=2, G=2, S=13, D=16):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return (r(B, H, S).abs(), r(B, H, G, D), r(B, H, S, D),
            torch.randperm(S, generator=g).repeat(B, H, 1), r(B, H, S, D))


@pytest.mark.slow
def test_input_mutation_waits_for_its_readers_compiled_on_cpu():
    """Compiled as flexkv compiles its decode step (after `apply`, `reorder_for_locality` off):
    every output and every mutated input equals eager. Fails on torch 2.11 without the fix."""
    torch_fixes.apply()
    eager, compiled = _inputs(), _inputs()
    out_e = merge_step(*eager)
    fn = torch.compile(merge_step, fullgraph=True, options={"reorder_for_locality": False})
    out_c = fn(*compiled)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=1e-12)
    for name, a, b in zip(("score", "q", "k", "pos", "v"), compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{name} after the step")


def test_apply_patches_only_a_torch_without_the_fix():
    from torch._inductor import scheduler

    before = scheduler.SchedulerNode.recompute_size_and_body
    torch_fixes.apply()
    torch_fixes.apply()  # once
    after = scheduler.SchedulerNode.recompute_size_and_body
    tag = torch.compiler.config.cache_key_tag
    if torch_fixes.needed():
        assert after.__name__ == "recompute_size_and_body" and after.__module__ == torch_fixes.__name__
        assert tag.split("+").count(torch_fixes.CACHE_TAG) == 1  # compile caches keyed apart
    else:
        assert after is before and torch_fixes.CACHE_TAG not in tag
