"""Fixes to torch's compiler that flexkv's compiled code needs on the oldest torch it supports.

torch 2.11, inductor's C++ (CPU) backend: fusing two nodes whose loop ranges differ recomputes
one node's loop body, and with it the node's dependencies, dropping the fake ones (`WeakDep`,
`StarDep`) that order the mutation of a buffer after every read of its old value
(pytorch/pytorch#177631; fixed in torch 2.12 by pytorch/pytorch#177816). A mutated graph input
can then be written before a kernel that still reads its old value. In flexkv this broke `cam`'s
compiled decode step on CPU: `score += probs` was fused into the softmax kernel and ran before
the merge gate's kernel, which recomputes `score + probs` from the buffer, so the gate counted
this step's attention twice (found 2026-12-03 by `tests/test_policies.py` on torch 2.11;
tests/test_torch_fixes.py holds a small function that shows it). `apply` backports the fix, as
2.12's `SchedulerNode.recompute_size_and_body` has it, before flexkv compiles anything; CUDA
kernels never take that path. It also tags the compile caches' keys (`torch.compiler.config.
cache_key_tag`), so no kernel compiled without the fix is reused from an on-disk cache.
"""
from __future__ import annotations

import torch
from torch.torch_version import TorchVersion

CACHE_TAG = "flexkv-inductor-177816"
_applied = False


def needed() -> bool:
    """Whether this torch lacks the fix (torch < 2.12)."""
    return TorchVersion(torch.__version__) < (2, 12)


def apply() -> None:
    """Backport the fix into this process's inductor (once; nothing on torch >= 2.12)."""
    global _applied
    if _applied or not needed():
        return
    from torch._inductor import scheduler
    from torch._inductor.dependencies import StarDep, WeakDep
    from torch.utils._ordered_set import OrderedSet

    recompute = scheduler.SchedulerNode.recompute_size_and_body

    def recompute_size_and_body(self, extra_indexing_constraints=None,
                                recompute_sizes_body_func=None):
        fake = OrderedSet(d for d in self.read_writes.reads if isinstance(d, (WeakDep, StarDep)))
        recompute(self, extra_indexing_constraints=extra_indexing_constraints,
                  recompute_sizes_body_func=recompute_sizes_body_func)
        if fake:
            self.set_read_writes(self.read_writes.with_read(fake).rename(self.mutation_renames))

    scheduler.SchedulerNode.recompute_size_and_body = recompute_size_and_body
    cfg = torch.compiler.config
    cfg.cache_key_tag = f"{cfg.cache_key_tag}+{CACHE_TAG}" if cfg.cache_key_tag else CACHE_TAG
    _applied = True
