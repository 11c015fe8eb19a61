#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a lent H100/H200 (torch preinstalled):
#   make gpu-check        (full, about 6-8 min)   make gpu-check-quick   (about 3-4 min)
# full:  build for sm_90a; tests/test_cuda.py and tests/test_norm_rope.py on the GPU;
#        benchmarks/bench_gpu.py with the peers, the launch-threshold sweep and the per-call
#        table, and benchmarks/bench_norm_rope.py (the fused QK-norm); compute-sanitizer
#        memcheck and racecheck on a reduced set; export and AOTInductor on CUDA.
#        (In that order: if the call runs out of time, the figures are already in $OUT.)
# quick: build; tests/test_cuda.py; rope_ext against a device copy (bench_gpu.py --quick).
# Logs, a markdown table and JSON land in $OUT (default ./gpu-out; at most 8 files, the
# device call's limit); a summary prints last.
# Without a GPU it stops at once. Carried wheels (.whl/, `make gpu-wheels`) are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo "=== $* ($(date +%T), ${SECONDS}s)"; }

# Fail fast and clearly where there is no GPU; never wait on a missing driver.
if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False or torch is missing);"
  echo "gpu-check: run it on a GPU machine (the device tool), not here."
  exit 2
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "build for sm_90a"
# Only the Hopper target, the default CPU kernel (the tests compare against it), all cores.
# Built in a copy without pyproject.toml: the image's setuptools may predate the
# license syntax there, and build_ext needs none of the project metadata.
build_dir=$(mktemp -d)
cp -r setup.py csrc "$build_dir"/
if ! (cd "$build_dir" && TORCH_CUDA_ARCH_LIST=9.0a ROPE_EXT_CUDA=1 ROPE_EXT_CPU_ISAS=default \
      "$PY" setup.py -q build_ext -b out -t tmp) > "$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -30
  note "build: FAILED (see $OUT/build.log)"; exit 1
fi
cp "$build_dir"/out/rope_ext/_C*.so "$build_dir"/out/rope_ext/_build_info.py rope_ext/
"$PY" - <<'PY' | tee -a "$SUMMARY"
import torch, rope_ext
p = torch.cuda.get_device_properties(0)
print(f"card: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
note "build: ok after ${SECONDS}s"

step "CUDA tests on the GPU"
ROPE_TEST_DEVICE=cuda timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  > "$OUT/test_cuda.log" 2>&1
note "tests/test_cuda.py on the GPU (exit $?): $(tail -1 "$OUT/test_cuda.log")"
grep -E "^(FAILED|ERROR)" "$OUT/test_cuda.log" | head -20
# The fused QK-norm + RoPE on the GPU, logged into the same file (the device call returns
# at most 8 files).
ROPE_TEST_DEVICE=cuda timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_norm_rope.py \
  > /tmp/test_norm_rope.log 2>&1
rc=$?
{ echo "=== tests/test_norm_rope.py (exit $rc)"; cat /tmp/test_norm_rope.log; } >> "$OUT/test_cuda.log"
note "tests/test_norm_rope.py on the GPU (exit $rc): $(tail -1 /tmp/test_norm_rope.log)"
grep -E "^(FAILED|ERROR)" /tmp/test_norm_rope.log | head -20

step "GPU benchmark"
bench_args="--out $OUT"
[ "$MODE" = full ] && bench_args="$bench_args --sweep" || bench_args="$bench_args --quick"
timeout 240 "$PY" benchmarks/bench_gpu.py $bench_args > "$OUT/bench_gpu.log" 2>&1
note "bench_gpu.py (exit $?)"
# The fused QK-norm rows (Qwen3-8B shapes, bf16, s=4096), into the same log.
timeout 150 "$PY" benchmarks/bench_norm_rope.py --device cuda >> "$OUT/bench_gpu.log" 2>&1
note "bench_norm_rope.py (exit $?): $(grep -E "goal" "$OUT/bench_gpu.log" | tr '\n' ' ')"

if [ "$MODE" = full ]; then
  # A reduced matrix: each launch is slow under the sanitizer.
  subset="launch_plans and (bf16 or fp32) or misaligned or outside or fused or 64_bit or replay or stream"
  norm_subset="test_dtypes and x_bfloat16 and bshd or backward_matches or layouts_tables_pairings and fused and interleaved"
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    ROPE_TEST_DEVICE=cuda timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "$subset" \
      > "/tmp/sanitizer_$tool.log" 2>&1 &&
    ROPE_TEST_DEVICE=cuda timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_norm_rope.py -k "$norm_subset" \
      >> "/tmp/sanitizer_$tool.log" 2>&1
    rc=$?
    # One file for both tools: the device call returns at most 8 files from $OUT.
    { echo "=== $tool (exit $rc)"; cat "/tmp/sanitizer_$tool.log"; } >> "$OUT/sanitizer.log"
    note "compute-sanitizer $tool (exit $rc): $(grep -E "ERROR SUMMARY" "/tmp/sanitizer_$tool.log" | tail -1) $(grep -E "passed|failed" "/tmp/sanitizer_$tool.log" | tail -1)"
  done
fi

if [ "$MODE" = full ]; then
  step "export and AOTInductor on CUDA"
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_export.py -k cuda \
    > "$OUT/test_export.log" 2>&1
  note "tests/test_export.py on CUDA (exit $?): $(tail -1 "$OUT/test_export.log")"
fi

step "summary"
cat "$OUT/bench_gpu.md" 2>/dev/null || tail -20 "$OUT/bench_gpu.log"
echo
cat "$SUMMARY"
echo "gpu-check ($MODE) done in ${SECONDS}s"
