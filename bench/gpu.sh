#!/usr/bin/env bash
# flexkv on the GPU machine, one device call: set up, then run stages into OUT.
#
#   FLEXKV_COMMIT=<sha> bash bench/gpu.sh "$OUT" [stage...]
#
# stages: tests  choice  decode-candidates  gemv  speed-4k  speed-32k  speed-b8  serve
# (default: tests).
# serve needs .whl and .gpu-kit carried (bash bench/gpu_kit.sh makes both).
# bench/GPU.md lists the device calls to make, in order, with their expected times.
#
# Setup: wheels carried in .whl/ (if any) are installed into /tmp/site (PYTHONPATH); flexkv is
# installed editable without network (setuptools is on the machine), or, failing that, made
# importable through a .pth (flexkv.models maps to models/, as pyproject's package-dir says).
# Then bench/gpu_run.py runs each stage in a subprocess with a time limit and writes OUT/summary.md
# (printed at the end), OUT/run.log, OUT/tests.xml and the JSON/markdown results, all at the top
# of OUT. The whole call keeps inside FLEXKV_GPU_BUDGET_S (default 570 s: under the
# device tool's 10-minute limit per command).
#
# FLEXKV_GPU_DRYRUN=1 rehearses everything on a machine without a GPU (tiny sizes, CPU).
set -uo pipefail
export FLEXKV_GPU_T0=${FLEXKV_GPU_T0:-$(date +%s)}
OUT=${1:?usage: bash bench/gpu.sh OUT [stage...]}
shift
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export FLEXKV_COMMIT=${FLEXKV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LOG="$OUT/run.log"
echo "===== setup $(date -u +%FT%TZ) commit $FLEXKV_COMMIT" >>"$LOG"

# 1. carried wheels (the serve stage's HTTP stack: bench/gpu_kit.sh)
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        echo "[gpu.sh] wheels installed: $(ls .whl | tr '\n' ' ')"
    else
        echo "[gpu.sh] wheel install failed (see run.log); going on without them"
    fi
fi

# 2. flexkv importable (flexkv.models -> models/), checked from outside the repository too
importable() { (cd /tmp && "$PY" -c "import flexkv.models, flexkv.attention" >>"$LOG" 2>&1); }
if ! importable; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" >>"$LOG" 2>&1 \
        || echo "[gpu.sh] pip install -e failed (see run.log); trying a .pth"
fi
if ! importable; then
    SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cat >"$SITE/_flexkv_dev.py" <<EOF
import importlib.machinery, sys
class _FlexkvModels:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "flexkv.models":
            return importlib.machinery.PathFinder.find_spec(name, ["$REPO"])
        return None
sys.meta_path.append(_FlexkvModels)
EOF
    printf '%s\nimport _flexkv_dev\n' "$REPO" >"$SITE/_flexkv_dev.pth"
fi
if ! importable; then
    echo "[gpu.sh] flexkv cannot be imported; run.log says why"; tail -20 "$LOG"; exit 3
fi
echo "[gpu.sh] setup done in $(( $(date +%s) - FLEXKV_GPU_T0 )) s; nvidia-smi: $(nvidia-smi \
    --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null \
    || echo none)"

# 3. the stages
exec "$PY" bench/gpu_run.py run "$OUT" "$@"
