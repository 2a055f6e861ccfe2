"""One rank of the tensor-parallel test run (tests/test_distributed.py), launched by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py SPEC OUT

SPEC is a JSON file of jobs; each rank writes what it saw to OUT/rank<r>.pt (tokens, the kept
positions of its own KV heads, compile counters, error messages). The test compares them with a
single-process run. Also importable: `POLICY_PARAMS` (fixed, representative parameters for
`full` and every policy) and `make_kwargs` are shared with the test.
"""
from __future__ import annotations

import json
import sys

import torch

# budget 12 of a 40-token prompt (+ 8 new): every policy really compresses, in both models
POLICY_PARAMS = {
    "full": {},
    "streaming": dict(budget=12, n_sink=2),
    "h2o": dict(budget=12, recent=4),
    "tova": dict(budget=12),
    "keydiff": dict(budget=12, window=2),
    "laprox": dict(budget=12, window=4, max_head_factor=1.5, kernel=3),  # layer normalisation
    "laprox-output": dict(budget=12, window=4, normalize="output", score="frobenius", kernel=1),
    "laprox-plain": dict(budget=12, window=4, max_head_factor=4, normalize="none"),
    "weightedkv": dict(budget=12, window=4, n_sink=1, bias="log_mass"),
    "cam": dict(budget=12, n_sink=2, merge_tokens=3, stochastic=True, gate_seed=7,
                bias="log_mass"),
    "snapkv": dict(budget=12, window=4, kernel=3),
    "pyramidkv": dict(budget=12, window=4, kernel=3, beta=2),
    "adakv": dict(budget=12, window=4, kernel=3, alpha=0.2),
    "kvmerger": dict(budget=12, window=4, kernel=3, skip_layers=(0,), bias="log_mass"),
    "h2o+vam": dict(budget=12, recent=4, alpha=0.35),
    "tova+vam": dict(budget=12, alpha=0.35),
    "full+vam": dict(alpha=0.35),
}


def make_kwargs(case: str) -> tuple[str, dict]:
    """(policy name, generate keyword arguments) of a POLICY_PARAMS entry."""
    kw = dict(POLICY_PARAMS[case])
    if "gate_seed" in kw:
        kw["gate_generator"] = torch.Generator().manual_seed(kw.pop("gate_seed"))
    if "skip_layers" in kw:
        kw["skip_layers"] = tuple(kw["skip_layers"])
    return case.split("-")[0], kw


def prompt(job) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(0, job["vocab"], (job["batch"], job["prompt_len"]), generator=g)
    mask = None
    if job.get("pad"):  # left padding: row b starts b * pad tokens late
        mask = torch.ones_like(ids)
        for b in range(ids.shape[0]):
            mask[b, :b * job["pad"]] = 0
    return ids, mask


def kept_positions(cache) -> list[torch.Tensor]:
    return [lc.pos.clone() for lc in cache.layers]


def run_eager(job, res):
    import flexkv

    model, _ = flexkv.load_model(job["ckpt"], dtype=torch.float64, tp=True, tokenizer=False)
    res["local_kv_heads"] = model.args.num_key_value_heads
    res[f"{job['name']}_head_rows"] = (model.lm_head.weight.shape[0],
                                       model.model.embed_tokens.weight.shape[0])
    ids, mask = prompt(job)
    out = {}
    for case in job["cases"]:
        name, kw = make_kwargs(case)
        o = flexkv.generate(model, ids, max_new_tokens=job["new"], policy=name, attention_mask=mask,
                            prefill_chunk=job.get("chunk"), **kw)
        out[case] = dict(tokens=o.tokens, pos=kept_positions(o.cache))
    return out


