"""Decode speed with tensor parallelism: TP=1 vs TP=N on the same model shape, and the share of
the step spent in collectives. Run through `bench/speed.py --tp N` (or directly):

    python bench/speed.py --tp 2                          # CPU: gloo, the `tp-cpu` shape
    python bench/speed.py --tp 2 --tp-model llama-3.1-8b-shape --tp-device cuda --tp-dtype bfloat16

Rows (one per configuration and policy), each a separate process group started by torchrun
(TP=1 is a plain process with the model unsharded):
- `tp1` with all the threads that the TP run uses in total (CPU), and with one thread (CPU);
- `tpN`: N ranks, one thread each on CPU (torchrun's default), one GPU each on CUDA;
- `tpN-nocomm`: the same N ranks with every collective replaced by a local stand-in of the same
  shape (wrong numbers, same compute): `collective share = 1 - nocomm / tpN`.
Also the measured latency of one all-reduce of the decode step's hidden state, times the
all-reduces per step (2 per layer + 1 per layer for tova), as a second estimate of the share.

Weights are random (seeded), built directly sharded in each rank (no checkpoint is written), so
the 8B shape fits the GPUs without a disk round trip; the tests check the numerics, not this.
Results: bench/results/speed/tp<N>-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "speed"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from stamp import commit_id  # noqa: E402

SHAPES = {
    # a ~200M-parameter llama: 8 KV heads split over 2, 4 or 8 ranks; fp32 weights 0.8 GB
    "tp-cpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                   num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8,
                   head_dim=64, max_position_embeddings=8192),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=4096),
    "llama-3.1-8b-shape": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                               max_position_embeddings=131072),
}


# ------------------------------------------------------------------------------ worker
def build(shape: str, device, dtype, shard):
    from flexkv.distributed import apply_shard, shard_args
    from flexkv.models.llama import ModelArgs, Transformer, rope_inv_freq

    args = ModelArgs(**SHAPES[shape])
    if shard.active:
        args = shard_args(args, shard)
    torch.manual_seed(shard.rank)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(prev)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.inv_freq = rope_inv_freq(args).to(device)
    if shard.active:
        apply_shard(model, shard)
    return model.eval()


def no_comm() -> None:
    """Every collective becomes a local stand-in of the same shape (timing the compute only)."""
    from flexkv.distributed import Shard

    Shard.all_reduce = lambda self, x: x * 1
    Shard.gather = lambda self, x, dim: torch.cat([x] * self.world, dim=dim)
    Shard.broadcast = lambda self, x, src=0: x


def allreduce_us(shard, hidden: int, batch: int, device, dtype, reps: int = 200) -> float:
    """Microseconds per all-reduce of a [batch, 1, hidden] tensor (eager, synchronised)."""
    x = torch.randn(batch, 1, hidden, device=device, dtype=dtype)
    for _ in range(10):
        shard.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        y = shard.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del y
    return 1e6 * (time.perf_counter() - t) / reps


def worker(cfg: dict) -> None:
    import flexkv
    from flexkv.distributed import SINGLE, init_from_env, make_shard

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    tp = init_from_env(cfg["device"])
    shard = make_shard(True) if tp else SINGLE
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.get("nocomm"):
        no_comm()
    dtype = getattr(torch, cfg["dtype"])
    model = build(cfg["shape"], device, dtype, shard)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.args.vocab_size, (cfg["batch"], cfg["prompt"]), generator=g)
    ids = ids.to(device)
    rows = []
    for pol in cfg["policies"]:
        kw = {} if pol.startswith("full") else {"budget": cfg["budget"]}
        t = time.perf_counter()
        with torch.no_grad():
            flexkv.generate(model, ids, max_new_tokens=cfg["new_tokens"], policy=pol,
                            compile=cfg["compile"], **kw)
            first = time.perf_counter() - t
            out = flexkv.generate(model, ids, max_new_tokens=cfg["new_tokens"], policy=pol,
                                  compile=cfg["compile"], **kw)
        ms = 1e3 * out.decode_s / (out.new_tokens - 1)
        rows.append(dict(policy=pol, decode_ms=ms, first_run_s=first, prefill_s=out.prefill_s,
                         kv_bytes_per_rank=out.cache.kv_bytes()))
    ar = allreduce_us(shard, model.args.hidden_size, cfg["batch"], device, dtype) \
        if shard.active and not cfg.get("nocomm") else None
    if shard.rank == 0:
        Path(cfg["out"]).write_text(json.dumps(dict(rows=rows, allreduce_us=ar,
                                                    threads=torch.get_num_threads())))
    if tp:
        import torch.distributed as dist

        from flexkv.distributed import end_rank
        dist.barrier()
        end_rank()


# ------------------------------------------------------------------------------ driver
def launch(cfg: dict, n: int, threads: int | None, nocomm: bool, tmp: Path, tag: str) -> dict:
    cfg = dict(cfg, threads=threads, nocomm=nocomm, out=str(tmp / f"{tag}.json"))
    spec = tmp / f"{tag}.spec.json"
    spec.write_text(json.dumps(cfg))
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    me = str(Path(__file__).resolve())
    if n == 1:
        cmd = [sys.executable, me, "--worker", str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(n), me, "--worker", str(spec)]
    print(f"  {tag}: {' '.join(cmd[2:] if n > 1 else cmd[1:])}", flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    res = json.loads(Path(cfg["out"]).read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def run(n: int, shape: str | None, device: str, dtype: str, policies: list[str], prompt: int,
        budget: int, new_tokens: int, batch: int, compile: bool, out_dir: Path,
        argv: list[str]) -> int:
    if device == "cuda" and torch.cuda.device_count() < n:
        print(f"--tp {n} on cuda needs {n} GPUs, this machine has {torch.cuda.device_count()}")
        return 2
    shape = shape or ("tp-cpu" if device == "cpu" else "llama-3.1-8b-shape")
    cfg = dict(shape=shape, device=device, dtype=dtype, policies=policies, prompt=prompt,
               budget=budget, new_tokens=new_tokens, batch=batch, compile=compile)
    t0 = time.perf_counter()
    configs = [(f"tp{n}", n, 1 if device == "cpu" else None, False),
               (f"tp{n}-nocomm", n, 1 if device == "cpu" else None, True),
               ("tp1", 1, n if device == "cpu" else None, False)]
    if device == "cpu":
        configs.append(("tp1-1thread", 1, 1, False))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, world, threads, nocomm in configs:
            results[tag] = launch(cfg, world, threads, nocomm, Path(tmp), tag)
    rows = []
    for i, pol in enumerate(policies):
        rows.append(dict(policy=pol, **{f"{t}_ms": results[t]["rows"][i]["decode_ms"]
                                        for t in results},
                         kv_bytes_per_rank_tp=results[f"tp{n}"]["rows"][i]["kv_bytes_per_rank"],
                         kv_bytes_tp1=results["tp1"]["rows"][i]["kv_bytes_per_rank"]))
    commit = commit_id()
    dev = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    meta = dict(command="python bench/speed.py " + " ".join(argv), commit=commit, device=dev,
                torch=torch.__version__, cores=os.cpu_count(),
                wall_s=round(time.perf_counter() - t0, 1),
                load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                config=cfg, tp=n, allreduce_us=results[f"tp{n}"]["allreduce_us"],
                threads={t: results[t]["threads"] for t in results})
    return write(meta, rows, out_dir)


def derive(meta: dict, rows: list[dict]) -> list[dict]:
    """The ratios of each row: speedups over TP=1 (same total threads, and one thread on CPU),
    the collective share (1 - nocomm / tpN) and its estimate from the all-reduce latency."""
    n, layers = meta["tp"], SHAPES[meta["config"]["shape"]]["num_hidden_layers"]
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if not k.startswith(("speedup", "collective", "allred"))}
        tp, base = r[f"tp{n}_ms"], r["tp1_ms"]
        per_step = 2 * layers + (layers if r["policy"].split("+")[0] == "tova" else 0) + 1
        # (+1: the vocab-parallel embedding's; its logits all-gather is not counted here)
        r.update(speedup_vs_tp1=base / tp)
        if "tp1-1thread_ms" in r:
            r.update(speedup_vs_tp1_1thread=r["tp1-1thread_ms"] / tp)
        r.update(collective_share=1 - r[f"tp{n}-nocomm_ms"] / tp, allreduces_per_step=per_step,
                 allreduce_share_est=per_step * meta["allreduce_us"] / 1e3 / tp)
        out.append(r)
    return out


def write(meta: dict, rows: list[dict], out_dir: Path) -> int:
    rows = derive(meta, rows)
    cfg, n = meta["config"], meta["tp"]
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"tp{n}-{cfg['device']}"
    (out_dir / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    cols = list(rows[0])
    load = meta["load_avg"]
    md = [f"# Speed: tensor parallel, TP=1 vs TP={n}\n",
          f"`{meta['command']}`  \ncommit {meta['commit']}, device {meta['device']}, torch "
          f"{meta['torch']}, {meta['cores']} cores (load average at the end "
          f"{'-' if load is None else f'{load:.1f}'}), wall {meta['wall_s']} s; model "
          f"`{cfg['shape']}` {cfg['dtype']}, batch {cfg['batch']}, prompt {cfg['prompt']}, budget "
          f"{cfg['budget']}, {cfg['new_tokens']} new tokens, compile={cfg['compile']}; threads per "
          f"process {meta['threads']}; one all-reduce of the hidden state "
          f"{meta['allreduce_us']:.0f} us\n",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                    for v in r.values()) + " |")
    text = "\n".join(md) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(json.loads(Path(argv[1]).read_text()))
        return 0
    if argv[:1] == ["--render"]:  # the derived columns and the table again, from a saved json
        saved = json.loads(Path(argv[1]).read_text())
        return write(saved["meta"], saved["rows"], Path(argv[1]).parent)
    ap = argparse.ArgumentParser(prog="bench/tp_speed.py", description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tp-model", choices=sorted(SHAPES))
    ap.add_argument("--tp-device", default="cpu")
    ap.add_argument("--tp-dtype", default=None)
    ap.add_argument("--policies", default="full,h2o,tova")
    ap.add_argument("--prompts", default="512")
    ap.add_argument("--budgets", default="128")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a, _ = ap.parse_known_args(argv)
    dtype = a.tp_dtype or ("float32" if a.tp_device == "cpu" else "bfloat16")
    return run(a.tp, a.tp_model, a.tp_device, dtype, a.policies.split(","),
               int(a.prompts.split(",")[0]), int(a.budgets.split(",")[0]), a.new_tokens,
               int(a.batches.split(",")[0]), not a.no_compile, a.out, argv)


if __name__ == "__main__":
    sys.exit(main())
