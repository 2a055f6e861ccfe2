"""The GPU session's driver: tests, decode-probability candidates and speed presets, each a stage
that fits one device call. `bash bench/gpu.sh OUT [stage...]` sets up the machine and runs

    python3 bench/gpu_run.py run OUT [stage...]      # stages: see STAGES; default: tests

Every stage runs in a subprocess with a time limit (its own, and what is left of the call's
`FLEXKV_GPU_BUDGET_S`, default 570 s, counted from `FLEXKV_GPU_T0`); its output goes to
OUT/run.log. OUT receives files at its top level only (the device tool returns 8 per call):
summary.md (environment, stage table, test failures, the candidates table, the speed tables;
rewritten after every stage and printed at the end), run.log, tests.xml (JUnit),
decode-candidates.json, gemv.json (bench/gemv.py), one <preset>.json per speed stage,
serve-gpu.{json,md} (serve stage).
No call fits more stages than leave 8 files.

Back on the CPU machine, the speed JSONs go into the repository:

    python bench/gpu_run.py merge bench/results/gpu/gpu-8b-4k.json bench/results/gpu/gpu-8b-32k.json

merges presets into one bench/results/speed/<gpu>.{json,md}, <gpu> from the presets' device
(h200 on the H200 machine; rows each stamped with its preset's device, torch and commit).
A stage may carry its own limit, `tests:240`, below its default (STAGES), so that a 15-minute
lease's calls share their time as bench/GPU.md plans. `FLEXKV_GPU_DRYRUN=1` swaps every stage
for a tiny CPU version (the tests on CPU for two policies, the candidates at toy sizes, the tiny
speed preset): a rehearsal of the whole pipeline on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DRY = os.environ.get("FLEXKV_GPU_DRYRUN") == "1"
T0 = float(os.environ.get("FLEXKV_GPU_T0") or time.time())
BUDGET = float(os.environ.get("FLEXKV_GPU_BUDGET_S") or 570)
SPEED_TMP = Path("/tmp/flexkv-speed")
# kept on the machine between device calls (a machine stays warm 30 s after a call): the
# candidates' result, so that a speed stage in the next call uses the fastest path without
# FLEXKV_DECODE_PROBS having to be read off the summary and typed in
STATE = Path(os.environ.get("FLEXKV_GPU_STATE") or "/tmp/flexkv-gpu-state")
# what an earlier lease measured and committed (bench/GPU.md: every call's files are committed
# under bench/results/gpu/), read when neither this call nor this machine has a candidates result
COMMITTED = ROOT / "bench" / "results" / "gpu" / "decode-candidates.json"
# written when the gemv stage's coordinate-descent-tuned compile failed where cuBLAS's ran: the
# stages after it compile without the tuning (`tuning_failed`, `coordinate_descent_for`)
TUNING_OFF = STATE / "coordinate-descent-failed"


def remaining() -> float:
    return BUDGET - (time.time() - T0)


# ------------------------------------------------------------------------------------ stages
def _pytest_cmd(out: Path, limit: float) -> tuple[list[str], dict]:
    env = {}
    cmd = [PY, "-m", "pytest", "-q", "-rfE", "tests/test_cuda.py",
           "tests/test_attention.py::test_triton_decode_kernel",
           f"--junitxml={out / 'tests.xml'}", "-o", "junit_family=xunit1"]
    # tests not started 75 s before the limit are skipped (tests/conftest.py), so pytest ends
    # on its own and writes tests.xml rather than being killed without a report
    env["FLEXKV_TEST_DEADLINE"] = f"{time.time() + limit - 75:.0f}"
    if DRY:
        env.update(FLEXKV_CUDA_TESTS_ON_CPU="1", FLEXKV_CUDA_TESTS_POLICIES="h2o,full+vam")
    else:
        try:
            import xdist  # noqa: F401
            # the per-policy compiles run side by side, on every core (H200 machine: 16)
            workers = max(2, min(8, (os.cpu_count() or 8) // 2))
            cmd += ["-n", str(workers), "--dist", "load"]
            env["TORCHINDUCTOR_COMPILE_THREADS"] = "2"
        except ImportError:
            pass
    return cmd, env


def _speed_cmd(preset: str):
    def make(out: Path, limit: float) -> tuple[list[str], dict]:
        p = "tiny" if DRY else preset
        # no cell starts that would end after limit - 40 s (room for the copy and the summary)
        # FLEXKV_NO_PROFILE=1: no per-kernel breakdown (should the profiler fail on the machine)
        no_profile = ["--no-profile"] if os.environ.get("FLEXKV_NO_PROFILE") == "1" else []
        return [PY, "bench/speed.py", "--preset", p, "--out", str(SPEED_TMP),
                "--time-budget", f"{max(60.0, limit - 40):.0f}", *no_profile], {}
    return make


def _candidates_cmd(out: Path, limit: float) -> tuple[list[str], dict]:
    return [PY, str(Path(__file__)), "_candidates", str(out), "--deadline-s",
            f"{max(30.0, limit - 20):.0f}"] + (["--quick"] if DRY else []), {}


def _gemv_cmd(out: Path, limit: float) -> tuple[list[str], dict]:
    """The decode step's batch-1 projections as tuned inductor reductions (flexkv's CUDA
    default) against cuBLAS, on a 4-layer model of the 8B's shapes: bench/gemv.py."""
    return [PY, "bench/gemv.py", "--out", str(out), "--deadline-s",
            f"{max(30.0, limit - 20):.0f}"] + (["--quick", "--batches", "1"] if DRY else []), {}


