#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a machine with one (and torch on it):
# build against that machine's torch, the CUDA tests, compute-sanitizer (memcheck,
# racecheck, initcheck) over them, the CPU suite, and the GPU benchmark. Logs go to $OUT
# (default ./gpu-out). CI has no GPU and does not run this.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} ROPE_EXT_CUDA=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo "=== $* ($(date +%T))"; }

step build
$PY setup.py -q build_ext --inplace 2>&1 | grep -E "error|Error" | head -20
$PY -c "import rope_ext, torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())" || exit 1

step CUDA tests
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -5

for tool in memcheck racecheck initcheck; do
  step "compute-sanitizer $tool"
  # A reduced matrix (bf16/fp32, both paths): the sanitizer slows each launch a lot.
  compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda.py -k "(bfloat16 or float32 or fused or misaligned or replay or stream or outside) and not float64" \
    > "$OUT/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool exit $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -3
done

step CPU tests
# hypothesis may be missing there (carry its wheel); the fuzz and 4 GB tests run in CI anyway.
skip="--ignore=tests/test_fuzz.py --ignore=tests/test_large.py"
$PY -c "import hypothesis" 2>/dev/null || skip="$skip --ignore=tests/test_properties.py"
$PY -m pytest -q -p no:cacheprovider tests $skip 2>&1 | tee "$OUT/test_cpu.log" | tail -3

step GPU benchmark
$PY benchmarks/bench_gpu.py 2>&1 | tee "$OUT/bench_gpu.log"
