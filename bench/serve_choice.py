"""What choosing the tokens costs the serving engine per decode step, beside the model's step:
the argmax, the sampler, logprobs and the logit adjustments (penalties, logit_bias, min_tokens),
over `[slots, vocab]` logits, with the engine's own functions (no model).

    python bench/serve_choice.py --slots 1,8 --vocab 49152 --out bench/results/serve/choice-cpu

Each row is the median of `--iters` timed calls after warm-up (a CUDA device synchronizes around
each call); every slot holds a request that asks for the row's feature. The sampler runs as the
engine runs it, with the `candidates` hint its rows' settings give. `--baseline-penalties FILE`
and `--baseline-sampling FILE` time other versions of flexkv/serve/penalties.py and
flexkv/serve/sampling.py (e.g. from `git show REV:flexkv/serve/sampling.py`) the same way, as
`old ...` rows (an old sampler without the hint is called without it).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stamp import commit_id, write_results  # noqa: E402
from flexkv.serve.engine import logprob_entries  # noqa: E402
from flexkv.serve.penalties import SlotAdjustments  # noqa: E402
from flexkv.serve.request import SamplingParams  # noqa: E402
from flexkv.serve.sampling import cut_hint, sample_slots  # noqa: E402

ALL = SamplingParams(max_tokens=64, presence_penalty=0.5, frequency_penalty=0.5,
                     repetition_penalty=1.2, logit_bias={1: 2.0, 5: -100.0}, min_tokens=10)


def timed(fn, iters: int, device) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def adjust_case(cls, S, V, device, prompt_len):
    adj = cls(S, V, device)
    for s in range(S):
        adj.admit(s, ALL, list(range(prompt_len)), {0, 2})

    def run(logits):
        nxt = adj.choose_logits(logits).argmax(-1)
        adj.record(nxt)
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", default="1,8")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--prompt-len", type=int, default=2000, help="prompt ids seen by the repetition penalty")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline-penalties", type=Path, help="another penalties.py, as `old adjust`")
    ap.add_argument("--baseline-sampling", type=Path, help="another sampling.py, as `old sampler`")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve/choice-cpu"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device, V = torch.device(a.device), a.vocab
    def load(path, name):
        if path is None:
            return None
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    old = load(a.baseline_penalties, "penalties_baseline")
    old_sampling = load(a.baseline_sampling, "sampling_baseline")
    settings = {"temperature only": (1.0, 0, 1.0), "top-k 50 + top-p 0.9": (0.8, 50, 0.9),
                "top-p 0.9 alone": (0.8, 0, 0.9)}
    rows = []
    for S in [int(x) for x in a.slots.split(",")]:
        logits = torch.randn(S, V, device=device)
        i64 = lambda v: torch.full((S,), v, dtype=torch.long, device=device)  # noqa: E731
        f32 = lambda v: torch.full((S,), v, dtype=torch.float32, device=device)  # noqa: E731
        ks, chosen = [5] * S, logits.argmax(-1)
        cases = {"argmax (greedy)": lambda: logits.argmax(-1)}
        for label, (t, k, p) in settings.items():
            hint = cut_hint([SamplingParams(top_k=k, top_p=p)] * S)
            args = (logits, f32(t), i64(k), f32(p), i64(1), i64(3))
            cases[f"sampler: {label}"] = lambda args=args, hint=hint: sample_slots(*args, hint=hint)
            if old_sampling is not None:
                cases[f"old sampler: {label}"] = lambda args=args: old_sampling.sample_slots(*args)
        cases["logprobs (top 5, one host read)"] = lambda: logprob_entries(logits, chosen, ks)
        run = adjust_case(SlotAdjustments, S, V, device, a.prompt_len)
        cases["adjust (all five) + argmax"] = lambda: run(logits)
        if old is not None:
            run_old = adjust_case(old.SlotAdjustments, S, V, device, a.prompt_len)
            cases["old adjust (all five) + argmax"] = lambda: run_old(logits)
        for name, fn in cases.items():
            rows.append({"slots": S, "case": name, "ms": timed(fn, a.iters, device)})
    res = {"device": str(device), "vocab": V, "threads": a.threads, "torch": torch.__version__,
           "commit": commit_id(("flexkv", "bench")),
           "baselines": [str(x) for x in (a.baseline_penalties, a.baseline_sampling) if x],
           "command": "python bench/serve_choice.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    md = [f"# Token choice per decode step ({device}, vocab {V}, {a.threads} threads, torch "
          f"{torch.__version__}, {res['commit']})", "", f"`{res['command']}`", "",
          "| slots | case | ms (median) |", "|---|---|---|"]
    md += [f"| {r['slots']} | {r['case']} | {r['ms']:.3f} |" for r in rows]
    write_results(a.out, res, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