KIT_MODEL = ROOT / ".gpu-kit" / "smollm2-135m-instruct"  # bench/gpu_kit.sh; carried


def _serve_cmd(out: Path, limit: float) -> tuple[list[str], dict]:
    """Issue 10's GPU row: the server at equal KV memory, `full` then budget 256 and 512, the
    default model's shape with random weights (the checkpoint cannot be carried), 1K-4K prompts
    in steps of 1K (four prompt shapes to compile, not seven), prefill chunks of 2048 (the preset's:
    an eager CUDA prefill chunk costs about the same host time at 1K as at 2K tokens, so fewer
    chunks per prompt, bench/NOTES.md), 128 tokens each, arrivals at 100 req/s (above every
    configuration's capacity: the table's `engine busy` checks it). Every
    configuration's table row is written as soon as it ends; no sequential row (a compiled
    `generate` of `full` recompiles for every prompt length). The servers compile their prefill
    chunks too (`compile_prefill`: an eager chunk is host-bound there, bench/NOTES.md session 9)
    unless FLEXKV_SERVE_COMPILE_PREFILL=0."""
    if DRY:
        sizes = ["--preset", "cpu", "--requests", "3", "--prompt-min", "48", "--prompt-max", "96",
                 "--max-tokens", "4", "--rate", "0", "--time-limit", "120", "--budgets", "32",
                 "--policies", "h2o"]
    else:
        sizes = ["--preset", "gpu", "--requests", "96", "--prompt-step", "1024", "--time-limit",
                 "60", "--policies", "h2o,streaming", "--budgets", "256,512"]
    if os.environ.get("FLEXKV_SERVE_COMPILE_PREFILL") != "0":
        sizes.append("--compile-prefill")
    return [PY, "bench/serve.py", *sizes, "--model", str(KIT_MODEL), "--random-weights",
            "--sequential", "none", "--out", str(out), "--name", "serve-gpu"], {}


def _choice_cmd(out: Path, limit: float) -> tuple[list[str], dict]:
    """The serving engine's token choice beside the model (argmax, sampler, logprobs, logit
    adjustments) at Llama-3's vocabulary, 1 to 64 slots: bench/serve_choice.py, seconds."""
    sizes = (["--slots", "1,8", "--vocab", "4096", "--iters", "5", "--device", "cpu"] if DRY
             else ["--slots", "1,8,64", "--vocab", "128256", "--iters", "50", "--device", "cuda"])
    return [PY, "bench/serve_choice.py", *sizes, "--out", str(out / "choice-gpu")], {}


