"""Tensor parallelism (flexkv.distributed) on CPU: gloo, 2 ranks started by torchrun.

One torchrun run (`tests/tp_worker.py`, ~25 s of CPU per rank) does every multi-process job at
once; the tests below compare what each rank saw with single-process runs here:

- `full` and every policy (fixed representative parameters, `tp_worker.POLICY_PARAMS`): float64
  tiny random models with 2 KV heads (batch 1, chunked prefill) and 4 KV heads (batch 2, left
  padding); TP=2 greedy tokens equal the single-process tokens, and the kept positions per
  (layer, row, KV head), rank 0's heads then rank 1's, equal the single-process cache's.
- the compiled decode step under TP (tova+vam: the model's all-reduces and a policy collective
  inside the graph): one graph, no graph break, no recompile over 50 steps, tokens and kept
  positions equal to the single-process eager run.
- the serving engine on a TP model: greedy requests equal solo `flexkv.generate`; an unseeded
  sampled request gives the same tokens on both ranks (rank 0's seed).
- bad setups: KV heads that 2 ranks cannot split (ValueError naming the allowed sizes),
  `tp=True` without a process group.
- the CLI: `torchrun --nproc-per-node 2 -m flexkv generate ...` prints rank 0's text once, equal
  to the single-process CLI's.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexkv
from flexkv.distributed import SINGLE, Shard, shard_args
from flexkv.policies.registry import _POLICIES
from helpers import make_checkpoint
from tp_worker import POLICY_PARAMS, make_kwargs, prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny single-process references

HERE = Path(__file__).parent
COMPILED_STEPS = 50


def _torchrun(args: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    return dict(
        kv2=make_checkpoint(d / "kv2", "llama", seed=0),  # helpers.TINY: 4 heads, 2 KV heads
        kv4=make_checkpoint(d / "kv4", "llama", seed=1, num_attention_heads=8,  # vocab-parallel
                            num_key_value_heads=4, head_dim=8, vocab_size=102),
        kv3=make_checkpoint(d / "kv3", "llama", seed=2, hidden_size=48, num_attention_heads=6,
                            num_key_value_heads=3, head_dim=8),
        mistral=make_checkpoint(d / "mistral", "mistral", seed=3, sliding_window=8),
    )


def _jobs(ckpts) -> list[dict]:
    cases = list(POLICY_PARAMS)
    return [
        dict(name="kv2", kind="eager", ckpt=str(ckpts["kv2"]), cases=cases, vocab=101, batch=1,
             prompt_len=40, new=8, seed=0, chunk=16),
        dict(name="kv4", kind="eager", ckpt=str(ckpts["kv4"]), cases=cases, vocab=101, batch=2,
             prompt_len=40, new=8, seed=1, pad=5),
        dict(name="mistral", kind="eager", ckpt=str(ckpts["mistral"]), cases=["full", "tova"],
             vocab=101, batch=1, prompt_len=24, new=6, seed=2),
        dict(name="compiled", kind="compiled", ckpt=str(ckpts["kv4"]), case="tova+vam",
             vocab=101, batch=1, prompt_len=20, new=COMPILED_STEPS + 1, seed=3),
        dict(name="engine", kind="engine", ckpt=str(ckpts["kv2"]), case="tova", vocab=101,
             batch=1, prompt_len=30, new=6, seed=4),
        dict(name="follow", kind="follow", ckpt=str(ckpts["kv2"]), case="h2o", vocab=101,
             batch=1, prompt_len=30, new=6, seed=5),
        dict(name="bad", kind="error", ckpt=str(ckpts["kv3"])),
    ]


@pytest.fixture(scope="module")
def tp_run(ckpts, tmp_path_factory):
    """Both ranks' results of one torchrun over every job."""
    d = tmp_path_factory.mktemp("tp-run")
    jobs = _jobs(ckpts)
    (d / "spec.json").write_text(json.dumps(jobs))
    r = _torchrun([str(HERE / "tp_worker.py"), str(d / "spec.json"), str(d)])
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    ranks = [torch.load(d / f"rank{i}.pt") for i in range(2)]
    return {j["name"]: j for j in jobs}, ranks


