"""Batch-1 projections on the GPU: cuBLAS's matmuls against inductor's tuned reductions.

    python bench/gemv.py --out OUT [--layers 4] [--batches 1,8] [--deadline-s S] [--quick]

flexkv's CUDA decode step compiles with inductor's `coordinate_descent_tuning`
(`flexkv.generate.COORDINATE_DESCENT`, gpt-fast's setting): at batch 1 every projection and the
LM head become inductor reductions, fused with their neighbours and tuned, instead of cuBLAS
calls. This measures that choice alone: `bench/speed.py`'s compiled `full` cell (CUDA-event
timing, the eager-step check, the per-kernel breakdown) on a model with Llama-3.1-8B's layer
shapes and LM head but `layers` layers (random bf16 weights, a 256-token prompt), once with the
tuning and once without, per batch. Writes OUT/gemv.json in speed's format (rows' `impl` says
which) and prints the table; `--quick`: the tiny model on this machine's device (a rehearsal;
the tuning only changes CUDA code).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import speed  # noqa: E402

SETTINGS = (("reductions", True), ("cuBLAS", False))  # label, COORDINATE_DESCENT


def model_for(layers: int, quick: bool, device, dtype):
    from flexkv.models.llama import ModelArgs
    cfg = dict(speed.TINY if quick else speed.LLAMA31_8B, num_hidden_layers=layers)
    return speed.random_transformer(ModelArgs(**cfg), device, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gemv.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8", help="comma-separated; each runs both settings")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no cell that would end after this many seconds")
    ap.add_argument("--quick", action="store_true",
                    help="a CPU rehearsal: the tiny model, prompt at most 48, 16 new tokens")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = importlib.import_module("flexkv.generate")  # the module (`flexkv.generate` is a function)
    bw = speed.copy_bandwidth(device, dtype)
    model = model_for(args.layers, not cuda, device, dtype)
    prompt = min(args.prompt, 48) if not cuda else args.prompt
    new = min(args.new_tokens, 16) if not cuda else args.new_tokens
    batches = [int(b) for b in args.batches.split(",") if b]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, slowest, default = [], 0.0, gen.COORDINATE_DESCENT
    meta = speed.stamp(sys.argv[1:] if argv is None else argv, 0.0, device) | dict(
        preset="gemv", bandwidth_gb_s=bw / 1e9, layers=args.layers,
        coordinate_descent="per row (impl)",
        command="python bench/gemv.py " + " ".join(sys.argv[1:] if argv is None else argv))

    def save():
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        (args.out / "gemv.json").write_text(json.dumps(
            dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))

    for B in batches:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(0, model.args.vocab_size, (B, prompt), generator=g).to(device)
        for label, tuned in SETTINGS:
            impl = f"flexkv+compile ({label})"
            spent = time.perf_counter() - t0
            if args.deadline_s is not None and spent + 1.5 * slowest > args.deadline_s:
                rows.append(speed.failed_row(impl, "full", prompt, None, B,
                                             f"skipped: deadline ({spent:.0f} s)"))
                continue
            gen.COORDINATE_DESCENT = tuned
            torch._dynamo.reset()  # each setting compiles from scratch: its compile_s is its own
            t = time.perf_counter()
            try:
                chunk = max(16, prompt // 2)  # speed's chunked-prefill column: two chunks
                row = speed.run_flexkv(model, ids, "full", None, new, chunk, True, bw,
                                       profile=True)
                row.impl = impl
            except Exception as e:  # noqa: BLE001 - one failing setting must not hide the other
                row = speed.failed_row(impl, "full", prompt, None, B,
                                       f"{type(e).__name__}: {str(e).strip()[:160]}")
            slowest = max(slowest, time.perf_counter() - t)
            rows.append(row)
            save()
            print(f"  B={B} {label}: {row.decode_ms:.3f} ms/step, {row.frac_floor:.0%} of the "
                  f"floor, compile {row.compile_s} s {row.error or ''}", flush=True)
    gen.COORDINATE_DESCENT = default
    save()
    print(speed.markdown(meta, rows, bw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
