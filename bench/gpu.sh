#!/usr/bin/env bash
# GPU checks of the triton backend in one command:  bench/gpu.sh OUTDIR
#   1. installs the package in place if `prefix_attn.kernels` is not importable
#      (pip install --no-deps --no-build-isolation -e .; nothing is downloaded);
#   2. runs the triton tests on the GPU (tests/test_triton.py compiled instead of
#      interpreted, and the -m gpu cases of tests/test_triton_gpu.py at real sizes);
#   3. runs bench/bench_triton_gpu.py, which writes OUTDIR/bench_triton_gpu.json.
# Logs: OUTDIR/pytest_gpu.log, OUTDIR/bench.log. Exit status: non-zero if a step failed.
set -uo pipefail
OUT=${1:?usage: bench/gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

if ! $PY -c "import prefix_attn.kernels" >/dev/null 2>&1; then
    PREFIX_ATTN_NO_EXT=${PREFIX_ATTN_NO_EXT:-1} $PY -m pip install --no-deps --no-build-isolation -e . \
        >"$OUT/install.log" 2>&1 || { echo "install failed, see $OUT/install.log"; exit 1; }
fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("gpu", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY

# Tests: one config per kernel (no autotuning sweep); compiled kernels, not the interpreter.
env -u TRITON_INTERPRET PREFIX_ATTN_TRITON_ONE_CONFIG=1 \
    $PY -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_triton_gpu.py \
    -m "gpu or interpreter" --junitxml="$OUT/pytest_gpu.xml" 2>&1 | tee "$OUT/pytest_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# Benchmark: full autotuning.
env -u TRITON_INTERPRET -u PREFIX_ATTN_TRITON_ONE_CONFIG \
    $PY bench/bench_triton_gpu.py --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
