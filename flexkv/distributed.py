"""Tensor parallelism on `torch.distributed` (Megatron / gpt-fast style), in one place.

Under `torchrun --nproc-per-node N` (or any initialised process group),
`flexkv.load_model(path, tp=True)` gives each rank its shard, reading only that rank's slices of
the safetensors files:

- attention: `q_proj` / `k_proj` / `v_proj` split by heads (column-parallel; rank r holds query
  heads `[r*H/N, (r+1)*H/N)` and KV heads `[r*Hkv/N, (r+1)*Hkv/N)`, the same GQA groups),
  `o_proj` row-parallel (its columns of those heads) followed by an all-reduce;
- MLP: `gate_proj` / `up_proj` column-parallel, `down_proj` row-parallel + all-reduce;
- `embed_tokens` and `lm_head` **vocab-parallel** when the vocabulary divides by N (rank r holds
  rows `[r*V/N, (r+1)*V/N)`; `args.vocab_shards = N`): the embedding zeroes other ranks' ids and
  all-reduces (exact: one non-zero term per token), the head's logits are all-gathered along the
  vocabulary, so every rank then holds the same full logits and sampling needs no further
  collective. That saves (N-1)/N of vocab x hidden twice per rank (Llama-3-70B, bf16, N = 8:
  4.2 GB -> 0.5 GB) for one all-reduce of the embeddings per forward and one all-gather of
  B x V logits per step. A vocabulary N does not divide stays **replicated** (no padding rows to
  mask out of the softmax). The norms are replicated.

`model.args` then describes **this rank's** part (`num_attention_heads`, `num_key_value_heads`,
`intermediate_size` divided by N), so every cache is built with the local KV heads, unchanged
cache code; `model.shard` (a `Shard`) says which part: rank, world size, process group.

Policies reach the shard through their contexts (`ctx.shard`, from the Attention module) or
`shard_of(model)`, and use its helpers for every decision that spans heads: `sum_heads`
(tova's mean over all the layer's heads), `gather_heads` (adakv's layer-wide top-k, laprox's
model-wide top-k: the selection is recomputed on every rank over all heads, ties broken by global
head index, and each rank keeps its own heads' part), `all_reduce` (laprox's per-layer norm).
Every helper is a no-op on one rank. All of them are functional collectives
(`torch.distributed._functional_collectives`), which dynamo traces into the compiled decode step
without a graph break (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc
    _gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
except ImportError:  # pragma: no cover - a torch build without distributed
    dist = fc = _gather = None


@dataclass(frozen=True)
class Shard:
    """Which part of a tensor-parallel model this process holds. `group` is the process group's
    name (what functional collectives take; a string keeps the descriptor trivially traceable).
    The one-rank descriptor `SINGLE` makes every helper a no-op."""
    rank: int = 0
    world: int = 1
    group: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ collectives
    def _wait(self, x: Tensor) -> Tensor:
        # eager functional collectives return an AsyncCollectiveTensor: wait for a plain tensor
        # (inside a compiled graph the wait is part of the graph)
        if torch.compiler.is_compiling():
            return x
        return x.wait() if isinstance(x, fc.AsyncCollectiveTensor) else x

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum of `x` over the ranks (row-parallel matmuls, per-layer norms)."""
        if not self.active:
            return x
        return self._wait(fc.all_reduce(x, "sum", self.group))

    def sum_heads(self, x: Tensor, dim: int = 1) -> Tensor:
        """Sum over ALL heads of the layer (this rank's along `dim`, then over the ranks); keeps
        `dim` with size 1."""
        return self.all_reduce(x.sum(dim=dim, keepdim=True))

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """Every rank's `x` concatenated along `dim`, rank 0's first."""
        if not self.active:
            return x
        if x.dtype == torch.bool:  # gloo gathers no bools
            return self.gather(x.to(torch.uint8), dim).bool()
        dim = dim % x.dim()
        out = self._wait(_gather(x.contiguous(), 0, self.group))       # [N * x.shape[0], ...]
        if dim == 0:
            return out
        return torch.cat(out.chunk(self.world, dim=0), dim=dim)

    def gather_heads(self, x: Tensor, dim: int = 1) -> Tensor:
        """Every rank's heads concatenated along `dim` in global head order (rank-major)."""
        return self.gather(x, dim)

    def local_heads(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's part of a tensor over all heads (`gather_heads`' inverse)."""
        if not self.active:
            return x
        n = x.shape[dim] // self.world
        return x.narrow(dim, self.rank * n, n)

    def broadcast(self, x: Tensor, src: int = 0) -> Tensor:
        """Rank `src`'s `x` on every rank (sampled tokens: one RNG decides)."""
        if not self.active:
            return x
        return self._wait(fc.broadcast(x.contiguous(), src, self.group))

    def broadcast_object(self, obj, device, src: int = 0):
        """Rank `src`'s picklable `obj` on every rank (the serving engine's per-step plan); the
        other ranks' `obj` is ignored. Two broadcasts on `device`: the length, then the bytes."""
        if not self.active:
            return obj
        import pickle

        data = pickle.dumps(obj) if self.rank == src else b""
        n = self.broadcast(torch.tensor([len(data)], dtype=torch.long, device=device), src)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return pickle.loads(self.broadcast(buf, src).cpu().numpy().tobytes())


SINGLE = Shard()