def run_compiled(job, res):
    import flexkv
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from flexkv.generate import decode_one_token

    model, _ = flexkv.load_model(job["ckpt"], dtype=torch.float64, tp=True, tokenizer=False)
    ids, _ = prompt(job)
    name, kw = make_kwargs(job["case"])
    counters.clear()
    warm = flexkv.generate(model, ids, max_new_tokens=3, policy=name, compile=True, **kw)
    graphs = len(_debug_get_cache_entry_list(decode_one_token.__code__))
    o = flexkv.generate(model, ids, max_new_tokens=job["new"], policy=name, compile=True, **kw)
    return dict(tokens=o.tokens, pos=kept_positions(o.cache), warm_tokens=warm.tokens,
                graphs_after_warmup=graphs,
                graphs=len(_debug_get_cache_entry_list(decode_one_token.__code__)),
                graph_breaks=dict(counters["graph_break"]))


def run_engine(job, res):
    import flexkv
    from flexkv.serve import Engine, SamplingParams

    model, _ = flexkv.load_model(job["ckpt"], dtype=torch.float64, tp=True, tokenizer=False)
    name, kw = make_kwargs(job["case"])
    eng = Engine(model, None, policy=name, max_slots=2, max_new_tokens=job["new"],
                 max_prompt_tokens=job["prompt_len"], prefill_chunk=16, **kw)
    ids, _ = prompt(job)
    prompts = [ids[0].tolist(), ids[0, :25].tolist(), ids[0, 5:].tolist()]
    params = [SamplingParams(max_tokens=job["new"]), SamplingParams(max_tokens=job["new"] - 2),
              SamplingParams(max_tokens=job["new"], temperature=1.0, top_p=0.9)]  # unseeded
    return dict(prompts=prompts, tokens=eng.generate(prompts, params))


def run_follow(job, res):
    """Rank 0 alone receives requests (a background scheduler, as a server runs it: staggered
    submissions, one cancellation); the other ranks run `Engine.follow()` until rank 0's
    shutdown."""
    import torch.distributed as dist

    import flexkv
    from flexkv.serve import Engine, SamplingParams

    model, _ = flexkv.load_model(job["ckpt"], dtype=torch.float64, tp=True, tokenizer=False)
    name, kw = make_kwargs(job["case"])
    eng = Engine(model, None, policy=name, max_slots=2, max_new_tokens=job["new"],
                 max_prompt_tokens=job["prompt_len"], prefill_chunk=16, **kw)
    if dist.get_rank() != 0:
        eng.follow()
        return dict(metrics=eng.metrics())
    ids, _ = prompt(job)
    prompts = [ids[0].tolist(), ids[0, :25].tolist(), ids[0, 5:].tolist()]
    new = job["new"]
    eng.start()
    first = [eng.submit(prompts[0], SamplingParams(max_tokens=new)),
             eng.submit(prompts[1], SamplingParams(max_tokens=new - 2))]
    first[0].result(timeout=300)
    gone = eng.submit(prompts[1], SamplingParams(max_tokens=new))
    gone.cancel()
    last = eng.submit(prompts[2], SamplingParams(max_tokens=new))
    tokens = [h.result(timeout=300) for h in (*first, last)]
    gone.result(timeout=300)
    eng.shutdown()
    return dict(prompts=prompts, max_tokens=[new, new - 2, new], tokens=tokens,
                cancelled=gone.finish_reason, metrics=eng.metrics())


def run_error(job, res):
    import flexkv

    try:
        flexkv.load_model(job["ckpt"], tp=True, tokenizer=False)
    except ValueError as e:
        return str(e)
    return None


RUNNERS = {"eager": run_eager, "compiled": run_compiled, "engine": run_engine,
           "follow": run_follow, "error": run_error}


def main(spec_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from flexkv.distributed import end_rank, init_from_env

    torch.set_num_threads(1)
    assert init_from_env("cpu"), "run me under torchrun with --nproc-per-node >= 2"
    rank = dist.get_rank()
    res = {"world": dist.get_world_size(), "backend": dist.get_backend()}
    for job in json.loads(open(spec_path).read()):
        with torch.no_grad():
            res[job["name"]] = RUNNERS[job["kind"]](job, res)
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
