#!/usr/bin/env bash
# GPU checks and benchmarks in one command:  bench/gpu.sh OUTDIR [bench_triton_gpu.py args]
#
# Stages, each time-boxed (seconds, overridable by env) so a slow one cannot eat the others:
#   (setup)      if `prefix_attn.kernels` is not importable, the source tree is used in
#                place (PYTHONPATH, prefix_attn/kernels -> ../kernels); nothing is installed
#   ext (background)  the C++/CUDA extension built from a copy of the tree into
#                /tmp/prefix_attn_ext, moved into prefix_attn/ before tests_rest; the build
#                (MAX_JOBS compiler processes) is stopped (SIGSTOP to its process group) while
#                bench and bench_train time anything and resumed after them, so its compilers
#                do not compete with the benchmarks' host threads (they ran through the
#                timings until 2026-12-06)
#   tests_gpu    (T_GPU, 120)    tests/test_triton_gpu.py -m gpu: real sizes, bf16/fp16, head
#                dims 16..256; tests/test_hf_gpu.py: tiny HF models on the GPU through the
#                triton backend; tests/test_cli_gpu.py: train / eval / generate / serve with
#                --device cuda against the same commands on the CPU; tests/test_host_syncs.py: CUDA's own count of the syncs of a
#                decode step, equal at 2 and 4 layers (8 workers: compiling is the slow part)
#   bench        (T_BENCH, 200)  bench/bench_triton_gpu.py, full autotuning, with the same-run
#                comparison of the backward's kernel switches (bench_triton_gpu.ABLATIONS), the
#                older enable_gqa baseline at P 128 and a kernel-time profile (results are
#                written after each part: a time box keeps what was measured)
#   bench_train  (T_TRAIN, 80)   bench/bench_train.py --device cuda --dtype bf16: a whole
#                prefix-tuning step of a Llama-shaped model, ours vs PEFT (reuses the bench's
#                autotuning through Triton's on-disk cache: same autotune key)
#   tests_triton (T_TRITON, 110) tests/test_triton.py compiled on the GPU (not interpreted),
#                14 workers (compiling is the slow part)
#   tests_rest   (T_REST, 50)    what differs on that machine: the CUDA extension's tests (the
#                contract and 90 random cases), and the HF model and generate tests against
#                its own transformers and peft (not the `more_families` ones: make test-compat
#                runs them against that transformers on a CPU machine)
#                (the rest of the suite is pure CPU and runs in `make test`)
# STAGES="bench tests_rest" (say) runs only those stages: a second, shorter device call can
# finish what a first one's time boxes cut.
# Writes OUTDIR/{summary.txt (versions, GPU, stage times), logs.tgz (every stage's log,
# refreshed after each stage), bench_triton_gpu.{json,md}, train_gpu.{json,md}}: 6 files (a
# device call brings back 8 at most).
# Exit status: non-zero if a stage failed or ran out of time.
# Time on an H200 (2026-11-28): tests_gpu 57 s, bench 85 s (+ about 40 s of decode sweep since),
# tests_triton 70 of 72 tests in 90 s, tests_rest 400 of 544 tests in 80 s (16 cores): the
# defaults (560 s in all) fit a 10-minute call.
set -uo pipefail
OUT=${1:?usage: bench/gpu.sh OUTDIR [bench args]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d /tmp/prefix_attn_logs.XXXX)
status=0
: >"$OUT/summary.txt"

STAGES=" ${STAGES:-tests_gpu bench bench_train tests_triton tests_rest} "
wanted() { [[ "$STAGES" == *" $1 "* ]]; }

stage() {  # stage NAME LIMIT_S CMD...: CMD with a time limit; log LOGS/NAME.log, tarred to OUT/logs.tgz
    local name=$1 limit=$2 t0 rc
    shift 2
    if ! wanted "$name"; then
        echo "$name: not in STAGES" | tee -a "$OUT/summary.txt"
        return
    fi
    t0=$(date +%s)
    timeout -k 15 -s INT "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 4 "$LOGS/$name.log" | sed 's/^/    /'
    tar czf "$OUT/logs.tgz" -C "$LOGS" .
    [ "$rc" -eq 0 ] || status=1
}

if ! $PY -c "import prefix_attn.kernels" >/dev/null 2>&1; then
    # Not installed: use the source tree in place (no pip: a machine without network and
    # with a setuptools whose `develop` re-enters pip cannot install even with
    # --no-build-isolation). prefix_attn.kernels lives in kernels/: link it into the package.
    [ -e prefix_attn/kernels ] || ln -s ../kernels prefix_attn/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    $PY -c "import prefix_attn.kernels" || { echo "prefix_attn not importable"; exit 1; }
fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1

