"""Where a decode step's time goes: a per-kernel breakdown from torch.profiler (issue 9: for a
speed target that is not met, `bench/NOTES.md` shows the profiler's per-kernel breakdown).

`bench/speed.py` calls `profile_decode` once per compiled flexkv cell, on a run with the timed
run's shapes (so nothing recompiles and the CUDA graphs recorded for them replay): the profiler
waits out the prefill and the first decode steps (a new cache's CUDA graph is re-recorded there),
then records `active` steps with a device sync after each, so every kernel of a step is attributed
to it. On CUDA the kernels are CUPTI's device records (kernels replayed from a CUDA graph
included); on CPU, the operators' self times (a rehearsal of the same path).

Kernels are put in coarse classes by name: `gemm` (the weights: cuBLAS/CUTLASS/nvjet GEMMs and
GEMVs), `attention` (FlexAttention's templates, flexkv's Triton kernel, SDPA), `copy` (memcpy,
memset, fills) and `fused` (inductor's other generated kernels: norms, RoPE, the policy's score
updates and eviction, sampling; inductor fuses them, so they cannot be told apart by name).
The decode paths that compute attention probabilities with matmuls (`lowp`, `explicit`, and the
score recompute of `flex_lse`) run them as cuBLAS GEMMs too, two per layer: `gemm` then holds
those as well as the weights (the top kernels' calls per step tell them apart: the weights are
four GEMMs per layer, q/k/v, o, gate/up and down, and the LM head). At batch 1 on CUDA the
weights' matmuls are inductor's own reduction kernels (coordinate-descent tuning,
flexkv.generate), named after the `mm` they compute (`triton_red_fused_mm_4`): `gemm` as well.
`floor_ms` (weights + KV at the copy bandwidth) is what the whole step would take at the
bandwidth floor.
"""
from __future__ import annotations

import re

import torch

CLASSES = (  # first match wins; lower-case substrings of the kernel name
    ("attention", ("flex", "triton_tem_", "decode_probs", "attention", "attn", "sdpa", "flash")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "cublas", "aten::mm",
              "aten::addmm", "aten::bmm", "aten::linear", "matmul")),
    ("copy", ("memcpy", "memset", "fill", "copy_")),
)


# inductor's own matmul kernels: a one-row matmul that coordinate-descent tuning (the CUDA decode
# step's, flexkv.generate) turned into a reduction is named after the aten op it came from
# (`descriptive_names="original_aten"`): triton_red_fused_mm_4, triton_red_fused_add_mm_9
_INDUCTOR_MM = re.compile(r"_fused\w*?_(?:mm|addmm|bmm)(?:_|$)")


def kernel_class(name: str) -> str:
    low = name.lower()
    if low.startswith(("triton_poi_", "triton_red_", "triton_per_")):  # inductor's own kernels,
        # named after the ops they fuse: `copy_` there is an in-place update, not a memcpy
        return "gemm" if _INDUCTOR_MM.search(short_name(low)) else "fused"
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "fused"


def short_name(name: str, width: int = 90) -> str:
    """A kernel's name without `void `, its argument list and template noise, at most `width`."""
    name = re.sub(r"^void ", "", name).split("(")[0]
    return name if len(name) <= width else name[: width - 3] + "..."


def breakdown(kernels: list[tuple[str, float]], steps: int, top: int = 40) -> dict:
    """[(name, microseconds)] recorded over `steps` decode steps -> per-step totals: the sum of
    kernel time (`kernel_ms`), kernel launches, the time per class, and the `top` kernels by
    time (ms per step, calls per step, share of the kernel time; 40 by default: a GPU step has
    ~30 distinct kernels, and the JSON should hold all of them for bench/NOTES.md, where the
    markdown shows 5); `kernels`: distinct names."""
    per: dict[str, list[float]] = {}
    for name, us in kernels:
        tot = per.setdefault(name, [0.0, 0])
        tot[0] += us
        tot[1] += 1
    total_us = sum(t for t, _ in per.values())
    classes = {cls: 0.0 for cls, _ in CLASSES} | {"fused": 0.0}
    for name, (us, _) in per.items():
        classes[kernel_class(name)] += us / steps / 1e3
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(steps=steps, kernel_ms=total_us / steps / 1e3, kernels=len(per),
                launches=len(kernels) / steps,
                classes=classes,
                top=[dict(name=short_name(n), cls=kernel_class(n), ms=us / steps / 1e3,
                          calls=n_calls / steps, share=us / total_us if total_us else 0.0)
                     for n, (us, n_calls) in ranked])


