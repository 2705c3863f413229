#!/usr/bin/env bash
# The one prepared GPU run (make gpu-check): builds, runs the GPU tests and the
# GPU benchmark, and writes everything to gpu-check-results.txt (copied into
# $OUT when that is set). Each part has its own timeout and the whole run a
# deadline (GPU_CHECK_BUDGET seconds, default 290), so it ends in under five
# minutes; a failing part never stops the next. A summary closes the file.
#
# Environment: GPU_CHECK_BUDGET (290), GPU_CHECK_JOBS (make -j, 16),
# GPU_CHECK_TRACK_MODEL (d12; the 20-step bf16-vs-CPU test falls back to d6 by
# itself when the CPU is too slow), PYTHON (python3).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=gpu-check-results.txt
BUDGET=${GPU_CHECK_BUDGET:-290}
JOBS=${GPU_CHECK_JOBS:-16}
START=$SECONDS
: > "$RESULTS"
SUMMARY=()

log() { echo "$*" | tee -a "$RESULTS"; }

# part NAME MAX_SECONDS COMMAND...: runs it with a timeout of at most
# MAX_SECONDS and at most what is left of the budget (keeping RESERVE for the
# parts after it)
part() {
    local name=$1 max=$2 reserve=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - reserve))
    local limit=$((max < left ? max : left))
    if [ "$limit" -lt 10 ]; then
        log "=== $name: SKIPPED (only ${left}s of the budget left)"
        SUMMARY+=("$name: SKIPPED (out of time)")
        return
    fi
    log ""
    log "=== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$RESULTS"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0)) verdict
    case $rc in
        0) verdict=PASS ;;
        124|137) verdict="TIMEOUT after ${took}s" ;;
        *) verdict="FAIL (exit $rc)" ;;
    esac
    log "=== $name: $verdict in ${took}s"
    SUMMARY+=("$name: $verdict (${took}s)")
}

log "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), budget ${BUDGET}s"
log "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
part "environment" 30 250 bash -c "nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; \
    nvcc --version | tail -1; $PYTHON --version; \
    $PYTHON -c 'import numpy, Cython; print(\"numpy\", numpy.__version__, \"Cython\", Cython.__version__)'; \
    $PYTHON -c 'import torch; print(\"torch\", torch.__version__)' 2>&1 | tail -1; nproc"

# The GPU machine is offline: when the Python requirements are already there,
# skip make's pip step (an offline pip would fail on the data wheels).
if [ ! -e .requirements.stamp ] && $PYTHON -c "import numpy, Cython, pytest" 2>/dev/null; then
    touch .requirements.stamp
    log "(requirements importable: marked installed, skipping pip)"
fi
# build from scratch: nothing built elsewhere is trusted here
rm -f train_gpt_cu build/train_gpt_cu*.o build/gpt_cuda*.c
# -k: a broken target elsewhere must not stop the CUDA ones
part "build" 150 130 make -k -j"$JOBS" all

# The GPU tests in seven processes, so that a kernel fault (a sticky CUDA error
# spoils every later call in its process) cannot hide the other groups'
# results. The benchmark keeps 95 s of the budget whatever happens here.
PYTEST="$PYTHON -m pytest tests/test_cuda.py -v -rA -p no:cacheprovider"
part "tests: no device, fp32 build vs CPU" 60 95 \
    $PYTEST -k "no_device or (fp32 and not pipeline and not zero1 and not zero3)"
part "tests: bf16 build vs CPU, attention kernels" 60 95 $PYTEST -k "bf16_one_step or tensor_core or odd_shape"
part "tests: pipelines over sockets, NCCL" 75 95 $PYTEST -k "(pipeline or nccl) and not zero1 and not zero3"
# --zero 1 over the socket ring (two replicas on the one GPU) against zero 0, bitwise
part "tests: --zero 1 replicas vs zero 0" 75 95 $PYTEST -k "zero1"
# --zero 3 (FSDP) alike, its one-rank NCCL path against a plain run, and train.py's zero 3
# runs (1 x 2 and 2 x 2, the comm thread beside the pipeline) with a resume under zero 0
part "tests: --zero 3 replicas vs zero 0" 120 95 $PYTEST -k "zero3 and not zero1"
part "tests: determinism, bad input, binary" 75 95 $PYTEST -k "identical or d12_shape or out_of_memory or bad_tokens or standalone"
part "tests: train.py on the GPU" 90 95 $PYTEST -k "train_py and not zero1 and not zero3"
# the CPU side of the 20-step d12 comparison falls back to d6 when it would not fit
export GPU_CHECK_TRACK_BUDGET_S=$((BUDGET - (SECONDS - START) - 95 - 30))
part "tests: bf16 d12 tracks the CPU over 20 steps" 120 95 $PYTEST -k "tracks" --durations=3
# the PTX kernels (asm/*.ptx) against their CUDA C twins (~35 s; each check in
# its own subprocess), then their bandwidth and the d12 step with GPT_PTX=0/1 (~40 s)
part "tests: PTX kernels vs CUDA C twins, the GEMM vs cuBLASLt" 90 95 $PYTHON -m pytest tests/test_ptx.py -v -rA -p no:cacheprovider -k ptx
part "benchmark: PTX kernels" 75 95 $PYTHON dev/bench/bench_ptx.py

# the PyTorch reference gets what is left after our part of the benchmark (~40 s)
export BENCH_TORCH_TIMEOUT=$((BUDGET - (SECONDS - START) - 45))
part "benchmark" 200 0 $PYTHON dev/bench/bench_gpu.py

log ""
log "=== summary ($((SECONDS - START))s of ${BUDGET}s)"
for s in "${SUMMARY[@]}"; do log "  $s"; done
grep -E "^(tests/test_(cuda|ptx).py::\S+ (PASSED|FAILED|ERROR|SKIPPED)|FAILED |ERROR )" "$RESULTS" | \
    awk '!seen[$0]++ {print "  " $0}' > "$RESULTS.tmp"
if [ -s "$RESULTS.tmp" ]; then
    log "  tests:"
    cat "$RESULTS.tmp" | tee -a "$RESULTS"
fi
rm -f "$RESULTS.tmp"
grep -E "^RESULT " "$RESULTS" | awk '!seen[$0]++ {print "  " $0}' > "$RESULTS.tmp"
if [ -s "$RESULTS.tmp" ]; then
    log "  benchmark:"
    cat "$RESULTS.tmp" | tee -a "$RESULTS"
fi
rm -f "$RESULTS.tmp"
awk '/^=== benchmark \(/ {on = 1} on && /^GPT_PROFILE/' "$RESULTS" | awk '{print "  " $0}' > "$RESULTS.tmp"
if [ -s "$RESULTS.tmp" ]; then
    log "  per-kernel breakdown (d12 B=32 T=1024):"
    cat "$RESULTS.tmp" | tee -a "$RESULTS"
fi
rm -f "$RESULTS.tmp"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp "$RESULTS" "$OUT/" && echo "(copied to $OUT/$RESULTS)"
fi
exit 0