def shard_of(model) -> Shard:
    """The model's Shard (`SINGLE` for a model that is not tensor-parallel)."""
    return getattr(model, "shard", SINGLE)


# ---------------------------------------------------------------------------- process group
def _world_group(tp):
    """The process group asked for by `tp` (True: the default group; or a ProcessGroup)."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        raise ValueError("tp=True needs an initialised torch.distributed process group: run under "
                         "`torchrun --nproc-per-node N ...` (flexkv's CLI initialises it) or call "
                         "torch.distributed.init_process_group(...) first")
    if tp is True:
        return dist.group.WORLD
    if isinstance(tp, dist.ProcessGroup):
        return tp
    raise ValueError(f"tp must be False, True or a torch.distributed.ProcessGroup, got {tp!r}")


def make_shard(tp) -> Shard:
    group = _world_group(tp)
    return Shard(rank=dist.get_rank(group), world=dist.get_world_size(group),
                 group=group.group_name)


def allowed_sizes(args) -> list[int]:
    """Tensor-parallel sizes this model can be split into (KV heads and the MLP divide evenly)."""
    return [n for n in range(1, args.num_key_value_heads + 1)
            if args.num_key_value_heads % n == 0 and args.intermediate_size % n == 0]


def shard_args(args, shard: Shard):
    """This rank's ModelArgs: heads, KV heads and the MLP width divided by the world size."""
    n = shard.world
    if args.num_key_value_heads % n or args.intermediate_size % n or args.num_attention_heads % n:
        raise ValueError(f"tp: the model has num_key_value_heads={args.num_key_value_heads} "
                         f"(intermediate_size={args.intermediate_size}), which {n} ranks cannot "
                         f"split evenly; allowed tensor-parallel sizes (--nproc-per-node): "
                         f"{allowed_sizes(args)}")
    return replace(args, num_attention_heads=args.num_attention_heads // n,
                   num_key_value_heads=args.num_key_value_heads // n,
                   intermediate_size=args.intermediate_size // n, head_dim=args.head_dim,
                   vocab_shards=n if args.vocab_size % n == 0 else 1)


def init_from_env(device: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1): NCCL
    for CUDA, gloo otherwise. Returns whether this process is one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = device is not None and str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size() > 1


def destroy_group() -> None:
    """Destroy the default process group, if this process has one."""
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_rank(status: int = 0) -> NoReturn:
    """End a torchrun rank process: destroy the process group, flush, and exit with `status`
    without the interpreter's teardown. On torch 2.13's CPU (gloo) a process that used
    functional collectives aborts in that teardown now and then, after all its work and
    `destroy_process_group` ("terminate called without an active exception" from a C++
    destructor, no Python frame; a 10-line repro of all_reduce + broadcast failed 3 of 60
    torchrun runs, plain collectives 0 of 60; bench/NOTES.md session 23), and torchrun then
    reports the run failed. Nothing is left to tear down once the output is flushed."""
    import sys
    destroy_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can be written anyway
            pass
    os._exit(status)


def rank_device(device) -> torch.device:
    """`cuda` without an index means this rank's GPU (LOCAL_RANK) under tensor parallelism."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# ---------------------------------------------------------------------------- loading
# parameter name suffix -> (dimension split, which count sets the rows/columns per rank)
_SPLIT = {
    "self_attn.q_proj.weight": (0, "heads"),
    "self_attn.k_proj.weight": (0, "kv"),
    "self_attn.v_proj.weight": (0, "kv"),
    "self_attn.o_proj.weight": (1, "heads"),
    "mlp.gate_proj.weight": (0, "mlp"),
    "mlp.up_proj.weight": (0, "mlp"),
    "mlp.down_proj.weight": (1, "mlp"),
    "embed_tokens.weight": (0, "vocab"),   # vocab-parallel (when args.vocab_shards > 1)
    "lm_head.weight": (0, "vocab"),
}


def _split_of(name: str):
    for suffix, how in _SPLIT.items():
        if name.endswith(suffix):
            return how
    return None


def read_shard(path: Path, local_args, shard: Shard) -> dict[str, Tensor]:
    """This rank's state dict, read slice by slice (`safe_open(...).get_slice`): a rank never
    holds another rank's projection weights, even transiently."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"model: {path} has neither model.safetensors nor "
                         "model.safetensors.index.json")
    a, r = local_args, shard.rank
    rows = {"heads": a.num_attention_heads * a.head_dim, "kv": a.num_key_value_heads * a.head_dim,
            "mlp": a.intermediate_size, "vocab": a.vocab_size // a.vocab_shards}
    sd = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as fh:
            for name in fh.keys():
                how = _split_of(name)
                if how is None or (how[1] == "vocab" and a.vocab_shards == 1):
                    sd[name] = fh.get_tensor(name)
                    continue
                dim, kind = how
                n = rows[kind]
                sl = fh.get_slice(name)
                part = sl[r * n:(r + 1) * n] if dim == 0 else sl[:, r * n:(r + 1) * n]
                sd[name] = part.contiguous()
    return sd


def apply_shard(model, shard: Shard) -> None:
    """Record `shard` on the model and on the modules whose outputs are partial sums."""
    model.shard = shard
    for layer in model.layers:
        layer.self_attn.shard = shard
        layer.mlp.shard = shard


def kv_heads_total(model) -> int:
    """All ranks' KV heads per layer (the model's, not this rank's, count)."""
    return model.args.num_key_value_heads * shard_of(model).world