def profile_decode(run, new_tokens: int, device: torch.device, skip: int = 6,
                   max_active: int = 20) -> dict | None:
    """`run(callback)` generates `new_tokens` tokens calling `callback` after the prefill and
    after every decode step; returns the breakdown of up to `max_active` decode steps after the
    first `skip` (and one profiler warm-up step), or None when the run is too short for any."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    steps = new_tokens - 1
    wait = 1 + min(skip, steps // 4)  # the prefill, then the first decode steps
    active = min(max_active, steps - wait)  # the warm-up step is the last of the waited ones
    if active < 1:
        return None
    cuda = device.type == "cuda"
    got = {}

    def ready(p):
        got["events"] = list(p.events())

    acts = [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]  # kernels only, on CUDA
    with profile(activities=acts, on_trace_ready=ready,
                 schedule=schedule(wait=wait - 1, warmup=1, active=active, repeat=1)) as prof:
        def step(tok):
            if cuda:  # the step's kernels finish inside its profiler step (the run is not timed)
                torch.cuda.synchronize()
            prof.step()
        run(step)
    events = got.get("events")
    if events is None:
        return None
    if cuda:
        kernels = [(e.name, e.time_range.elapsed_us()) for e in events
                   if e.device_type == DeviceType.CUDA]
    else:
        kernels = [(e.name, e.self_cpu_time_total) for e in events
                   if e.device_type == DeviceType.CPU and not e.is_async
                   and not e.name.startswith("ProfilerStep")]
    return breakdown(kernels, active) | dict(source="CUPTI kernels" if cuda else "CPU operators")


def markdown(rows, top: int = 5) -> str:
    """The breakdown section of a speed table: one line per profiled row (per-class ms per step
    against the timed decode), then each row's `top` kernels."""
    failed = [r for r in rows if (getattr(r, "kernels", None) or {}).get("error")]
    rows = [r for r in rows if (getattr(r, "kernels", None) or {}).get("top") is not None]
    notes = [f"- {r.impl} {r.policy} prompt {r.prompt} budget {r.budget} batch {r.batch}: "
             f"profile failed: {r.kernels['error']}" for r in failed]
    if not rows:
        return "\n" + "\n".join(notes) + "\n" if notes else ""
    cls_names = [c for c, _ in CLASSES] + ["fused"]
    k0 = rows[0].kernels
    out = [f"\n## Where a decode step's time goes ({k0['source']}, torch.profiler, "
           f"{k0['steps']} steps per row; ms per step)\n",
           "| impl | policy | prompt | budget | batch | floor_ms | decode_ms (timed) | kernel_ms | "
           + " | ".join(cls_names) + " | kernel / timed | launches |",
           "|" + "---|" * (10 + len(cls_names))]
    for r in rows:
        k = r.kernels
        out.append(f"| {r.impl} | {r.policy} | {r.prompt} | {r.budget if r.budget is not None else '-'}"
                   f" | {r.batch} | {r.floor_ms:.3g} | {r.decode_ms:.3g} | {k['kernel_ms']:.3g} | "
                   + " | ".join(f"{k['classes'].get(c, 0.0):.3g}" for c in cls_names)
                   + f" | {k['kernel_ms'] / r.decode_ms:.2f} | {k.get('launches', 0):.0f} |")
    for r in rows:
        out += [f"\n{r.impl} {r.policy} prompt {r.prompt} budget {r.budget} batch {r.batch}: "
                f"{r.kernels['kernels']} distinct kernels\n",
                "| kernel | class | ms/step | calls/step | share |", "|---|---|---|---|---|"]
        out += [f"| `{t['name']}` | {t['cls']} | {t['ms']:.3g} | {t['calls']:.3g} | "
                f"{t['share']:.0%} |" for t in r.kernels["top"][:top]]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"