def pos_sets(pos: list[torch.Tensor]):
    """Per layer, row, KV head: the set of kept positions."""
    return [[[frozenset(p for p in lp[b, h].tolist() if p >= 0) for h in range(lp.shape[1])]
             for b in range(lp.shape[0])] for lp in pos]


def gathered(ranks, job: str, case: str | None = None) -> list[torch.Tensor]:
    """Kept positions of all KV heads: rank 0's heads then rank 1's (global head order)."""
    parts = [r[job] if case is None else r[job][case] for r in ranks]
    return [torch.cat(layer, dim=1) for layer in zip(*(p["pos"] for p in parts))]


@functools.lru_cache(maxsize=None)
def _model64(path: str):
    return flexkv.load_model(path, dtype=torch.float64, tokenizer=False)[0]


def single(job: dict, case: str, **over):
    """The single-process run of `case` in `job` (same prompt, same parameters)."""
    model = _model64(job["ckpt"])
    ids, mask = prompt(job)
    name, kw = make_kwargs(case)
    args = dict(max_new_tokens=job["new"], policy=name, attention_mask=mask,
                prefill_chunk=job.get("chunk"), **kw)
    args.update(over)
    return model, flexkv.generate(model, ids, **args)


# ----------------------------------------------------------------------------- equivalence
def test_every_policy_has_a_case():
    bases = {c.split("-")[0].split("+")[0] for c in POLICY_PARAMS}
    assert set(_POLICIES) <= bases, f"add TP cases for {sorted(set(_POLICIES) - bases)}"


@pytest.mark.parametrize("job", ["kv2", "kv4", "mistral"])
def test_tp_equals_single_process(tp_run, job):
    jobs, ranks = tp_run
    spec = jobs[job]
    assert ranks[0]["world"] == 2 and ranks[0]["backend"] == "gloo"
    n_kv = {"kv2": 2, "kv4": 4, "mistral": 2}[job]
    assert ranks[0][job]["full"]["pos"][0].shape[1] == n_kv // 2  # each rank: its KV heads only
    # kv4's vocabulary (102) splits over 2 ranks: half the embedding and head rows on each; the
    # others' (101) does not: replicated
    rows = 51 if job == "kv4" else 101
    assert all(r[f"{job}_head_rows"] == (rows, rows) for r in ranks)
    bad = []
    for case in spec["cases"]:
        _, ref = single(spec, case)
        for r in ranks:
            if not torch.equal(r[job][case]["tokens"], ref.tokens):
                bad.append(f"{case}: tokens {r[job][case]['tokens'].tolist()} != "
                           f"{ref.tokens.tolist()}")
        if pos_sets(gathered(ranks, job, case)) != pos_sets([lc.pos for lc in ref.cache.layers]):
            bad.append(f"{case}: kept positions differ")
    assert not bad, "\n".join(bad)


def test_tp_compiled_decode_one_graph(tp_run):
    jobs, ranks = tp_run
    spec = jobs["compiled"]
    _, ref = single(spec, spec["case"])
    for i, r in enumerate(ranks):
        c = r["compiled"]
        assert c["graph_breaks"] == {}, f"rank {i}: graph breaks {c['graph_breaks']}"
        assert c["graphs_after_warmup"] == 1 and c["graphs"] == 1, \
            f"rank {i}: {c['graphs']} compiled graphs (recompiled)"
        assert c["tokens"].shape[1] == spec["prompt_len"] + COMPILED_STEPS + 1
        assert torch.equal(c["tokens"], ref.tokens), f"rank {i}: compiled TP tokens differ"
    assert pos_sets(gathered(ranks, "compiled")) == pos_sets([lc.pos for lc in ref.cache.layers])


