#!/usr/bin/env bash
# Everything that needs CUDA, in one call, in about 8-10 minutes on one GPU:
#   1. the test suite's CUDA-marked tests (tests/test_cuda.py: device factorisation, capture in
#      fp32/bf16/autocast, builds on the device, the streaming query with pinned buffers and a side
#      stream under load, top-k against the CPU's; the CUDA cases of test_sketch.py and
#      test_curvature.py) against CPU results;
#   2. bench_capture on the GPU (peak device memory and time of capture vs a plain forward+backward);
#   3. bench_build --gpu-quick (build vs the plain forward+backward floor, examples/s);
#   4. bench_query --gpu-quick (read+decode GB/s, load-vs-score overlap, GEMM efficiency vs peak).
# JSON lands in benchmarks/results/*_cuda*.json / *gpu_quick*.json, the log in gpu_check.log
# (not tracked by git); with $OUT set (a remote runner's collection folder) they are copied there.
#
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python if present, else python3
# Needs: a CUDA torch, and the package's dependencies importable (tools/setup.sh sets them up).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results
log=benchmarks/results/gpu_check.log
: > "$log"
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log, remember failures, go on
    local name="$1" limit="$2"; shift 2
    echo "== $name ($(date +%T), limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && { echo "!! $name failed (exit $rc)" | tee -a "$log"; status=1; }
    return 0
}
"$PY" - <<'PY' 2>&1 | tee -a "$log" || exit 2
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False: no GPU, or a CPU-only torch " + torch.__version__)
import lorif_stream, lmdb, zstandard, numba, click, psutil  # the package and its runtime deps
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
step "CUDA-marked tests" 300 "$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider
step "bench_capture (GPT-2-small shape, cuda)" 120 "$PY" benchmarks/bench_capture.py --device cuda
step "bench_build --gpu-quick" 150 "$PY" benchmarks/bench_build.py --gpu-quick
step "bench_query --gpu-quick" 120 "$PY" benchmarks/bench_query.py --gpu-quick
echo "== done ($(date +%T)): $([ $status -eq 0 ] && echo all steps passed || echo some steps FAILED, see $log)" | tee -a "$log"
# a remote runner that collects files from $OUT gets the JSON and the log
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    cp "$log" benchmarks/results/*_cuda*.json benchmarks/results/*gpu_quick*.json "$OUT"/ 2>/dev/null || true
fi
exit $status