# The extension, built in the background from a copy (the tests must not import a half-written
# library); the CUDA part is compiled for this GPU.
EXT=/tmp/prefix_attn_ext
rm -rf "$EXT" && mkdir -p "$EXT/src"
tar --exclude=./.git -cf - . | tar -xf - -C "$EXT/src"
# CXX: the PATH's g++, not an image's $CXX. On the H200 image (2026-11-28) $CXX was
# /opt/gcc/bin/g++, which linked libstdc++ statically into _C.so: two libstdc++ copies in one
# process, and the first C++ error message (TORCH_CHECK formatting a number) segfaulted.
# setsid: the build gets a process group of its own (pgid = ext_pid), which ext_pause and
# ext_resume stop and continue as a whole (setup.py, ninja and every compiler under them).
ext_pid=""
if wanted tests_rest; then
    ( cd "$EXT/src" && CXX=$(command -v g++ || echo c++) MAX_JOBS=${MAX_JOBS:-12} \
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      exec setsid $PY setup.py build_ext --build-lib "$EXT/lib" --build-temp "$EXT/tmp" ) >"$EXT/build.log" 2>&1 &
    ext_pid=$!
fi
ext_pause() { [ -n "$ext_pid" ] && kill -STOP -- "-$ext_pid" 2>/dev/null && echo "extension build paused for the timings" | tee -a "$OUT/summary.txt"; return 0; }
ext_resume() { [ -n "$ext_pid" ] && kill -CONT -- "-$ext_pid" 2>/dev/null; return 0; }
trap ext_resume EXIT

$PY - <<'PY' >>"$OUT/summary.txt" 2>&1
import datetime, subprocess, torch, triton
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("gpu", torch.cuda.get_device_name(), "sms", torch.cuda.get_device_properties(0).multi_processor_count)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
for mod in ("transformers", "peft", "accelerate"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as e:
        print(mod, "missing", e)
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu",
                      "--format=csv"], capture_output=True, text=True).stdout)
PY
cat "$OUT/summary.txt"

# Tests: one config per kernel (no autotuning sweep); compiled kernels, not the interpreter.
stage tests_gpu "${T_GPU:-120}" env -u TRITON_INTERPRET PREFIX_ATTN_TRITON_ONE_CONFIG=1 \
    $PY -m pytest -v -p no:cacheprovider -n 8 tests/test_triton_gpu.py tests/test_hf_gpu.py tests/test_cli_gpu.py \
    tests/test_host_syncs.py -m gpu

# Benchmark: full autotuning; the chosen configs go to the log and the JSON. The timings of
# the search are kept on disk (TRITON_CACHE_AUTOTUNING) for bench_train below.
ext_pause
stage bench "${T_BENCH:-200}" env -u TRITON_INTERPRET -u PREFIX_ATTN_TRITON_ONE_CONFIG \
    TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1 PYTHONUNBUFFERED=1 \
    $PY bench/bench_triton_gpu.py --out "$OUT" --prefix 128,16,64,256 "$@"

# A whole training step on the GPU (Llama-shaped, bf16, head dim 128), ours vs PEFT. Its
# attention has the autotune key of the bench above (D 128, G 4, S 4096, P + S <= 8192), so
# the search's cached result is reused instead of a minute of tuning inside the time box.
stage bench_train "${T_TRAIN:-80}" env -u TRITON_INTERPRET -u PREFIX_ATTN_TRITON_ONE_CONFIG \
    TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1 \
    $PY bench/bench_train.py --device cuda --dtype bf16 --hidden 1024 --layers 8 --heads 8 \
    --kv-heads 2 --mlp 2816 --vocab 8192 --batch 4 --seq 4096 --prefix 64 --steps 5 --out "$OUT"

ext_resume
stage tests_triton "${T_TRITON:-110}" env -u TRITON_INTERPRET PREFIX_ATTN_TRITON_ONE_CONFIG=1 \
    $PY -m pytest -v -p no:cacheprovider -n 14 tests/test_triton.py -m "interpreter or gpu"

# The rest of the suite with the extension (if it built in time) on this machine's packages.
if wanted tests_rest; then
    for _ in $(seq 1 60); do kill -0 $ext_pid 2>/dev/null || break; sleep 2; done
    lib=$(ls "$EXT"/lib/prefix_attn/_C*.so 2>/dev/null | head -n 1)
    if [ -n "$lib" ] && ! ldd "$lib" | grep -q libstdc++; then
        echo "extension links libstdc++ statically (crashes on C++ errors): not used" | tee -a "$OUT/summary.txt"
        lib=""
    fi
    if [ -n "$lib" ]; then
        echo "extension built: $lib" | tee -a "$OUT/summary.txt"
        cp "$lib" "prefix_attn/.tmp_C.so" && mv "prefix_attn/.tmp_C.so" "prefix_attn/$(basename "$lib")"
    else
        echo "extension NOT built (see ext_build.log): cpu/cuda backend tests skip" | tee -a "$OUT/summary.txt"
        status=1
    fi
    tail -n 30 "$EXT/build.log" >"$LOGS/ext_build.log" 2>/dev/null
fi
stage tests_rest "${T_REST:-50}" env -u TRITON_INTERPRET PREFIX_ATTN_TRITON_ONE_CONFIG=1 \
    $PY -m pytest -v -p no:cacheprovider -n 12 -m "not more_families" \
    tests/test_cuda_backend.py tests/test_hf_models.py \
    tests/test_hf_prefix.py tests/test_generate.py \
    tests/test_random_cases.py::test_random_case_cuda
cat "$OUT/summary.txt"
exit $status