def test_tp_serving_engine(tp_run):
    jobs, ranks = tp_run
    spec = jobs["engine"]
    e0, e1 = ranks[0]["engine"], ranks[1]["engine"]
    assert e0["tokens"] == e1["tokens"]  # the sampled, unseeded request too (rank 0's seed)
    model = _model64(spec["ckpt"])
    name, kw = make_kwargs(spec["case"])
    for p, got, n in zip(e0["prompts"][:2], e0["tokens"][:2], (spec["new"], spec["new"] - 2)):
        solo = flexkv.generate(model, torch.tensor([p]), max_new_tokens=n, policy=name,
                               prefill_chunk=16, **kw)
        assert got == solo.tokens[0, len(p):].tolist()


def test_tp_engine_follows_rank0(tp_run):
    """Requests reach rank 0 only; rank 1 runs Engine.follow() on rank 0's plans."""
    jobs, ranks = tp_run
    spec = jobs["follow"]
    f0, f1 = ranks[0]["follow"], ranks[1]["follow"]
    assert f0["cancelled"] == "cancelled"
    # the follower ran the same steps: same tokens delivered, same decode steps, same admissions
    for k in ("tokens_generated_total", "decode_steps_total", "prefill_chunks_total",
              "requests_finished_total"):
        assert f1["metrics"][k] == f0["metrics"][k], k
    assert f1["metrics"]["slots_used"] == 0 == f0["metrics"]["slots_used"]
    model = _model64(spec["ckpt"])
    name, kw = make_kwargs(spec["case"])
    for p, got, n in zip(f0["prompts"], f0["tokens"], f0["max_tokens"]):
        solo = flexkv.generate(model, torch.tensor([p]), max_new_tokens=n, policy=name,
                               prefill_chunk=16, **kw)
        assert got == solo.tokens[0, len(p):].tolist()


# ----------------------------------------------------------------------------- bad setups
def test_kv_heads_not_divisible(tp_run):
    msg = tp_run[1][0]["bad"]
    assert msg is not None and "num_key_value_heads=3" in msg and "[1]" in msg, msg


def test_tp_without_process_group(ckpts):
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="process group"):
        flexkv.load_model(ckpts["kv2"], tp=True)


def test_shard_args_and_single_rank_helpers(ckpts):
    from flexkv.models.llama import ModelArgs

    args = ModelArgs(hidden_size=64, intermediate_size=96, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=8)
    local = shard_args(args, Shard(rank=1, world=2, group="g"))
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size,
            local.head_dim, local.hidden_size) == (4, 2, 48, 8, 64)
    assert (local.vocab_size, local.vocab_shards) == (args.vocab_size, 2)   # 32000 splits
    odd = shard_args(ModelArgs(vocab_size=101, hidden_size=64, intermediate_size=96,
                               num_attention_heads=8, num_key_value_heads=4),
                     Shard(rank=0, world=2, group="g"))
    assert odd.vocab_shards == 1                                           # replicated
    with pytest.raises(ValueError, match=r"allowed tensor-parallel sizes .*\[1, 2, 4\]"):
        shard_args(args, Shard(rank=0, world=3, group="g"))
    x = torch.randn(2, 3, 5)
    assert SINGLE.all_reduce(x) is x and SINGLE.gather_heads(x) is x
    assert SINGLE.local_heads(x) is x and SINGLE.broadcast(x) is x
    assert torch.equal(SINGLE.sum_heads(x), x.sum(1, keepdim=True))


