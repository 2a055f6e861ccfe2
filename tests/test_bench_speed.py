"""The speed benchmark's harness runs end to end (tiny random model, eager, one cell per policy)."""
import itertools
import json

import pytest

from helpers import load_bench


META = dict(preset="p", command="c", commit="x", device="d", torch="t", wall_s=1)


def load_speed():
    return load_bench("speed")


def first_table(md: str) -> list[dict]:
    """The rows of the first markdown table in `md`, as {column: cell text}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return [dict(zip(split(block[0]), split(line))) for line in block[2:]]


def test_tiny_speed_grid(tmp_path, capsys):
    speed = load_speed()
    assert speed.main(["--preset", "tiny", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    impls = {(r["impl"], r["policy"]) for r in data["rows"]}
    assert {("flexkv", "full"), ("flexkv", "streaming"), ("flexkv", "h2o"),
            ("transformers-eager", "full")} <= impls
    for r in data["rows"]:
        assert r["decode_ms"] > 0 and r["floor_ms"] > 0 and 0 < r["frac_floor"]
    for key in ("command", "commit", "device", "torch", "wall_s"):
        assert key in data["meta"]
    md = (tmp_path / "tiny.md").read_text()
    assert "| flexkv | h2o |" in md and "frac_floor" in md


def test_bad_arguments():
    speed = load_speed()
    with pytest.raises(SystemExit):
        speed.main(["--preset", "tiny", "--new-tokens", "1"])
    with pytest.raises(SystemExit):
        speed.main(["--preset", "tiny", "--layer-regions", "on,maybe"])


def test_one_row_per_layer_regions_setting(tmp_path, monkeypatch):
    """`--layer-regions on,off`: each flexkv cell once per setting, labelled with it, each
    compared with its own setting's `streaming` row."""
    from flexkv.models import llama
    monkeypatch.setattr(llama, "LAYER_REGIONS", "auto")
    speed = load_speed()
    assert speed.main(["--preset", "tiny", "--no-compile", "--no-hf", "--policies", "streaming,h2o",
                       "--layer-regions", "on,off", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert [(r["impl"], r["policy"]) for r in data["rows"]] == [
        ("flexkv (regions on)", "streaming"), ("flexkv (regions off)", "streaming"),
        ("flexkv (regions on)", "h2o"), ("flexkv (regions off)", "h2o")]
    assert data["meta"]["config"]["layer_regions"] == ["on", "off"]
    md = (tmp_path / "tiny.md").read_text()
    assert "layer regions on,off" in md
    rows = first_table(md)
    assert [r["x_streaming_ms"] for r in rows if r["policy"] == "streaming"] == ["1", "1"]


@pytest.mark.slow
def test_transformers_static_compile_baseline_recompiles_nothing_while_timed():
    """The static-cache + compile baseline times warm code: transformers sizes a static cache per
    `generate` call (the longest so far), so a warm-up shorter than the timed run used to make
    the timed run recompile, and its compile time landed in decode_ms."""
    import torch

    speed = load_speed()
    _, hf = speed.build_models("tiny", torch.device("cpu"), torch.float32, True)
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    row = speed.run_hf(hf, ids, "static-compile", 6, 1e10)
    assert row.recompiles == 0
    assert row.compile_s is not None and row.compile_s > 0
    assert 0 < row.decode_ms < 1e3 * row.compile_s  # a step, not a compile


@pytest.mark.slow
def test_compiled_cell_counts_recompiles_over_a_long_run(tmp_path):
    """A compiled cell records CUDA-graph skips, and the preset's long_policy (h2o) gets a long
    run of the same shapes (issue 9: 0 recompiles and 0 CUDA-graph skips across 1000 decode
    steps on the GPU; 24 tokens on the tiny preset). One compiled cell: each costs CI a compile."""
    speed = load_speed()
    assert speed.PRESETS["tiny"]["long_policy"] == "h2o"
    assert speed.main(["--preset", "tiny", "--policies", "h2o", "--no-hf",
                       "--out", str(tmp_path)]) == 0
    (h2o,) = json.loads((tmp_path / "tiny.json").read_text())["rows"]
    assert (h2o["long_steps"], h2o["long_recompiles"], h2o["long_cudagraph_skips"]) == (23, 0, 0)
    assert h2o["recompiles"] == 0 and h2o["cudagraph_skips"] == 0
    md = (tmp_path / "tiny.md").read_text()
    assert "long_recompiles" in md
    # its first 8 logits equal the eager step's (fp32 on CPU: to rounding), shown in the table
    chk = h2o["eager_check"]
    assert chk["steps"] == 8 and chk["top1"] == 1.0 and chk["min_cos"] > 1 - 1e-9, chk
    assert chk["max_abs"] < 1e-4 * max(1.0, chk["scale"]), chk
    assert "eager_cos" in md and " (!)" not in md
    # a compiled cell carries its per-kernel breakdown (steady steps of a profiled run)
    assert h2o["kernels"]["steps"] == 5 and h2o["kernels"]["kernel_ms"] > 0, h2o["kernels"]
    assert "Where a decode step's time goes" in md


def test_markdown_ratios_against_streaming_and_transformers_static():
    """The table's issue-9 ratios: decode time over `streaming`'s at the same prompt, budget and
    batch, and tokens/s over transformers static+compile's at the same prompt and batch; only
    where those rows exist."""
    speed = load_speed()
    nan = float("nan")

    def row(impl, policy, budget, ms, batch=1, error=None):
        return speed.Row(impl, policy, 4096, budget, batch, ms, 1e3 * batch / ms, 1.0, 1 / ms,
                         2.0, 1.0, None, None, None, None, 0, 10, error)

    rows = [row("flexkv+compile", "streaming", 512, 5.0), row("flexkv+compile", "h2o", 512, 5.5),
            row("flexkv+compile", "h2o", 512, 9.0, batch=8),  # no streaming row at batch 8
            row("transformers-static-compile", "full", None, 20.0),
            row("flexkv+compile", "tova", 512, nan, error="skipped: time budget")]
    table = first_table(speed.markdown(META, rows, 1e12))
    assert [(t["policy"], t["batch"], t["x_streaming_ms"], t["x_hf_static_tok_s"])
            for t in table] == [("streaming", "1", "1", "4"), ("h2o", "1", "1.1", "3.64"),
                                ("h2o", "8", "-", "-"), ("full", "1", "-", "-"),
                                ("tova", "1", "-", "-")]
    assert [t["x_plain_prefill"] for t in table] == ["2", "2", "2", "-", "-"]  # prefill 2 s / 1 s
    plain = speed.markdown(META, rows[3:4], 1e12)
    assert "x_streaming_ms" not in plain and "x_plain_prefill" not in plain


def test_chunked_prefill_peak_against_issue_9_bound():
    """`x_chunked_bound`: a chunked prefill's peak over weights + 2 x (budget + chunk) KV; only
    for rows that measured a peak (CUDA) and have a budget."""
    import torch
    speed = load_speed()
    model, _ = speed.build_models("tiny", torch.device("cpu"), torch.float32, False)
    a = model.args
    weights = sum(p.numel() * 4 for p in model.parameters())
    kv_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 4
    assert speed.chunked_bound_gb(model, 16, 32, 2) * 2**30 == weights + 2 * 48 * kv_token * 2
    rows = [speed.Row("flexkv+compile", "h2o", 4096, 512, 1, 5.0, 200.0, 4.0, 0.8, 1.0, 1.0,
                      0.5, 3.0, 3.0, 1.0, 0, 10, chunked_bound_gb=2.0),
            speed.Row("flexkv+compile", "full", 4096, None, 1, 5.0, 200.0, 4.0, 0.8, 1.0, 1.0,
                      0.5, 3.0, 3.0, 1.0, 0, 10)]
    h2o, full = first_table(speed.markdown(META, rows, 1e12))
    assert list(h2o)[-1] == "x_chunked_bound"
    assert (h2o["x_chunked_bound"], full["x_chunked_bound"]) == ("1.5", "-")


def test_eager_check_flags_logits_that_are_not_the_eager_steps():
    """`eager_check` compares a compiled cell's first logits with an eager run fed its tokens:
    the eager run's own logits match (cosine 1), logits from a corrupted cache do not; the
    table flags a cosine below CHECK_MIN_COS and shows a failed check as "error"."""
    import torch

    import flexkv
    speed = load_speed()
    model, _ = speed.build_models("tiny", torch.device("cpu"), torch.float32, False)
    ids = torch.randint(0, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    kw = dict(budget=16)
    out = flexkv.generate(model, ids, max_new_tokens=6, policy="h2o", output_logits=True, **kw)
    same = speed.eager_check(model, ids, "h2o", kw, out.logits)
    assert same["steps"] == 6 and same["top1"] == 1.0 and same["min_cos"] > 1 - 1e-12, same
    bad = out.logits.clone()
    bad[:, 4:] = bad[:, 4:].roll(7, dims=-1)  # steps 5-6 as a wrong cache would give them
    flagged = speed.eager_check(model, ids, "h2o", kw, bad)
    assert flagged["min_cos"] < speed.CHECK_MIN_COS, flagged

    def row(policy, check):
        return speed.Row("flexkv+compile", policy, 40, 16, 2, 5.0, 400.0, 4.0, 0.8, 1.0, 1.0,
                         None, None, None, 1.0, 0, 10, eager_check=check)

    table = first_table(speed.markdown(META, [row("h2o", same), row("tova", flagged),
                                              row("cam", dict(error="RuntimeError: x"))], 1e12))
    assert [t["eager_cos"] for t in table] == ["1.0000", f"{flagged['min_cos']:.4f} (!)", "error"]