STAGES = {
    "tests": dict(make=_pytest_cmd, limit=480, file="tests.xml"),
    "choice": dict(make=_choice_cmd, limit=120, file="choice-gpu.json"),
    "decode-candidates": dict(make=_candidates_cmd, limit=360, file="decode-candidates.json"),
    "gemv": dict(make=_gemv_cmd, limit=300, file="gemv.json"),
    "speed-4k": dict(make=_speed_cmd("gpu-8b-4k"), limit=570, preset="gpu-8b-4k",
                     probs_at=["S=4097 B=1"]),
    "speed-32k": dict(make=_speed_cmd("gpu-8b-32k"), limit=570, preset="gpu-8b-32k",
                      probs_at=["S=32769 B=1", "S=4097 B=1"]),
    "speed-b8": dict(make=_speed_cmd("gpu-8b-b8"), limit=570, preset="gpu-8b-b8",
                     probs_at=["S=4097 B=8", "S=4097 B=1"]),
    "serve": dict(make=_serve_cmd, limit=570, file="serve-gpu.json"),
}


def decode_probs_for(keys: list[str], out: Path) -> tuple[str | None, str]:
    """The DECODE_PROBS path a speed stage runs with, and why: FLEXKV_DECODE_PROBS when set, else
    the fastest path that decode-candidates measured at the first of `keys` it has (this call's
    OUT, else the copy an earlier call on this machine left in STATE, else the result an earlier
    lease committed, COMMITTED), else flexkv's default."""
    if os.environ.get("FLEXKV_DECODE_PROBS"):
        return None, f"{os.environ['FLEXKV_DECODE_PROBS']} (FLEXKV_DECODE_PROBS)"
    for src in (out / "decode-candidates.json", STATE / "decode-candidates.json", COMMITTED):
        try:
            fastest = json.loads(src.read_text()).get("fastest", {})
        except (OSError, ValueError):
            continue
        for key in keys:
            if key in fastest:
                return fastest[key], f"{fastest[key]} (fastest in decode-candidates at {key})"
    return None, "flexkv's default (no FLEXKV_DECODE_PROBS, no decode-candidates result)"


def _gemv_failure(row: dict) -> str | None:
    """Why a gemv row did not give a usable number: its error, or values that differ from the
    eager step's (`speed.eager_check`); None for a good row."""
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import CHECK_MIN_COS
    if row.get("error"):
        return row["error"]
    check = row.get("eager_check") or {}
    if "error" in check:
        return f"eager check: {check['error']}"
    if check.get("min_cos", 1.0) < CHECK_MIN_COS:
        return f"values: cosine {check['min_cos']:.4f} against the eager step"
    return None


def tuning_failed(out: Path) -> str | None:
    """After the gemv stage: why its coordinate-descent-tuned rows failed (an error, or values
    unlike the eager step's) when every one did while a row without the tuning was good (then
    the later stages, in this call and in later calls on this machine, compile without it rather
    than lose every cell), else None."""
    try:
        rows = json.loads((out / "gemv.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    tuned = [r for r in rows if r["impl"].endswith("(reductions)")
             and not (r.get("error") or "").startswith("skipped")]
    plain_good = any(r["impl"].endswith("(cuBLAS)") and not _gemv_failure(r) for r in rows)
    why = [_gemv_failure(r) for r in tuned]
    if tuned and plain_good and all(why):
        return why[0]
    return None


def coordinate_descent_for(name: str, env: dict) -> str:
    """Whether stage `name` compiles with coordinate-descent tuning, and why; sets
    FLEXKV_COORDINATE_DESCENT=0 in `env` where the gemv stage found the tuned compile failing
    (not for the tests: they check flexkv's default, and their failures say why it fails)."""
    if name == "gemv":
        return "on and off (the stage compares them)"
    if os.environ.get("FLEXKV_COORDINATE_DESCENT") == "0":
        return "off (FLEXKV_COORDINATE_DESCENT=0)"
    if TUNING_OFF.exists() and name != "tests":
        env["FLEXKV_COORDINATE_DESCENT"] = "0"
        return f"off: the gemv stage's tuned compile failed ({TUNING_OFF.read_text()[:100]})"
    return "on"


def parse_stage(arg: str) -> tuple[str, float | None]:
    """`name` or `name:seconds` (a limit below the stage's own, e.g. `tests:240`, so that the
    stages after it in the same call keep their time)."""
    name, _, secs = arg.partition(":")
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)} or all")
    if not secs:
        return name, None
    try:
        limit = float(secs)
    except ValueError:
        limit = -1.0
    if not 45 <= limit <= STAGES[name]["limit"]:
        raise ValueError(f"stage limit in {arg!r} must be seconds in [45, {STAGES[name]['limit']}]")
    return name, limit


