#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a lent H100/H200 (torch preinstalled):
#   make gpu-check (full, at most GPU_CHECK_BUDGET=480 s)   make gpu-check-quick   (3-4 min)
# full:  build for sm_90a; tests/test_cuda.py and tests/test_norm_rope.py on the GPU;
#        benchmarks/bench_gpu.py (the peers and the per-call table) and
#        benchmarks/bench_norm_rope.py (the fused QK-norm, then its launch settings);
#        compute-sanitizer memcheck and racecheck on a reduced set; the launch-threshold
#        sweep; export and AOTInductor on CUDA. (In that order: if the call runs out of
#        time, the figures are already in $OUT.)
# quick: build; tests/test_cuda.py; rope_ext against a device copy (bench_gpu.py --quick).
# confirm: full without the benchmark table (a second call, after fixes: tests, sanitizer,
#        sweep, export). Every step's timeout is capped by GPU_CHECK_BUDGET (seconds).
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
# The device call's limit: every step's timeout is capped by what is left of BUDGET seconds
# (default 480: a first call of about 8 minutes leaves device time for a confirming call).
BUDGET=${GPU_CHECK_BUDGET:-480}
# GPU_CHECK_SKIP: steps to leave out (norm_bench, sanitizer, sweep, export), e.g. in a
# second call that has already seen them.
skip() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]]; }
cap() {  # cap SECONDS: the smaller of SECONDS and what is left of the budget (at least 1)
  local left=$((BUDGET - SECONDS))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
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
# Two copies of libstdc++ in one process crash the first number a stream formats (seen on
# this image): the library must import libstdc++, not hold its own.
so=$(ls rope_ext/_C*.so)
note "link: $(readelf -d "$so" | grep -o 'libstdc++[^]]*' | head -1 || true) needed; libstdc++ locale code defined inside: $(nm -D --defined-only "$so" | grep -c '_ZNSt6locale' || true) symbols; LDSHARED=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('LDSHARED'))"); LDFLAGS=${LDFLAGS:-}"

step "CUDA tests on the GPU"
# With pytest-xdist (the GPU image has it), 8 workers: faster, and a test that crashes its
# process is reported as a failure while the others still run.
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
tests="tests/test_cuda.py tests/test_norm_rope.py"
[ "$MODE" = quick ] && tests="tests/test_cuda.py"
ROPE_TEST_DEVICE=cuda timeout $(cap 150) "$PY" -m pytest -q -p no:cacheprovider $xdist $tests \
  > "$OUT/test_cuda.log" 2>&1
note "$tests on the GPU (exit $?): $(tail -1 "$OUT/test_cuda.log")"
grep -E "^(FAILED|ERROR)" "$OUT/test_cuda.log" | head -20

if [ "$MODE" != confirm ]; then
  step "GPU benchmark"
  bench_args="--out $OUT"
  [ "$MODE" = full ] || bench_args="$bench_args --quick"
  timeout $(cap 200) "$PY" benchmarks/bench_gpu.py $bench_args > "$OUT/bench_gpu.log" 2>&1
  note "bench_gpu.py (exit $?)"
  if [ "$MODE" = full ] && ! skip norm_bench; then
    # The fused QK-norm rows (Qwen3-8B shapes, bf16, s=4096), into the same log.
    timeout $(cap 100) "$PY" benchmarks/bench_norm_rope.py --device cuda >> "$OUT/bench_gpu.log" 2>&1
    note "bench_norm_rope.py (exit $?): $(grep -E "goal" "$OUT/bench_gpu.log" | tr '\n' ' ')"
    # The fused kernel under each launch setting (a few seconds): which plan to make default.
    timeout $(cap 60) "$PY" benchmarks/bench_norm_rope.py --device cuda --sweep \
      >> "$OUT/bench_gpu.log" 2>&1
    note "bench_norm_rope.py --sweep (exit $?): in $OUT/bench_gpu.log"
  fi
fi

if [ "$MODE" != quick ] && ! skip sanitizer; then
  # A reduced matrix: each launch is slow under the sanitizer.
  subset="launch_plans and bf16 and full or misaligned or outside or 64_bit or replay or stream or qk_fused_and_inplace"
  norm_subset="backward_matches or op_rstd or layouts_tables_pairings and fused and interleaved and bshd"
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    ROPE_TEST_DEVICE=cuda timeout $(cap 60) compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "$subset" \
      > "/tmp/sanitizer_$tool.log" 2>&1 &&
    ROPE_TEST_DEVICE=cuda timeout $(cap 60) compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_norm_rope.py -k "$norm_subset" \
      >> "/tmp/sanitizer_$tool.log" 2>&1
    rc=$?
    # One file for both tools: the device call returns at most 8 files from $OUT.
    { echo "=== $tool (exit $rc)"; cat "/tmp/sanitizer_$tool.log"; } >> "$OUT/sanitizer.log"
    note "compute-sanitizer $tool (exit $rc): $(grep -E "ERROR SUMMARY" "/tmp/sanitizer_$tool.log" | tail -1) $(grep -E "passed|failed" "/tmp/sanitizer_$tool.log" | tail -1)"
  done
fi

if [ "$MODE" != quick ] && ! skip sweep; then
  # The launch-threshold sweep last: the table above already holds the default's figures.
  step "launch-threshold sweep"
  { echo "=== launch-threshold sweep"; timeout $(cap 120) "$PY" benchmarks/bench_gpu.py --sweep; } \
    >> "$OUT/bench_gpu.log" 2>&1
  note "sweep (exit $?): in $OUT/bench_gpu.log"
fi
if [ "$MODE" != quick ] && ! skip export; then
  step "export and AOTInductor on CUDA"
  timeout $(cap 90) "$PY" -m pytest -q -p no:cacheprovider tests/test_export.py -k cuda \
    > "$OUT/test_export.log" 2>&1
  note "tests/test_export.py on CUDA (exit $?): $(tail -1 "$OUT/test_export.log")"
fi

step "summary"
cat "$OUT/bench_gpu.md" 2>/dev/null || tail -20 "$OUT/bench_gpu.log"
echo
cat "$SUMMARY"
echo "gpu-check ($MODE) done in ${SECONDS}s"
