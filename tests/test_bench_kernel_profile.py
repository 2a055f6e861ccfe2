"""bench/kernel_profile.py: the per-kernel breakdown of a decode step that the speed tables carry
(issue 9: where the time goes when a GPU target is not met)."""
import pytest
import torch

from helpers import load_bench
from test_bench_speed import META


@pytest.fixture(scope="module")
def kp():
    return load_bench("kernel_profile")


def test_kernel_classes(kp):
    names = {
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn>(Params)": "gemm",
        "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT": "gemm",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false>()": "gemm",
        "triton_tem_fused_flex_decoding_0": "attention",
        "_decode_probs_kernel": "attention",
        "Memcpy DtoD (Device -> Device)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>()": "copy",
        "triton_red_fused_add_mean_mul_pow_rsqrt_3": "fused",
        "triton_poi_fused_index_put_scatter_7": "fused",
        "triton_red_fused_mm_4": "gemm",          # a batch-1 projection as a tuned reduction
        "triton_red_fused__to_copy_add_mm_12": "gemm",
        "triton_red_fused_bmm_mul_sum_2": "gemm",
        "triton_per_fused__softmax_amax_exp_3": "fused",
        "triton_red_fused_mmap_like_1": "fused",   # `mm` only as a whole word
        # an in-place update fused with the eviction (lease 1 counted it as a copy)
        "triton_red_fused__softmax_add_amin_arange_argmin_bitwise_and_copy__div_exp_4": "fused",
    }
    assert {n: kp.kernel_class(n) for n in names} == names
    assert kp.short_name("void foo<int>(float*, int)") == "foo<int>"
    assert len(kp.short_name("x" * 200, width=40)) == 40


def test_breakdown_per_step(kp):
    # 4 steps: one GEMM of 30 us and two of 10 us, one attention kernel of 20 us, a fused of 5
    kernels = []
    for _ in range(4):
        kernels += [("sm90_xmma_gemm_bf16", 30.0), ("sm90_xmma_gemm_bf16", 10.0),
                    ("sm90_xmma_gemm_bf16", 10.0), ("triton_tem_fused_flex_decoding_0", 20.0),
                    ("triton_poi_fused_add_1", 5.0)]
    b = kp.breakdown(kernels, steps=4, top=2)
    assert b["steps"] == 4 and b["kernels"] == 3 and b["launches"] == 5
    assert b["kernel_ms"] == pytest.approx(0.075)
    assert b["classes"] == pytest.approx(dict(attention=0.02, gemm=0.05, copy=0.0, fused=0.005))
    assert [(t["name"], t["cls"], t["calls"]) for t in b["top"]] == [
        ("sm90_xmma_gemm_bf16", "gemm", 3.0), ("triton_tem_fused_flex_decoding_0", "attention", 1.0)]
    assert b["top"][0]["ms"] == pytest.approx(0.05)
    assert b["top"][0]["share"] == pytest.approx(50 / 75)
    assert kp.breakdown([], steps=3)["kernel_ms"] == 0.0


def test_profile_decode_records_only_the_steady_steps(kp):
    """The profiler waits out the 'prefill' and the first steps, then records `active` steps;
    a run too short for one steady step gives None."""
    a = torch.randn(64, 64)
    calls = []

    def run(callback, n=20, prefill_reps=7):
        for _ in range(prefill_reps):  # the prefill: aten::mm 7 times, before the first callback
            torch.mm(a, a)
        callback(None)
        for _ in range(n - 1):  # each decode step: one aten::mm
            torch.mm(a, a)
            calls.append(1)
            callback(None)

    b = kp.profile_decode(run, 20, torch.device("cpu"), skip=4, max_active=6)
    assert b["source"] == "CPU operators" and b["steps"] == 6
    mm = [t for t in b["top"] if t["name"] == "aten::mm"]
    assert mm and mm[0]["calls"] == 1.0  # one per step: the prefill's seven are not in it
    assert b["launches"] >= 1.0
    assert len(calls) == 19
    assert kp.profile_decode(lambda cb: run(cb, n=2), 2, torch.device("cpu")) is None


def test_markdown_section(kp):
    speed = load_bench("speed")

    def row(policy, kernels):
        return speed.Row("flexkv+compile", policy, 4096, 512, 1, 5.0, 200.0, 4.0, 0.8, 1.0, 1.0,
                         None, None, None, 1.0, 0, 10, kernels=kernels)

    good = kp.breakdown([("sm90_gemm", 3000.0), ("triton_tem_fused_flex_decoding_0", 1000.0)], 1)
    rows = [row("h2o", good | dict(source="CUPTI kernels")),
            row("tova", dict(error="RuntimeError: CUPTI")),
            speed.failed_row("flexkv+compile", "cam", 4096, 512, 1, "skipped: time budget")]
    md = kp.markdown(rows)
    assert "CUPTI kernels" in md and "| flexkv+compile | h2o | 4096 | 512 | 1 | 4 | 5 | 4 | 1 | 3 | 0 | 0 | 0.80 | 2 |" in md
    assert "| `sm90_gemm` | gemm | 3 | 1 | 75% |" in md
    assert "tova prompt 4096 budget 512 batch 1: profile failed: RuntimeError: CUPTI" in md
    assert "cam" not in md
    assert kp.markdown([rows[2]]) == ""
    full = speed.markdown(META, rows, 1e12)
    assert full.endswith(md)
