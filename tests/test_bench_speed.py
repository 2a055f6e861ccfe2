"""The speed benchmark's harness runs end to end (tiny random model, eager, one cell per policy)."""
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


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
