"""bench/prefill_cpu.py's table from recorded trials (no model, no kvpress): the ratio of minima
and the median of per-round ratios, and `render` rewriting the table from the JSON."""
import json

from helpers import load_bench


def _trials():
    # round by round: flexkv then kvpress per policy; round 1 is disturbed on flexkv's side only
    walls = {("flexkv", "full"): [10.0, 14.0, 9.6], ("kvpress", "full"): [10.5, 10.0, 10.0],
             ("flexkv", "h2o"): [5.0, 5.0, 5.0]}
    out = []
    for i in range(3):
        for (impl, pol), w in walls.items():
            out.append(dict(impl=impl, policy=pol, press=None, attn=None, kept=4, wall_s=w[i],
                            prefill_s=w[i] - 1, decode_s=1.0, load=[0.5, 0.6]))
    return out


def test_per_round_median_and_render(tmp_path):
    pc = load_bench("prefill_cpu")
    rows = {(r["impl"], r["policy"]): r for r in pc.summarize(_trials(), 256, 32)}
    f = rows[("flexkv", "full")]
    assert f["e2e_vs_kvpress"] == 9.6 / 10.0                       # minimum over minimum
    assert f["e2e_vs_kvpress_rounds"] == [10.0 / 10.5, 14.0 / 10.0, 9.6 / 10.0]
    assert f["e2e_vs_kvpress_median"] == 9.6 / 10.0                 # the disturbed round drops out
    assert rows[("flexkv", "h2o")]["e2e_vs_kvpress_median"] is None  # no kvpress row
    assert rows[("kvpress", "full")]["e2e_vs_kvpress_median"] is None
    meta = dict(command="x", commit="c", torch="t", threads=2, cores=2, cpu="cpu", wall_s=1,
                prompt_tokens=10, length=8, new_tokens=32, budget=256, trials=3,
                load_before="-", load_after="-", policies=["full", "h2o"], notes=["n"])
    path = tmp_path / "cpu-8"
    path.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=[], trials=_trials())))
    md = pc.render(path)
    assert md == path.with_suffix(".md").read_text()
    assert "| 0.96 | 0.96 (0.95, 1.40, 0.96) |" in md
    assert json.loads(path.with_suffix(".json").read_text())["rows"]  # rows recomputed
    assert "default model, fp32 on both sides;" in md and "bf16" not in md  # no dtype: fp32
    bf16 = pc.markdown(pc.summarize(_trials(), 256, 32), dict(meta, dtype="bfloat16"))
    assert bf16.splitlines()[0].endswith(", bf16") and "bf16 on both sides;" in bf16


def test_make_press_builds_plain_and_wrapping_presses():
    """The worker's press construction, on stand-ins for kvpress's classes: a scorer press takes
    the ratio and its parameters; "AdaKVPress(SnapKVPress)" wraps the scorer, as kvpress's
    `AdaKVPress(press=SnapKVPress(compression_ratio=...))` is built. Every pair names a press."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    pc = load_bench("prefill_cpu")

    @dataclass
    class SnapKVPress:
        compression_ratio: float
        window_size: int = 64

    @dataclass
    class AdaKVPress:
        press: SnapKVPress

    kvpress = SimpleNamespace(SnapKVPress=SnapKVPress, AdaKVPress=AdaKVPress)
    assert pc.make_press(kvpress, "SnapKVPress", 0.75, {"window_size": 8}) == SnapKVPress(0.75, 8)
    ada = pc.make_press(kvpress, "AdaKVPress(SnapKVPress)", 0.5, {})
    assert ada == AdaKVPress(press=SnapKVPress(0.5))
    assert pc.PAIRS["adakv"][0] == "AdaKVPress(SnapKVPress)"
    assert pc.split_press("AdaKVPress(SnapKVPress)") == ("AdaKVPress", "SnapKVPress")
    assert pc.split_press("TOVAPress") == (None, "TOVAPress")
    assert all(press for p, (press, _) in pc.PAIRS.items() if p != "full")


def test_prefill_only_runs_the_presses_work():
    """`--prefill-only`: flexkv's decode-time policies run with prefill_only=True (the presses
    compress the prompt only); the prefill-only ones and `full` take nothing; the table says
    which work flexkv's rows did."""
    pc = load_bench("prefill_cpu")
    for p in ("streaming", "tova", "keydiff", "h2o"):
        assert pc._prefill_only_kw(p, True) == {"prefill_only": True}
        assert pc._prefill_only_kw(p, False) == {}
    for p in ("full", "snapkv", "pyramidkv", "adakv"):
        assert pc._prefill_only_kw(p, True) == {}
    meta = dict(command="x", commit="c", torch="t", threads=2, cores=2, cpu="cpu", wall_s=1,
                prompt_tokens=10, length=8, new_tokens=32, budget=256, trials=3,
                load_before="-", load_after="-", policies=["full", "h2o"])
    assert "evict at every decode step" in pc.markdown([], meta)
    assert "prefill_only=True" in pc.markdown([], dict(meta, prefill_only=True))
