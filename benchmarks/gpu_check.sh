#!/usr/bin/env bash
# The GPU check in one command: versions, tests/test_gpu.py, benchmarks/bench_gpu.py (docs/performance.md, "GPU").
#
#   bash benchmarks/gpu_check.sh          # on a machine with a CUDA device: at most ~7 minutes (timeouts)
#   bash benchmarks/gpu_check.sh --dry    # anywhere: the same steps on the CPU (what CI runs), ~1 min
#   --tests-only / --bench-only           # one of the two steps (a rerun that fits a short lease)
#
# Uses only what is installed (torch, torchvision, pytest; no pip install): the checkout goes on
# PYTHONPATH. Each step runs under its own `timeout` and streams its log into $OUT (else runs/gpu/) as
# it goes, so a run cut short still leaves what it did: versions.txt, tests.log, tests.xml, bench.log,
# bench_gpu.json, bench_gpu.md (the tables), summary.txt. Without a CUDA device the script says so and runs the dry mode.
# Environment: PYTHON (default python3); TOTAL_BUDGET, the seconds the whole run aims at (default 420);
# TESTS_TIMEOUT (default 240) and BENCH_TIMEOUT (default: what is left of TOTAL_BUDGET, at least 150).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 RUN_TESTS=1 RUN_BENCH=1
for arg in "$@"; do
    case "$arg" in
        --dry) DRY=1 ;;
        --tests-only) RUN_BENCH=0 ;;
        --bench-only) RUN_TESTS=0 ;;
        *) echo "gpu_check.sh: expected --dry, --tests-only or --bench-only (got $arg)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-runs/gpu}
TOTAL_BUDGET=${TOTAL_BUDGET:-420}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-240}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
started=$SECONDS

if [[ $DRY == 0 ]] && ! timeout 60 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device here: running the dry mode on the CPU instead (it checks the code, not the GPU)"
    DRY=1
fi
if [[ $DRY == 1 ]]; then
    export SYNCNORM_GPU_DRY=1
    mode="dry run on the CPU"
else
    mode="GPU"
fi

# 1. versions (first, so that every log starts from what it ran on)
timeout 60 "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT_DIR/versions.txt"
import platform, subprocess, torch
def nccl():
    try:
        version = torch.cuda.nccl.version()
        return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:
        return "n/a"
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
print(f"GPU: {', '.join(gpus) if gpus else 'none'}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}, NCCL {nccl()}, "
      f"cuDNN {torch.backends.cudnn.version() if gpus else 'n/a'}, Python {platform.python_version()}")
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or "nvidia-smi: no output")
except (OSError, subprocess.TimeoutExpired):
    print("nvidia-smi: not available")
EOF
echo "mode: $mode; syncnorm $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)'); output: $OUT_DIR" | tee -a "$OUT_DIR/versions.txt"

# 2. the tests: only tests/test_gpu.py is collected (conftest.py imports torch and syncnorm only)
tests_status=skipped
if [[ $RUN_TESTS == 1 ]]; then
    echo "== tests/test_gpu.py (timeout ${TESTS_TIMEOUT}s)"
    SYNCNORM_GPU_CHECK=1 timeout --kill-after=10 "$TESTS_TIMEOUT" "$PYTHON" -m pytest -p no:cacheprovider -v \
        --junitxml="$OUT_DIR/tests.xml" tests/test_gpu.py 2>&1 | tee "$OUT_DIR/tests.log"
    tests_status=${PIPESTATUS[0]}
fi

# 3. the benchmark: its JSON is rewritten after every row; it stops starting rows 20 s before its timeout
if [[ -z ${BENCH_TIMEOUT:-} ]]; then
    BENCH_TIMEOUT=$((TOTAL_BUDGET - (SECONDS - started) - 10))
    (( BENCH_TIMEOUT < 150 )) && BENCH_TIMEOUT=150
fi
bench_status=skipped
if [[ $RUN_BENCH == 1 ]]; then
    echo "== benchmarks/bench_gpu.py (timeout ${BENCH_TIMEOUT}s)"
    bench_args=(--out "$OUT_DIR/bench_gpu.json" --time-budget $((BENCH_TIMEOUT - 20)))
    [[ $DRY == 1 ]] && bench_args+=(--dry)
    timeout --kill-after=10 "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_gpu.py "${bench_args[@]}" 2>&1 | tee "$OUT_DIR/bench.log"
    bench_status=${PIPESTATUS[0]}
fi

describe() { case "$1" in 0) echo "passed" ;; skipped) echo "not run" ;; 124|137) echo "TIMED OUT" ;; *) echo "FAILED (exit $1)" ;; esac; }
{
    echo "mode: $mode"
    echo "tests: $(describe "$tests_status")"
    echo "bench: $(describe "$bench_status")"
    echo "total: $((SECONDS - started)) s"
} | tee "$OUT_DIR/summary.txt"
[[ $tests_status =~ ^(0|skipped)$ && $bench_status =~ ^(0|skipped)$ ]]
