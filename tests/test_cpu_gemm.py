"""flexkv.cpu_gemm: CPU decode projections on MKL's packed sgemm, equal to F.linear up to fp32
rounding, rebuilt when the weight or the row count changes, bounded in memory, and off where
they do not apply."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import flexkv
from flexkv import cpu_gemm
from flexkv.testing import tiny_model

pytestmark = pytest.mark.skipif(not cpu_gemm.enabled(), reason="torch without MKL")


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
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
        x4 = torch.randn(4, 1, 80)                            # another row count
        _close(cpu_gemm.linear(x4, lin.weight), F.linear(x4, lin.weight))
    assert cpu_gemm.held_bytes() == 96 * 80 * 4   # one copy per weight, the latest


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


@pytest.mark.parametrize("policy,kw", [("full", {}), ("h2o", dict(budget=12))])
def test_generate_fp32_batch_takes_the_packed_path(policy, kw, monkeypatch):
    """An fp32 model's 4-row decode (eager, under inference mode) packs every projection and
    gives the tokens and (up to rounding) the logits of the unpacked run."""
    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, 101, (4, 20), generator=torch.Generator().manual_seed(1))
    packed = flexkv.generate(model, ids, max_new_tokens=8, policy=policy, output_logits=True, **kw)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert cpu_gemm.held_bytes() == sum(m.weight.numel() * 4 for m in model.modules()
                                        if isinstance(m, torch.nn.Linear)) and n_linear >= 7
    monkeypatch.setenv("FLEXKV_CPU_PACKED_GEMM", "0")
    plain = flexkv.generate(model, ids, max_new_tokens=8, policy=policy, output_logits=True, **kw)
    assert torch.equal(packed.tokens, plain.tokens)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=1e-4, atol=1e-4)
