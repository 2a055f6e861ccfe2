"""flexkv.cpu_gemm: CPU decode projections on packed weights (MKL fp32: equal to F.linear up to
rounding; oneDNN bf16: F.linear's bits), rebuilt when the weight or the row count changes,
bounded in memory, and off where they do not apply."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

import flexkv
from flexkv import cpu_gemm
from flexkv.testing import tiny_model

pytestmark = pytest.mark.skipif(not cpu_gemm.enabled(), reason="torch without MKL")
BF16 = pytest.mark.skipif(not cpu_gemm.enabled(torch.bfloat16), reason="no oneDNN bf16 here")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("FLEXKV_CPU_PACKED_GEMM", raising=False)
    monkeypatch.delenv("FLEXKV_CPU_PACKED_GEMM_BYTES", raising=False)
    cpu_gemm.clear()
    yield
    cpu_gemm.clear()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("rows", [4, 8, 33, 128])
def test_packed_equals_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 80, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 1, 80, generator=g)
    with torch.no_grad():
        _close(cpu_gemm.linear(x, w), F.linear(x, w))
        _close(cpu_gemm.linear(x, w, b), F.linear(x, w, b))
    assert cpu_gemm.held_bytes() == w.numel() * 4


@pytest.mark.parametrize("shape", [(3, 1, 80), (129, 1, 80), (4, 2, 80), (4, 80), (1, 1, 80)])
def test_other_shapes_are_f_linear_exactly(shape):
    w = torch.randn(96, 80)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
    assert cpu_gemm.held_bytes() == 0


@BF16
@pytest.mark.parametrize("rows", [1, 3, 8, 128])
def test_bf16_packed_is_f_linear_bit_for_bit(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 80, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 1, 80, generator=g).bfloat16()
    with torch.inference_mode():
        assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
        assert torch.equal(cpu_gemm.linear(x, w, b), F.linear(x, w, b))
    assert cpu_gemm.held_bytes() == w.numel() * 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_are_f_linear_exactly(dtype):
    w, x = torch.randn(96, 80, dtype=dtype), torch.randn(8, 1, 80, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
    assert cpu_gemm.held_bytes() == 0


def test_rebuilt_when_the_weight_changes_in_place_or_is_replaced():
    lin = torch.nn.Linear(80, 96, bias=False)
    x = torch.randn(8, 1, 80)
    with torch.no_grad():
        cpu_gemm.linear(x, lin.weight)
        lin.weight.mul_(-2.0)                                # in place: version counter
        _close(cpu_gemm.linear(x, lin.weight), F.linear(x, lin.weight))
        lin.load_state_dict({"weight": torch.randn(96, 80)})  # copy_ into the same storage
        _close(cpu_gemm.linear(x, lin.weight), F.linear(x, lin.weight))
        lin.weight.data = torch.randn(96, 80)                 # another storage, same Parameter
        _close(cpu_gemm.linear(x, lin.weight), F.linear(x, lin.weight))
    assert cpu_gemm.held_bytes() == 96 * 80 * 4   # one copy per weight, the latest


def _count_packs(monkeypatch):
    built = []
    real = torch.ops.mkl._mkl_reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight",
                        lambda w, rows: built.append(rows) or real(w, rows))
    return built


def test_fp32_repacks_for_a_new_row_count_that_stays(monkeypatch):
    built = _count_packs(monkeypatch)
    w = torch.randn(96, 80)
    x4, x8 = torch.randn(4, 1, 80), torch.randn(8, 1, 80)
    with torch.no_grad():
        for _ in range(5):
            cpu_gemm.linear(x4, w)
        for _ in range(5):
            _close(cpu_gemm.linear(x8, w), F.linear(x8, w))
    assert built == [4, 8]     # the 8-row calls ran plain until the REPACK_AFTER-th


def test_fp32_two_alternating_loops_do_not_repack_every_call(monkeypatch):
    """An engine's 8 slots and a 4-row batch stepping in turn on one model: the first keeps its
    pack, the other runs plain (repacking at every call would cost more than it saves)."""
    built = _count_packs(monkeypatch)
    w = torch.randn(96, 80)
    x4, x8 = torch.randn(4, 1, 80), torch.randn(8, 1, 80)
    with torch.no_grad():
        for _ in range(20):
            _close(cpu_gemm.linear(x8, w), F.linear(x8, w))
            assert torch.equal(cpu_gemm.linear(x4, w), F.linear(x4, w))
    assert built == [8]


@BF16
def test_bf16_one_reordered_weight_serves_every_row_count():
    w = torch.randn(96, 80).bfloat16()
    with torch.inference_mode():
        for rows in (1, 8, 3, 128, 1):
            x = torch.randn(rows, 1, 80).bfloat16()
            assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
    assert cpu_gemm.held_bytes() == w.numel() * 2


def test_memory_bound_and_opt_out(monkeypatch):
    w1, w2, x = torch.randn(96, 80), torch.randn(96, 80), torch.randn(8, 1, 80)
    monkeypatch.setenv("FLEXKV_CPU_PACKED_GEMM_BYTES", str(96 * 80 * 4))
    with torch.no_grad():
        cpu_gemm.linear(x, w1)
        assert torch.equal(cpu_gemm.linear(x, w2), F.linear(x, w2))   # over the bound: unpacked
        assert cpu_gemm.held_bytes() == 96 * 80 * 4
        cpu_gemm.clear()
        monkeypatch.setenv("FLEXKV_CPU_PACKED_GEMM", "0")
        assert torch.equal(cpu_gemm.linear(x, w1), F.linear(x, w1))
    assert cpu_gemm.held_bytes() == 0


@pytest.mark.parametrize("bad", ["2GiB", "-1", "1e9", ""])
def test_a_malformed_memory_bound_is_named(monkeypatch, bad):
    monkeypatch.setenv("FLEXKV_CPU_PACKED_GEMM_BYTES", bad)
    with torch.no_grad(), pytest.raises(ValueError, match="FLEXKV_CPU_PACKED_GEMM_BYTES"):
        cpu_gemm.linear(torch.randn(8, 1, 80), torch.randn(96, 80))


def test_autograd_keeps_f_linear():
    w = torch.randn(96, 80, requires_grad=True)
    x = torch.randn(8, 1, 80)
    cpu_gemm.linear(x, w).sum().backward()
    assert w.grad is not None and cpu_gemm.held_bytes() == 0


def test_a_freed_weight_frees_its_packed_copy():
    w = torch.randn(96, 80)
    with torch.no_grad():
        cpu_gemm.linear(torch.randn(8, 1, 80), w)
    assert cpu_gemm.held_bytes() > 0
    del w
    gc.collect()
    assert cpu_gemm.held_bytes() == 0


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
@pytest.mark.parametrize("policy,kw", [("full", {}), ("h2o", dict(budget=12))])
def test_generate_batch_takes_the_packed_path(policy, kw, dtype, monkeypatch):
    """A 4-row decode (eager, under inference mode) packs every projection and gives the tokens
    and the logits (fp32: up to rounding; bf16: the same bits) of the unpacked run."""
    model = tiny_model(dtype=dtype)
    ids = torch.randint(0, 101, (4, 20), generator=torch.Generator().manual_seed(1))
    packed = flexkv.generate(model, ids, max_new_tokens=8, policy=policy, output_logits=True, **kw)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert cpu_gemm.held_bytes() == sum(m.weight.nbytes for m in model.modules()
                                        if isinstance(m, torch.nn.Linear)) and n_linear >= 7
    monkeypatch.setenv("FLEXKV_CPU_PACKED_GEMM", "0")
    plain = flexkv.generate(model, ids, max_new_tokens=8, policy=policy, output_logits=True, **kw)
    assert torch.equal(packed.tokens, plain.tokens)
    if dtype == torch.bfloat16:
        assert torch.equal(packed.logits, plain.logits)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=1e-4, atol=1e-4)


def test_cpu_decode_bench_measures_both_settings_and_renders():
    """bench/cpu_decode.py's cell on the tiny model: both settings timed, same tokens, a row."""
    from helpers import load_bench

    cd = load_bench("cpu_decode")
    cell = cd.measure(tiny_model(dtype=torch.float32), rows=4, prompt=12, policy="h2o", budget=8,
                      steps=2, rounds=1)
    assert cell["packed_ms"] > 0 and cell["plain_ms"] > 0 and cell["same_tokens"]
    assert cpu_gemm.held_bytes() > 0
    meta = dict(command="c", commit="x", torch="t", cores=2, wall_s=1.0, prompt=12, policy="h2o",
                budget=8, steps=2, rounds=1)
    row = dict(dtype="float32", threads=1, rows=4, packed_ms=50.0, plain_ms=80.0, same_tokens=True)
    assert "| float32 | 1 | 4 | 50.0 | 80.0 | 0.62 | yes |" in cd.render(dict(meta=meta, rows=[row]))


def test_a_packing_failure_warns_once_and_falls_back(monkeypatch):
    def refuse(w, rows):
        raise RuntimeError("no packed sgemm here")

    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", refuse)
    w, x = torch.randn(96, 80), torch.randn(8, 1, 80)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no packed sgemm here"):
        assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cpu_gemm.linear(x, torch.randn(96, 80) * 0 + w), F.linear(x, w))
    assert cpu_gemm.held_bytes() == 0
