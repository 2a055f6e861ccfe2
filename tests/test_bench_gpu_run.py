"""bench/gpu_run.py without a GPU: which decode-probabilities path a speed stage runs with (the
environment, else this call's candidates, else the copy an earlier call on the machine left, else
what an earlier lease committed), the summary naming it, per-stage limits and the merged results'
file name."""
import json

import pytest

from helpers import load_bench


def _candidates(path, fastest):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(rows=[], fastest=fastest)))


def test_decode_probs_for(tmp_path, monkeypatch):
    gr = load_bench("gpu_run")
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    monkeypatch.setattr(gr, "STATE", state)
    monkeypatch.setattr(gr, "COMMITTED", tmp_path / "repo" / "decode-candidates.json")
    monkeypatch.delenv("FLEXKV_DECODE_PROBS", raising=False)
    keys = ["S=32769 B=1", "S=4097 B=1"]
    path, why = gr.decode_probs_for(keys, out)
    assert path is None and "default" in why
    _candidates(gr.COMMITTED, {"S=4097 B=1": "flex_recompute"})  # an earlier lease, committed
    assert gr.decode_probs_for(keys, out)[0] == "flex_recompute"
    _candidates(state / "decode-candidates.json", {"S=4097 B=1": "flex_lse"})  # an earlier call
    assert gr.decode_probs_for(keys, out)[0] == "flex_lse"                 # the fallback key
    _candidates(out / "decode-candidates.json", {"S=32769 B=1": "triton", "S=4097 B=1": "lowp"})
    path, why = gr.decode_probs_for(keys, out)                             # this call's, first key
    assert path == "triton" and "S=32769 B=1" in why
    assert gr.decode_probs_for(["S=4097 B=8"], out)[0] is None             # no such key anywhere
    monkeypatch.setenv("FLEXKV_DECODE_PROBS", "explicit")                  # the environment wins
    path, why = gr.decode_probs_for(keys, out)
    assert path is None and why.startswith("explicit")


def test_summary_names_the_path(tmp_path):
    gr = load_bench("gpu_run")
    res = [dict(stage="speed-4k", status="ok", seconds=1.0,
                decode_probs="triton (fastest in decode-candidates at S=4097 B=1)")]
    text = gr.write_summary(tmp_path, dict(torch="x"), res)
    row = "| speed-4k | ok | 1.0 | - | triton (fastest in decode-candidates at S=4097 B=1) |"
    assert row in text
    assert (tmp_path / "summary.md").read_text() == text


def test_stage_limits():
    gr = load_bench("gpu_run")
    assert gr.parse_stage("tests") == ("tests", None)
    assert gr.parse_stage("tests:240") == ("tests", 240.0)
    assert gr.parse_stage("serve:") == ("serve", None)
    for bad in ["tests:10", "tests:9999", "tests:x", "speed-16k"]:
        with pytest.raises(ValueError, match="stage"):
            gr.parse_stage(bad)
    assert gr.main(["run", "/tmp/never-made", "tests:5"]) == 2   # refused before anything runs


def test_merged_results_named_after_the_gpu():
    gr = load_bench("gpu_run")
    assert gr.device_slug([dict(device="NVIDIA H200")] * 2) == "h200"
    assert gr.device_slug([dict(device="NVIDIA H100 80GB HBM3")]) == "h100"
    assert gr.device_slug([dict(device="NVIDIA A100-SXM4-80GB")]) == "a100"
    assert gr.device_slug([dict(device="something else")]) == "gpu"
    with pytest.raises(ValueError, match="different devices"):
        gr.device_slug([dict(device="NVIDIA H200"), dict(device="NVIDIA H100")])


