"""Fixes to torch's compiler that flexkv's compiled code needs on the torch versions it supports.

Inductor's C++ (CPU) backend, torch < 2.14: fusing two nodes whose loop ranges differ recomputes
one node's loop body, and with it the node's dependencies. Two kinds of them were lost there:
- torch < 2.12: the fake ones (`WeakDep`, `StarDep`) that order the mutation of a buffer after
  every read of its old value (pytorch/pytorch#177631, fixed in 2.12 by #177816). A mutated
  graph input can then be written before a kernel that still reads its old value. In flexkv
  this broke `cam`'s compiled decode step on torch 2.11: `score += probs` was fused into the
  softmax kernel and ran first, while the merge gate's kernel recomputes `score + probs` from the
  buffer, so the gate counted the step's attention twice (found 2026-12-03 by
  tests/test_policies.py on torch 2.11).
- torch < 2.14: the renames that make a read of a scatter-mutated buffer depend on the
  mutation (pytorch/pytorch#185509, fixed in 2.14 by #185873): the reader can run before the
  scatter (silently wrong gradients in that issue's repro, on torch 2.13 too).
`apply` installs 2.14's `SchedulerNode.recompute_size_and_body`, which keeps both, on torch <
2.14, before flexkv compiles anything (nothing on 2.14+), and tags the compile caches' key
(`torch.compiler.config.cache_key_tag`) so no kernel compiled without it is reused from disk.
Only `codegen/cpp.py` calls that function: CUDA kernels never had either bug.
tests/test_torch_fixes.py shows both bugs, each in a small function.
"""
from __future__ import annotations

import torch
from torch.torch_version import TorchVersion

CACHE_TAG = "flexkv-inductor-recompute-deps"
_applied = False


def needed() -> bool:
    """Whether this torch lacks the fixes (torch < 2.14)."""
    return TorchVersion(torch.__version__) < (2, 14)


def apply() -> None:
    """Backport the fixes into this process's inductor (once; nothing on torch >= 2.14)."""
    global _applied
    if _applied or not needed():
        return
    from torch._inductor import scheduler
    from torch._inductor.dependencies import StarDep, WeakDep
    from torch.utils._ordered_set import OrderedSet

    def recompute_size_and_body(self, extra_indexing_constraints=None,
                                recompute_sizes_body_func=None):
        fake = OrderedSet(d for d in self.read_writes.reads if isinstance(d, (WeakDep, StarDep)))
        self._compute_attrs(extra_indexing_constraints=extra_indexing_constraints,
                            recompute_sizes_body_func=recompute_sizes_body_func)
        if fake or self.mutation_renames:
            read_writes = self.read_writes.with_read(fake) if fake else self.read_writes
            self.set_read_writes(read_writes.rename(self.mutation_renames))

    scheduler.SchedulerNode.recompute_size_and_body = recompute_size_and_body
    cfg = torch.compiler.config
    cfg.cache_key_tag = f"{cfg.cache_key_tag}+{CACHE_TAG}" if cfg.cache_key_tag else CACHE_TAG
    _applied = True