def run_stage(name: str, out: Path, log: Path, own_limit: float | None = None) -> dict:
    spec = STAGES[name]
    left = remaining() - 15
    res = dict(stage=name, status="", seconds=0.0)
    if left < 45:
        res["status"] = f"not started: {left + 15:.0f} s left of the call's budget"
        return res
    limit = own_limit or spec["limit"]
    limit = min(limit * (6 if DRY else 1), left)  # a CPU rehearsal compiles slower
    cmd, extra_env = spec["make"](out, limit)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
    res["coordinate_descent"] = coordinate_descent_for(name, env)
    if "probs_at" in spec:
        keys = spec["probs_at"] + (["S=65 B=1"] if DRY else [])  # the --quick candidates' size
        path, res["decode_probs"] = decode_probs_for(keys, out)
        if path:
            env["FLEXKV_DECODE_PROBS"] = path
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n===== stage {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            res["status"] = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            res["status"] = f"killed at its {limit:.0f} s limit"
        f.write(f"===== stage {name}: {res['status']} after {time.time() - t:.0f} s\n")
    res["seconds"] = round(time.time() - t, 1)
    preset = spec.get("preset")
    if preset:
        src = SPEED_TMP / f"{'tiny' if DRY else preset}.json"
        if src.exists():
            shutil.copy(src, out / f"{preset}.json")
            res["file"] = f"{preset}.json"
    elif (out / spec["file"]).exists():
        res["file"] = spec["file"]
        if name == "decode-candidates":
            STATE.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / spec["file"], STATE / spec["file"])
        if name == "gemv" and (error := tuning_failed(out)):
            STATE.mkdir(parents=True, exist_ok=True)
            TUNING_OFF.write_text(error)
    return res


