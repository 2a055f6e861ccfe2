"""flexkv.torch_fixes: the backport of inductor's CPU fusion fixes (torch < 2.14)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexkv import torch_fixes


def merge_step(score, q, k, pos, v):
    """cam's decode step in miniature: `score += probs`, then a gate that reads the new score at
    the victim and its receivers, and an in-place merge into V. Without the fix, torch 2.11's CPU
    backend wrote `score` inside the softmax kernel and then recomputed `score + probs` from the
    written buffer in the gate's kernel."""
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
    """pytorch/pytorch#177631 as flexkv met it. Compiled as flexkv compiles its decode step
    (`reorder_for_locality` off): every output and every mutated input equals eager (V off by
    1.3e-3 on torch 2.11 without the fix)."""
    torch_fixes.apply()
    eager, compiled = _inputs(), _inputs()
    out_e = merge_step(*eager)
    fn = torch.compile(merge_step, fullgraph=True, options={"reorder_for_locality": False})
    out_c = fn(*compiled)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=1e-12)
    for name, a, b in zip(("score", "q", "k", "pos", "v"), compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{name} after the step")


def _pooled(x, weight, bias):
    conv = F.conv2d(F.interpolate(x, scale_factor=(1.5, 1.25), mode="bilinear")[:, :, 1:7, 1:8],
                    weight, bias, padding=1)
    pool = F.max_pool2d(conv, kernel_size=3, stride=1, padding=1)
    return conv, pool, pool.mean(dim=(2, 3), keepdim=True)


def _where_pooled(x, weight, bias, mask):
    conv, pool, _ = _pooled(x, weight, bias)
    return torch.where(mask, conv, pool)


@pytest.mark.slow
def test_read_after_scatter_compiled_on_cpu():
    """pytorch/pytorch#185509's repro: max_pool2d's backward scatters into a zero buffer, and a
    read of it lost its dependency on the scatter (gradients off by up to 77 on torch 2.13
    without the fix)."""
    torch_fixes.apply()
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 6, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    conv, _, threshold = _pooled(x, w, b)
    mask = conv > threshold

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        fn(*leaves, mask).sum().backward()
        return [t.grad for t in leaves]

    for name, c, e in zip(("x", "weight", "bias"), grads(torch.compile(_where_pooled)),
                          grads(_where_pooled)):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4, msg=f"the gradient of {name}")


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
