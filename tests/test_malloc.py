"""flexkv.malloc: glibc's malloc settings for CPU inference (opt-in; the CLI applies them on CPU),
and bench/cold_prefill.py's table."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import flexkv
import flexkv.cli
from flexkv import malloc
from helpers import load_bench

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tune_cpu_allocator_takes_on_glibc():
    """Both mallopt calls succeed (in a child: the settings are process-wide)."""
    code = "from flexkv.malloc import tune_cpu_allocator; print(tune_cpu_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_tune_cpu_allocator_changes_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *_: pytest.fail("mallopt called"))
    assert malloc.tune_cpu_allocator() is False


def test_tune_for_cli_cpu_only_and_opt_out(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "tune_cpu_allocator", lambda: calls.append(1) or True)
    monkeypatch.delenv("FLEXKV_TUNE_MALLOC", raising=False)
    assert malloc.tune_for_cli("cuda:0") is False and not calls
    assert malloc.tune_for_cli("cpu") is True and len(calls) == 1
    monkeypatch.setenv("FLEXKV_TUNE_MALLOC", "0")
    assert malloc.tune_for_cli("cpu") is False and len(calls) == 1


def test_cli_tunes_before_loading(monkeypatch):
    """`_load` (generate, demo) tunes for its device before the model loads."""
    seen = []
    monkeypatch.setattr(malloc, "tune_for_cli", lambda device: seen.append(("tune", device)))
    monkeypatch.setattr(flexkv, "load_model",
                        lambda *a, **k: seen.append(("load",)) or (object(), object()))
    flexkv.cli._load("m", "cpu", "float32")
    assert seen == [("tune", "cpu"), ("load",)]


def test_cold_prefill_table():
    cp = load_bench("cold_prefill")
    runs = []
    for rnd, (d, t) in enumerate([(6.0, 5.4), (6.5, 5.2), (5.0, 5.5)]):
        for setting, s in (("default", d), ("tuned", t)):
            runs.append(dict(setting=setting, round=rnd, prefill_s=s, minflt=100 if t == s else 900,
                             sys_s=0.1, maxrss_mib=1000.0))
    rows = {r["setting"]: r for r in cp.summarise(runs)}
    assert rows["default"]["prefill_min"] == 5.0 and rows["tuned"]["prefill_median"] == 5.4
    assert rows["tuned"]["ratios"] == [5.4 / 6.0, 5.2 / 6.5, 5.5 / 5.0]
    assert rows["tuned"]["ratio_median"] == 5.4 / 6.0
    assert rows["tuned"]["minflt_median"] == 100 and rows["default"]["minflt_median"] == 900
    meta = dict(command="c", commit="x", torch="t", threads=2, cores=2, glibc="2.36", tokens=4098,
                wall_s=1.0)
    md = cp.render(dict(meta=meta, rows=list(rows.values())))
    assert "| tuned | 3 | 5.20 | 5.40 | 0.90 (0.90, 0.80, 1.10) | 100 |" in md