# ------------------------------------------------------------------------------------ summary
def environment() -> dict:
    import torch
    env = dict(python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, commit=os.environ.get("FLEXKV_COMMIT", "unknown"),
               host=platform.node(), dryrun=DRY)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2**30, 1))
    else:
        env["device"] = "cpu"
    for mod in ("triton", "transformers", "hypothesis", "pytest", "xdist"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:
        from flexkv import attention
        env["decode_probs_default"] = attention.DECODE_PROBS
    except Exception as e:  # noqa: BLE001
        env["flexkv_import_error"] = repr(e)
    return env


def junit_summary(path: Path) -> tuple[str, list[str]]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return f"no JUnit report ({e})", []
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                               "skipped")}
    fails, late = [], []
    for case in root.iter("testcase"):
        skip = case.find("skipped")
        if skip is not None and "time ran out" in (skip.get("message") or ""):
            late.append(case.get("name"))
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or "").strip().splitlines()
                fails.append(f"{kind}: {case.get('classname')}::{case.get('name')}: "
                             f"{msg[0][:300] if msg else ''}")
    head = (f"{n['tests']} tests: {n['tests'] - n['failures'] - n['errors'] - n['skipped']} "
            f"passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
    if late:  # the deadline's skips: what a later call must still run
        head += f" ({len(late)} not run, out of time: {', '.join(late[:12])}" + \
            (", ..." if len(late) > 12 else "") + ")"
    return head, fails


def speed_md(path: Path) -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    import speed as sp
    data = json.loads(path.read_text())
    rows = [sp.Row(**r) for r in data["rows"]]
    return sp.markdown(data["meta"], rows, data["meta"]["bandwidth_gb_s"] * 1e9)


def values_line(path: Path) -> str:
    """One line on a speed stage's compiled cells' values against the eager step
    (`speed.eager_check`), first in the stage's summary so a flagged cell is not missed."""
    sys.path.insert(0, str(ROOT / "bench"))
    import speed as sp
    checks = [(r["policy"], r["prompt"], r["batch"], r.get("eager_check"))
              for r in json.loads(path.read_text())["rows"] if r.get("eager_check") is not None]
    if not checks:
        return "Values against the eager step: no compiled cell checked."
    failed = [f"{p} T={t} B={b} ({c['error']})" for p, t, b, c in checks if "error" in c]
    low = [f"{p} T={t} B={b} (cosine {c['min_cos']:.4f}, top-1 {c['top1']:.2f})"
           for p, t, b, c in checks if "error" not in c and c["min_cos"] < sp.CHECK_MIN_COS]
    ok = [c["min_cos"] for *_, c in checks if "error" not in c]
    text = (f"Values against the eager step ({len(checks)} compiled cells, first "
            f"{sp.CHECK_STEPS} logits): ")
    if low or failed:
        return text + "**FLAGGED** " + "; ".join(low + failed) + \
            " (bench/GPU.md: a cosine below 0.99 means a wrong cache; do not quote that row)."
    return text + f"every cosine >= {sp.CHECK_MIN_COS} (lowest {min(ok):.5f})."


def candidates_md(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [f"copy bandwidth {data['bandwidth_gb_s']:.0f} GB/s; {data['layers']} layers per "
             f"step, Hkv {data['n_kv']}, G {data['group']}, D {data['head_dim']}, "
             f"{data['dtype']}\n",
             "| slots | batch | path | us/step | us/layer | GB/s | frac floor | compile s | "
             "max err vs explicit | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        lines.append(f"| {r['slots']} | {r['batch']} | {r['path']} | {f('us_step', '.1f')} | "
                     f"{f('us_layer', '.1f')} | {f('gb_s', '.0f')} | {f('frac_floor', '.2f')} | "
                     f"{f('compile_s', '.1f')} | {f('max_err', '.2g')} | {r.get('error') or ''} |")
    for key, best in data.get("fastest", {}).items():
        lines.append(f"\nfastest with probabilities at {key}: **{best}**")
    return "\n".join(lines) + "\n"


def stage_table(results: list[dict]) -> list[str]:
    return (["| stage | status | seconds | file | decode probabilities | coordinate-descent tuning |",
             "|---|---|---|---|---|---|"]
            + [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r.get('file', '-')} | "
               f"{r.get('decode_probs', '-')} | {r.get('coordinate_descent', '-')} |"
               for r in results])


def write_summary(out: Path, env: dict, results: list[dict]) -> str:
    parts = ["# flexkv GPU run\n",
             "`" + " ".join(f"{k}={v}" for k, v in env.items()) + "`\n"] + stage_table(results)
    for r in results:
        name = r["stage"]
        try:
            if name == "tests" and (out / "tests.xml").exists():
                head, fails = junit_summary(out / "tests.xml")
                parts += ["\n## tests\n", head] + [f"- {x}" for x in fails]
            elif name == "decode-candidates" and (out / "decode-candidates.json").exists():
                parts += ["\n## decode-candidates\n", candidates_md(out / "decode-candidates.json")]
            elif r.get("file", "").endswith(".json") and (name.startswith("speed")
                                                          or name == "gemv"):
                parts += [f"\n## {name}\n", values_line(out / r["file"]) + "\n",
                          speed_md(out / r["file"])]
            elif name == "serve" and (out / "serve-gpu.md").exists():
                parts += ["\n## serve\n", (out / "serve-gpu.md").read_text()]
        except Exception as e:  # noqa: BLE001 - the summary must always be written
            parts.append(f"\n({name}: could not summarise: {e!r})")
    text = "\n".join(parts) + "\n"
    (out / "summary.md").write_text(text)
    return text


def cmd_run(args) -> int:
    stages = args.stages or ["tests"]
    if stages == ["all"]:
        stages = list(STAGES)
    try:
        stages = [parse_stage(s) for s in stages]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    results = []
    write_summary(out, env, results)
    for name, own_limit in stages:
        print(f"[gpu_run] {name} ... ({remaining():.0f} s left of the call)", flush=True)
        res = run_stage(name, out, out / "run.log", own_limit)
        results.append(res)
        print(f"[gpu_run] {name}: {res['status']} in {res['seconds']} s", flush=True)
        write_summary(out, env, results)
        if res["status"] not in ("ok",) and res["seconds"]:
            tail = (out / "run.log").read_text(errors="replace").splitlines()[-25:]
            print("\n".join("    " + x for x in tail), flush=True)
    print(write_summary(out, env, results), flush=True)
    # again at the very end: the reply's output_tail keeps the last 12,000 characters only
    print("\n".join(["", "(stages, again)"] + stage_table(results)), flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


# ------------------------------------------------------------------------------------ candidates
def cmd_candidates(args) -> int:
    """Each DECODE_PROBS path (and flex without probabilities, the floor) inside a decode step of
    `layers` attention layers, compiled as flexkv's is (`decode_compile_options`), at the
    Llama-3.1-8B head shape, bf16, each layer with its own K/V (more bytes than L2 holds) and an
    h2o-style score update consuming the probabilities; CUDA-event timing of the graph replays."""
    import torch

    from flexkv import attention

    out = Path(args.out)
    quick = args.quick or not torch.cuda.is_available()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        L, n_kv, G, D, dtype = 2, 2, 4, 16, torch.float32
        grid = [(65, 1)]
    else:
        L, n_kv, G, D, dtype = 8, 8, 4, 128, torch.bfloat16
        grid = [(4097, 1), (32769, 1), (4097, 8)]  # the last only if time is left
    from flexkv.generate import decode_compile_options
    options = decode_compile_options(dev)  # what the decode step compiles with
    sys.path.insert(0, str(ROOT / "bench"))
    import speed as sp
    bw = sp.copy_bandwidth(dev, dtype)
    paths = ["flex (no probs)"] + list(attention.DECODE_PROBS_PATHS)
    rows, fastest = [], {}
    res = dict(bandwidth_gb_s=bw / 1e9, layers=L, n_kv=n_kv, group=G, head_dim=D,
               dtype=str(dtype).replace("torch.", ""), device=str(dev),
               torch=torch.__version__, commit=os.environ.get("FLEXKV_COMMIT", "unknown"),
               rows=rows, fastest=fastest)

    def save():
        (out / "decode-candidates.json").write_text(json.dumps(res, indent=1))

    t_start = time.perf_counter()
    slowest = [0.0]  # the slowest compile so far (the estimate for the next one)

    for S, B in grid:
        g = torch.Generator(device="cpu").manual_seed(S + B)
        mk = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
        K = [mk(B, n_kv, S, D) for _ in range(L)]
        V = [mk(B, n_kv, S, D) for _ in range(L)]
        Q = [mk(B, n_kv * G, 1, D) for _ in range(L)]
        pos = torch.randint(-1, S, (B, n_kv, S), generator=g).to(dev)
        pos[..., 0] = S
        q_pos = torch.full((B, 1), S, device=dev)
        score = [torch.zeros(B, n_kv, S, device=dev) for _ in range(L)]
        for t in K + V + Q + score + [pos, q_pos]:
            torch._dynamo.mark_static_address(t)
        kv_bytes = 2 * L * B * n_kv * S * D * K[0].element_size()
        floor_us = 1e6 * kv_bytes / bw
        ref = None
        for path in paths:
            need = path != "flex (no probs)"
            row = dict(slots=S, batch=B, path=path, floor_us=floor_us)
            rows.append(row)
            spent = time.perf_counter() - t_start
            if args.deadline_s is not None and spent + 1.5 * slowest[0] > args.deadline_s:
                row["error"] = f"skipped: deadline ({spent:.0f} s of {args.deadline_s:.0f})"
                print(f"  S={S} B={B} {path}: {row['error']}", flush=True)
                continue
            try:
                attention.DECODE_PROBS = path if need else "lowp"

                def step():
                    acc = None
                    for l in range(L):
                        o, p = attention.decode_attention(Q[l], K[l], V[l], pos, q_pos,
                                                          need_probs=need)
                        if p is not None:
                            score[l].add_(p.mean(dim=2))
                        acc = o if acc is None else acc + o
                    return acc

                torch._dynamo.reset()
                f = torch.compile(step, fullgraph=True, options=options)
                t = time.perf_counter()
                o = f()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t
                slowest[0] = max(slowest[0], row["compile_s"])
                for _ in range(3):
                    o = f()
                o = o.float().clone()
                if path == "explicit":
                    ref = o
                row["max_err"] = None if ref is None else (o - ref).abs().max().item()
                n = 5 if quick else 50
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(n):
                        f()
                    e1.record()
                    torch.cuda.synchronize()
                    us = 1e3 * e0.elapsed_time(e1) / n
                else:
                    t = time.perf_counter()
                    for _ in range(n):
                        f()
                    us = 1e6 * (time.perf_counter() - t) / n
                row.update(us_step=us, us_layer=us / L, gb_s=kv_bytes / us / 1e3,
                           frac_floor=floor_us / us)
                print(f"  S={S} B={B} {path}: {us:.1f} us/step ({floor_us / us:.0%} of the K/V "
                      f"floor), compile {row['compile_s']:.1f} s, err {row['max_err']}", flush=True)
            except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
                import traceback
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            save()
        ok = [r for r in rows if r["slots"] == S and r["batch"] == B and r["path"] != "flex (no probs)"
              and r.get("us_step") and not r.get("error")]
        if ok:
            fastest[f"S={S} B={B}"] = min(ok, key=lambda r: r["us_step"])["path"]
        K = V = Q = score = None   # free this size's tensors before the next (the step
        save()                     # closure reads these names, so they are rebound, not deleted)
    attention.DECODE_PROBS = "lowp"
    save()
    print(json.dumps(fastest), flush=True)
    return 0


# ------------------------------------------------------------------------------------ merge
def device_slug(metas: list[dict]) -> str:
    """The results' file name for the GPU the presets ran on: 'NVIDIA H200' -> 'h200',
    'NVIDIA H100 80GB HBM3' -> 'h100'; presets from different GPUs are not merged."""
    devices = sorted({m.get("device", "") for m in metas})
    if len(devices) != 1:
        raise ValueError(f"presets from different devices {devices}: merge each device's apart")
    m = re.search(r"\b([A-Za-z]{1,2}\d{2,4}[A-Za-z]?)\b", devices[0].replace("NVIDIA", ""))
    return m.group(1).lower() if m else "gpu"


def cmd_merge(args) -> int:
    """Several presets' JSON -> one <into>.json + <into>.md (the issue's speed results, named
    after the GPU they ran on: bench/results/speed/h200.{json,md} on the H200 machine)."""
    presets, rows = [], []
    for f in args.files:
        data = json.loads(Path(f).read_text())
        meta = data["meta"]
        presets.append(meta)
        for r in data["rows"]:
            rows.append(dict(r, preset=meta["preset"]))
    into = Path(args.into or ROOT / "bench" / "results" / "speed" / device_slug(presets))
    into.parent.mkdir(parents=True, exist_ok=True)
    into.with_suffix(".json").write_text(json.dumps(dict(presets=presets, rows=rows), indent=1))
    md = ["# Speed on the GPU machine\n",
          "Merged by `python bench/gpu_run.py merge " + " ".join(args.files)
          + ("" if args.into is None else f" --into {args.into}") + "`."
          " Each section: one preset, as `bench/speed.py` wrote it (device, torch, commit).\n"]
    for f in args.files:
        md.append(speed_md(Path(f)).replace("# Speed:", "## Preset:"))
    into.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {into.with_suffix('.json')} and {into.with_suffix('.md')}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu_run.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run stages into OUT (what bench/gpu.sh calls)")
    r.add_argument("out")
    r.add_argument("stages", nargs="*", help=f"{', '.join(STAGES)} or all (default: tests)")
    c = sub.add_parser("_candidates", help="the decode-candidates stage itself")
    c.add_argument("out")
    c.add_argument("--quick", action="store_true", help="toy sizes (CPU rehearsal)")
    c.add_argument("--deadline-s", type=float, default=None,
                   help="start no compile that would end after this many seconds")
    m = sub.add_parser("merge", help="merge speed JSONs into one json + md")
    m.add_argument("files", nargs="+")
    m.add_argument("--into", default=None,
                   help="path without suffix (default: bench/results/speed/<gpu>, e.g. h200)")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "_candidates": cmd_candidates, "merge": cmd_merge}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
