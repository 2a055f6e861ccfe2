"""CPU decode projections on prepacked weights (MKL's sgemm for fp32, oneDNN for bf16).

A decode step multiplies every weight by a few rows (one per batch row or serving slot).
- fp32: with 4 to 128 rows, MKL's `sgemm` repacks the whole weight matrix on every call: on a
  4th-generation Xeon (one thread), the default model's 120 layer projections take 33 ms for 1
  row and 76 ms for 8. Packed once (`cblas_sgemm_pack`, torch's `mkl::_mkl_reorder_linear_weight`,
  what inductor's CPU freezing uses), the 8-row products take 48 ms. Under 4 rows the packed
  product is slower (MKL's small kernels already stream the weight), so those keep `F.linear`.
- bf16: torch's CPU `F.linear` hands bf16 to oneDNN, which reorders the weight into its blocked
  format on every call; a weight reordered once (`mkldnn::_reorder_linear_weight`) gives the
  same bits 25-37 % faster at 1 to 16 rows (bench/NOTES.md, session 25).

`linear(x, weight, bias)` is `F.linear` with that fast path for decode-shaped inputs
(`[B, 1, in]`, B within `ROWS[dtype]`) of fp32 or bf16 CPU weights in eager code with autograd
off. Each weight keeps one packed copy, rebuilt when the weight changes (its version counter or
storage); an fp32 one also serves only the row count it was packed for (a decode loop's row
count is fixed: the batch, or the serving engine's slots) and is repacked when another row count
asks `REPACK_AFTER` times in a row. That copy costs as much memory again as the
weight: the packed copies of all weights together stay under `max_bytes()` (a quarter of
physical memory unless `FLEXKV_CPU_PACKED_GEMM_BYTES` says otherwise); a weight that would pass
it keeps `F.linear`. `FLEXKV_CPU_PACKED_GEMM=0` turns the path off. fp32 results equal
`F.linear`'s up to rounding (another summation order), as a batch of 8 already differs from a
batch of 1; bf16 results are `F.linear`'s bits.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

ROWS = {torch.float32: (4, 128), torch.bfloat16: (1, 128)}   # decode rows that gain


def _mkl_ok() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _onednn_bf16_ok() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _Packed:
    __slots__ = ("rows", "version", "ptr", "packed", "nbytes", "misses")

    def __init__(self, weight: Tensor, rows: int):
        self.version, self.ptr, self.misses = weight._version, weight.data_ptr(), 0
        if weight.dtype == torch.float32:   # MKL's packed product serves its own row count only
            self.rows = rows
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        else:                               # oneDNN's reordered weight serves any row count
            self.rows = None
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.nbytes = weight.nbytes   # what it holds (its buffer is allocated larger but only
        # this much is touched)

    def current(self, weight: Tensor) -> bool:
        return (self.version, self.ptr) == (weight._version, weight.data_ptr())


REPACK_AFTER = 3  # an fp32 weight is repacked for another row count after this many calls in a
# row asked for it: two decode loops that alternate on one model (an engine's slots and a batch)
# keep the pack of whichever was first, the other runs plain, instead of repacking every call


_packs = WeakIdKeyDictionary()   # weight -> _Packed (by identity: tensors have no usable ==)
_failed: set = set()             # dtypes whose packing raised once in this process
_lock = threading.Lock()         # guards both
_PLAIN = (torch.Tensor, torch.nn.Parameter)   # weights of these types only (no subclasses)


def enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether decode-shaped products of `dtype` take the packed path here."""
    if os.environ.get("FLEXKV_CPU_PACKED_GEMM", "1") == "0" or dtype not in ROWS:
        return False
    return _mkl_ok() if dtype == torch.float32 else _onednn_bf16_ok()


def max_bytes() -> int:
    """The most memory the packed copies may hold together."""
    env = os.environ.get("FLEXKV_CPU_PACKED_GEMM_BYTES")
    if env is not None:
        if not env.strip().isdigit():
            raise ValueError("FLEXKV_CPU_PACKED_GEMM_BYTES must be a whole number of bytes >= 0 "
                             f"(0: pack nothing), got {env!r}")
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def held_bytes() -> int:
    """The memory the packed copies hold now."""
    with _lock:
        return _held()


def _held() -> int:   # under _lock
    return sum(p.nbytes for p in _packs.values())


def clear() -> None:
    """Drop every packed copy (they are rebuilt on the next decode-shaped call)."""
    with _lock:
        _packs.clear()
        _failed.clear()


def _eligible(x: Tensor, weight: Tensor) -> bool:
    if torch.compiler.is_compiling():   # compiled code: inductor's own GEMMs, nothing to trace here
        return False
    lo, hi = ROWS.get(weight.dtype, (1, 0))
    return (x.dim() == 3 and x.shape[1] == 1 and lo <= x.shape[0] <= hi
            and x.device.type == "cpu" and x.dtype == weight.dtype
            and weight.dim() == 2 and weight.is_contiguous() and type(weight) in _PLAIN
            and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and enabled(weight.dtype))


def _pack_for(weight: Tensor, rows: int) -> _Packed | None:
    with _lock:
        pack = _packs.get(weight)
        if pack is not None and pack.current(weight):
            if pack.rows in (None, rows):
                pack.misses = 0
                return pack
            pack.misses += 1
            if pack.misses < REPACK_AFTER:
                return None
        _packs.pop(weight, None)
        if _held() + weight.nbytes > max_bytes() or weight.dtype in _failed:
            return None
        try:
            pack = _packs[weight] = _Packed(weight, rows)
        except RuntimeError as e:   # a build or CPU whose MKL / oneDNN refuses: plain from now on
            _failed.add(weight.dtype)
            warnings.warn(f"flexkv.cpu_gemm: packing a {weight.dtype} weight failed ({e}); "
                          "its decode projections use F.linear", RuntimeWarning, stacklevel=3)
            return None
        return pack


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`; decode-shaped fp32 / bf16 CPU inputs take the packed path."""
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    pack = _pack_for(weight, x.shape[0])
    if pack is None:
        return F.linear(x, weight, bias)
    B = x.shape[0]
    x2 = x.reshape(B, -1).contiguous()
    if weight.dtype == torch.float32:
        out = torch.ops.mkl._mkl_linear(x2, pack.packed, weight, bias, B)
    else:
        out = torch.ops.mkldnn._linear_pointwise(x2, pack.packed, bias, "none", [], "")
    return out.view(B, 1, -1)