def test_tests_past_the_deadline_are_reported_not_run(tmp_path):
    """A pytest run whose deadline has passed skips every test and still writes its JUnit file;
    the summary names them as not run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    gr = load_bench("gpu_run")
    xml = tmp_path / "tests.xml"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FLEXKV_TEST_DEADLINE="1")   # long past
    r = subprocess.run([sys.executable, "-m", "pytest", "-q",
                        "tests/test_bench_gpu_run.py::test_stage_limits", f"--junitxml={xml}"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    head, fails = gr.junit_summary(xml)
    assert head.startswith("1 tests: 0 passed") and "1 not run, out of time: test_stage_limits" in head
    assert fails == []


def test_summary_flags_cells_whose_values_differ_from_the_eager_step(tmp_path):
    """A speed stage's summary starts with one line on its compiled cells' eager check: all
    fine (with the lowest cosine), or each flagged / failed cell named."""
    gr = load_bench("gpu_run")

    def stage(checks):
        rows = [dict(policy=p, prompt=4096, batch=1, eager_check=c) for p, c in checks]
        (tmp_path / "s.json").write_text(json.dumps(dict(rows=rows + [dict(policy="full",
                                                                          prompt=4096, batch=1)])))
        return gr.values_line(tmp_path / "s.json")

    good = dict(min_cos=0.99991, top1=1.0)
    assert stage([("h2o", good), ("full", dict(min_cos=0.9999, top1=1.0))]).endswith(
        "every cosine >= 0.99 (lowest 0.99990).")
    line = stage([("h2o", good), ("cam", dict(min_cos=0.41, top1=0.25)),
                  ("tova", dict(error="RuntimeError: x"))])
    assert "**FLAGGED** cam T=4096 B=1 (cosine 0.4100, top-1 0.25); tova T=4096 B=1 " \
           "(RuntimeError: x)" in line
    assert "no compiled cell checked" in stage([])


def test_gemv_stage_rehearsal(tmp_path):
    """bench/gemv.py (the batch-1 projections with inductor's tuned reductions, flexkv's CUDA
    default, against cuBLAS) on the tiny model: a row per setting, each compiled, checked against
    the eager step and profiled; the GPU run's summary shows them; the setting is restored."""
    import importlib

    gemv = load_bench("gemv")
    gen = importlib.import_module("flexkv.generate")
    default = gen.COORDINATE_DESCENT
    assert gemv.main(["--out", str(tmp_path), "--quick", "--batches", "1"]) == 0
    data = json.loads((tmp_path / "gemv.json").read_text())
    rows = data["rows"]
    assert [r["impl"] for r in rows] == ["flexkv+compile (reductions)", "flexkv+compile (cuBLAS)"]
    for r in rows:
        assert r["error"] is None and r["decode_ms"] > 0 and r["recompiles"] == 0
        assert r["eager_check"]["min_cos"] > 0.999 and r["kernels"]["classes"]["gemm"] > 0
    assert gen.COORDINATE_DESCENT is default
    gr = load_bench("gpu_run")
    text = gr.write_summary(tmp_path, dict(torch="x"),
                            [dict(stage="gemv", status="ok", seconds=1.0, file="gemv.json")])
    assert "## gemv" in text and "flexkv+compile (cuBLAS)" in text


def test_later_stages_drop_the_tuning_when_the_gemv_stage_saw_it_fail(tmp_path, monkeypatch):
    """A gemv stage whose coordinate-descent-tuned compile failed while cuBLAS's ran makes the
    later stages (of this call, and of later calls on the machine: STATE) compile without the
    tuning, and the stage table says so; a skipped or a working tuned row changes nothing."""
    gr = load_bench("gpu_run")
    monkeypatch.setattr(gr, "STATE", tmp_path / "state")
    monkeypatch.setattr(gr, "TUNING_OFF", tmp_path / "state" / "coordinate-descent-failed")
    monkeypatch.delenv("FLEXKV_COORDINATE_DESCENT", raising=False)

    def gemv(*rows):
        (tmp_path / "gemv.json").write_text(json.dumps(dict(rows=[
            dict(impl=f"flexkv+compile ({impl})", error=error) for impl, error in rows])))
        return gr.tuning_failed(tmp_path)

    assert gemv(("reductions", None), ("cuBLAS", None)) is None
    assert gemv(("reductions", "skipped: deadline (80 s)"), ("cuBLAS", None)) is None
    assert gemv(("reductions", "InductorError: x"), ("cuBLAS", "InductorError: x")) is None
    env = {}
    assert gr.coordinate_descent_for("speed-4k", env) == "on" and env == {}
    assert gemv(("reductions", "InductorError: x"), ("cuBLAS", None)) == "InductorError: x"
    (tmp_path / "gemv.json").write_text(json.dumps(dict(rows=[   # wrong values count as failed
        dict(impl="flexkv+compile (reductions)", error=None, eager_check=dict(min_cos=0.41)),
        dict(impl="flexkv+compile (cuBLAS)", error=None, eager_check=dict(min_cos=0.9999))])))
    assert gr.tuning_failed(tmp_path) == "values: cosine 0.4100 against the eager step"
    gr.STATE.mkdir()
    gr.TUNING_OFF.write_text("InductorError: x")
    why = gr.coordinate_descent_for("speed-4k", env)
    assert env == {"FLEXKV_COORDINATE_DESCENT": "0"} and why.startswith("off: the gemv stage")
    assert "compares" in gr.coordinate_descent_for("gemv", {})
    env = {}
    assert gr.coordinate_descent_for("tests", env) == "on" and env == {}  # they check the default
    text = gr.write_summary(tmp_path, dict(torch="x"), [dict(
        stage="speed-4k", status="ok", seconds=1.0, coordinate_descent=why)])
    assert "| off: the gemv stage's tuned compile failed (InductorError: x) |" in text
    monkeypatch.setenv("FLEXKV_COORDINATE_DESCENT", "0")
    assert gr.coordinate_descent_for("tests", {}) == "off (FLEXKV_COORDINATE_DESCENT=0)"