# ----------------------------------------------------------------------------- CLI
def _cli_checkpoint(path: Path) -> Path:
    """A tiny llama with 4 KV heads and the byte tokenizer (helpers), saved at `path`."""
    from helpers import BYTE_VOCAB, byte_tokenizer

    tok = byte_tokenizer(chat=False)
    d = make_checkpoint(path, "llama", seed=5, vocab_size=BYTE_VOCAB, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=8, max_position_embeddings=256,
                        tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    tok.save_pretrained(str(d))
    return d


def test_torchrun_cli_generate(tmp_path, capsys):
    from flexkv.cli import main

    d = _cli_checkpoint(tmp_path / "m")
    argv = ["generate", "--model", str(d), "--prompt", "hello world, this is a test",
            "--policy", "tova", "--budget", "8", "--max-new-tokens", "12", "--device", "cpu"]
    r = _torchrun(["-m", "flexkv", *argv], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "tensor parallel over 2 ranks" in r.stderr
    assert r.stderr.count("[flexkv] policy tova") == 1  # rank 0 only
    capsys.readouterr()
    assert main(argv) == 0
    assert r.stdout == capsys.readouterr().out and r.stdout.strip()


def test_torchrun_cli_serve(tmp_path):
    """`torchrun --nproc-per-node 2 -m flexkv serve`: rank 0 answers HTTP, rank 1 follows; four
    concurrent requests (one streamed) get the single-process server's answers; Ctrl-C stops
    both ranks."""
    import re
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from flexkv.serve import Engine
    from flexkv.serve.api import build_app
    from flexkv.serve.server import BackgroundServer

    d = _cli_checkpoint(tmp_path / "m")
    serve = ["serve", "--model", str(d), "--served-model-name", "tiny", "--policy", "tova",
             "--budget", "8", "--max-slots", "2", "--max-new-tokens", "12", "--prefill-chunk",
             "16", "--device", "cpu", "--port", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "flexkv", *serve], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    url = threading.Event()
    def read():
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"serving tiny at http://127\.0\.0\.1:\d+/v1", line):
                url.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    bodies = [dict(prompt="hello world, this is a test", max_tokens=12, temperature=0),
              dict(prompt="the quick brown fox", max_tokens=7, temperature=0),
              dict(prompt="a", max_tokens=12, stream=True, temperature=0),
              dict(prompt="tensor parallel serving " * 4, max_tokens=10, temperature=0.8,
                   seed=11)]   # seeded sampling: the same tokens in every engine

    def answers(base: str) -> list[str]:
        def one(body):
            with httpx.Client(base_url=base, timeout=120) as c:
                if not body.get("stream"):
                    r = c.post("/v1/completions", json=dict(body, model="tiny"))
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["text"]
                with c.stream("POST", "/v1/completions", json=dict(body, model="tiny")) as r:
                    assert r.status_code == 200
                    data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
                    assert data[-1] == "[DONE]"
                    return "".join(json.loads(x)["choices"][0]["text"] for x in data[:-1])
        with ThreadPoolExecutor(len(bodies)) as ex:
            return list(ex.map(one, bodies))

    try:
        assert url.wait(300), "the server did not start:\n" + "".join(lines)[-6000:]
        base = re.search(r"http://127\.0\.0\.1:\d+", "".join(lines)).group(0)
        tp_text = answers(base)
        with httpx.Client(base_url=base, timeout=60) as c:
            assert c.get("/health").status_code == 200
            metrics = c.get("/metrics").text
        generated = re.search(r'^flexkv_generation_tokens_total\{model="tiny"\} (\d+)', metrics, re.M)
        assert generated and int(generated.group(1)) > 0, metrics
        assert "tensor parallel over 2 ranks" in "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("torchrun did not stop within 60 s of Ctrl-C:\n" + "".join(lines)[-6000:])
    model, tok = flexkv.load_model(d, dtype=torch.float32)
    eng = Engine(model, tok, policy="tova", budget=8, max_slots=2, max_new_tokens=12,
                 prefill_chunk=16, compile=False)
    with BackgroundServer(build_app(eng, "tiny")) as single:
        assert tp_text == answers(single.url)
    assert all(tp_text)


def test_end_rank_flushes_and_exits_with_the_status():
    """`end_rank` (a torchrun rank's end, skipping the interpreter's teardown where torch 2.13's
    gloo aborts now and then) still writes everything buffered and exits with the status."""
    code = ("import sys; from flexkv.distributed import end_rank; "
            "print('out', end=''); print('err', end='', file=sys.stderr); end_rank(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err")
