#!/usr/bin/env bash
# One-shot GPU check for council-fast (one call of at most 10 minutes on one GPU; no network, no pip index).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--deadline SECONDS]     # everything goes under $OUT (default ./gpu_out)
#
# --deadline (or GPU_CHECK_DEADLINE; default 540): seconds from the start by which the script has exited, with
# the summary and the packed logs written. Pass a little less than the device tool's own timeout. The last
# GPU_CHECK_RESERVE seconds (default 30) are kept for the summary and the packing: every stage's limit is cut
# to end before them, and a TERM or INT (the device timeout) still writes both before exiting.
# --dry-run (CI, no GPU): walks every stage with the same stage logic, limits, splitting and packing, each
# command replaced by a stand-in that prints it (and sleeps GPU_CHECK_DRY_SLEEP seconds, default 0).
#
# Stages (each runs even when an earlier one failed; the exit status is 1 when any failed):
#   1. environment: card, driver, versions, date, `command -v nvcc` and the CUDA root (CUDA_HOME, found from
#      the real nvcc behind any wrapper script: torch's guess from a wrapper cannot link -lcudart)
#   2. build_cuda_extension: the CUDA extension (csrc/*_cuda.cu) built once, timed. A failed or stopped build
#      is recorded in the build folder: later processes fail at once with that error instead of building
#      again, and the stages that need the cuda back-end are skipped.
#   3. tests_fused_ops / tests_gpu_marked: the GPU parity tests, split into GPU_CHECK_JOBS pytest processes
#      run side by side (a cold Triton cache means ~70 kernel compiles, ~210 s on one core), one junit file
#      per process. A stage at its limit gets SIGINT first (pytest then writes its junit file), KILL 10 s later.
#   4-5. benchmarks and `parity --device cuda`, the issues' target measurements first
#   6. summary.md: the stages, the test counts from the junit files and one table of every benchmark row
# The device tool brings back at most 8 files: $OUT holds summary.md and gpu_check_logs.tar.gz (everything
# else, packed). PyYAML, Pillow and tqdm, when missing, are installed from benchmarks/wheels (cp312) into a
# folder on PYTHONPATH: nothing is fetched.
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
DEADLINE="${GPU_CHECK_DEADLINE:-540}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --deadline) DEADLINE="$2"; shift ;;
    --deadline=*) DEADLINE="${1#*=}" ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
RESERVE="${GPU_CHECK_RESERVE:-30}"
JOBS="${GPU_CHECK_JOBS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
KILL_GRACE=10
BUILD_TIMEOUT="${BUILD_TIMEOUT:-240}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
FINAL_OUT="${OUT:-./gpu_out}"
mkdir -p "$FINAL_OUT"
FINAL_OUT="$(cd "$FINAL_OUT" && pwd)"
OUT="$FINAL_OUT/raw"
rm -rf "$OUT"
mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/council_fast_extensions}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET COUNCIL_FAST_BACKEND COUNCIL_FAST_STRICT
PY="${PYTHON:-python3}"
START=$SECONDS
FAILED=()
STATUS_LOG="$OUT/stages.txt"
: > "$STATUS_LOG"
STAGE_PIDS=()
FINISHED=0
CUDA_BUILD_OK=1

left() { echo $((DEADLINE - RESERVE - (SECONDS - START))); }
note() { echo "$*" | tee -a "$STATUS_LOG"; }

# ---------------------------------------------------------------------------------------------------------
# Summary and packing: always, once, on exit or on TERM/INT.
summarise() {
  "$PY" - "$OUT" "$DRY_RUN" <<'EOF' > "$OUT/summary.md" 2>&1
import glob, json, os, sys
import xml.etree.ElementTree as ET
out, dry = sys.argv[1], sys.argv[2] == "1"
def read(name):
    path = os.path.join(out, name)
    return open(path).read().strip() if os.path.exists(path) else "(missing)"
print("# council-fast GPU check" + (" (dry run: no command ran)" if dry else "") + "\n")
print("```\n" + read("environment.txt") + "\n```\n")
print("## Stages\n\n```\n" + read("stages.txt") + "\n```\n")
rows = []
for path in sorted(glob.glob(os.path.join(out, "*.xml"))):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        rows.append(f"| {os.path.basename(path)} | unreadable: {e} | | | | |")
        continue
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s
              if c.find("failure") is not None or c.find("error") is not None]
    rows.append(f"| {os.path.basename(path)} | {n['tests']} | {n['failures']} | {n['errors']} | {n['skipped']} | "
                f"{', '.join(failed)[:400]} |")
if rows:
    print("## Tests (junit files)\n\n| file | tests | failures | errors | skipped | failed |\n|---|---|---|---|---|---|")
    print("\n".join(rows) + "\n")
print("## benchmarks (bench convert at 256x256, bench ops; median ms per call)\n")
print("| run | what | precision | batch | engine | status | median ms | img/s | speedup vs eager | max rel diff | peak MiB | launches per call |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
def f(v, fmt):
    return "" if v is None else format(v, fmt)
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        report = json.load(open(path))
        s = report["settings"]
        for r in report["results"]:
            status = r["status"] + (f" ({r['reason'][:80]})" if r.get("reason") and r["status"] != "ok" else "")
            print(f"| {os.path.basename(path)[6:-5]} | {r['name']} | {s['precision']} | {s['batch']} | {r['engine']} | "
                  f"{status} | {f(r['median_ms'], '.3f')} | {f(r['img_per_s'], '.0f')} | {f(r['speedup'], '.2f')} | "
                  f"{f(r['max_rel_diff'], '.2e')} | {f(r['peak_mem_mib'], '.0f')} | "
                  f"{f(r.get('launches'), 'd')} {r.get('launch_unit') or ''} |")
    except (ValueError, KeyError, TypeError) as e:
        print(f"| {os.path.basename(path)} | unreadable: {e} | | | | | | | | | | |")
EOF
}

finish() {
  [ "$FINISHED" -eq 1 ] && return
  FINISHED=1
  trap '' TERM INT
  local pid
  for pid in "${STAGE_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null; done
  [ ${#STAGE_PIDS[@]} -gt 0 ] && { sleep 2; for pid in "${STAGE_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done; }
  summarise
  cat "$OUT/summary.md"
  cp "$OUT/summary.md" "$FINAL_OUT/summary.md"
  tar czf "$FINAL_OUT/gpu_check_logs.tar.gz" -C "$FINAL_OUT" raw && rm -rf "$OUT"
  local list
  list=$(printf '%s ' "${FAILED[@]}" | xargs)
  echo
  echo "gpu_check: $((SECONDS - START)) s; outputs in $FINAL_OUT"
  if [ -n "$list" ]; then
    echo "gpu_check: FAILED stages: $list"
    exit 1
  fi
  echo "gpu_check: all stages passed"
  exit 0
}
on_signal() {
  note "STOPPED  by SIG$1 after $((SECONDS - START))s (the remaining stages did not run)"
  FAILED+=("stopped-by-SIG$1")
  finish
}
trap finish EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# ---------------------------------------------------------------------------------------------------------
# Stages.
# start_stage NAME LIMIT LOG CMD...: starts CMD in the background under its limit; the pid is appended to
# STAGE_PIDS. SIGINT at the limit (pytest writes its junit file, a build records its failure), KILL later.
start_stage() {
  local name="$1" limit="$2" log="$3"
  shift 3
  if [ "$DRY_RUN" -eq 1 ]; then
    set -- bash -c 'echo "dry run: would run (limit $0 s): ${*@Q}"; sleep "${GPU_CHECK_DRY_SLEEP:-0}"' "$limit" "$@"
  fi
  timeout -s INT -k "$KILL_GRACE" "$limit" "$@" > "$log" 2>&1 &
  STAGE_PIDS+=($!)
}

# stage_limit LIMIT: the limit cut so that the stage (and its kill grace) ends before the reserve.
stage_limit() {
  local limit="$1" remaining
  remaining=$(( $(left) - KILL_GRACE ))
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "$limit"
}

# wait_stage NAME T0: waits for every pid in STAGE_PIDS and records the stage's outcome.
wait_stage() {
  local name="$1" t0="$2" rc worst=0 pid
  for pid in "${STAGE_PIDS[@]}"; do
    wait "$pid"
    rc=$?
    [ $rc -eq 0 ] && continue
    # 124: stopped at the limit (INT); 137: killed after the grace
    if [ $rc -eq 124 ] || [ $rc -eq 137 ] || [ $worst -eq 0 ]; then worst=$rc; fi
  done
  STAGE_PIDS=()
  local took=$((SECONDS - t0))
  if [ $worst -eq 0 ]; then
    note "OK       $name (${took}s)"
    return 0
  fi
  if [ $worst -eq 124 ] || [ $worst -eq 137 ]; then note "TIMEOUT  $name after ${took}s (rc $worst)"
  else note "FAILED   $name rc=$worst (${took}s)"; fi
  FAILED+=("$name")
  return 1
}

# deadline_allows NAME: false (and the stage noted as skipped) when the deadline is too near to start it.
deadline_allows() {
  if [ $(( $(left) - KILL_GRACE )) -lt 10 ]; then
    note "SKIPPED  $1 (deadline near)"
    FAILED+=("$1(skipped)")
    return 1
  fi
}

# stage NAME LIMIT CMD...: one process.
stage() {
  local name="$1" limit
  limit=$(stage_limit "$2")
  shift 2
  deadline_allows "$name" || return 1
  echo "=== $name (limit ${limit}s, $(left)s left before the reserve)"
  local t0=$SECONDS
  start_stage "$name" "$limit" "$OUT/$name.log" "$@"
  wait_stage "$name" "$t0"
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  return $rc
}

# skip NAME WHY
skip() { note "SKIPPED  $1 ($2)"; }

# pytest_stage NAME LIMIT PYTEST-ARGS...: the selected tests split over $JOBS pytest processes run side by
# side, one log and one junit file each. Collection runs for real also in a dry run (CPU only).
pytest_stage() {
  local name="$1" limit
  limit=$(stage_limit "$2")
  shift 2
  deadline_allows "$name" || return 1
  echo "=== $name (limit ${limit}s, $JOBS processes, $(left)s left before the reserve)"
  local t0=$SECONDS ids="$OUT/$name.ids"
  # in the background, so that a TERM or INT is handled at once (bash runs traps between commands)
  timeout -s INT -k "$KILL_GRACE" "$limit" "$PY" -m pytest --collect-only -q -p no:cacheprovider "$@" \
    > "$ids.log" 2>&1 &
  STAGE_PIDS=($!)
  wait "${STAGE_PIDS[0]}"
  STAGE_PIDS=()
  grep '::' "$ids.log" > "$ids"
  local count
  count=$(wc -l < "$ids")
  if [ "$count" -eq 0 ]; then
    note "OK       $name (no test selected here, $((SECONDS - t0))s)"
    return 0
  fi
  limit=$(stage_limit "$limit")
  local jobs=$JOBS k
  [ "$count" -lt "$jobs" ] && jobs=$count
  for k in $(seq 0 $((jobs - 1))); do
    # round robin over the collected order: the slow (Triton-compiling) tests of each file spread out
    mapfile -t part < <(awk -v k="$k" -v n="$jobs" '(NR - 1) % n == k' "$ids")
    start_stage "$name.$k" "$limit" "$OUT/$name.$k.log" "$PY" -m pytest -q -rs -p no:cacheprovider \
      --junitxml="$OUT/$name.$k.xml" "${part[@]}"
  done
  wait_stage "$name" "$t0"
  local rc=$?
  tail -n 3 "$OUT/$name".*.log
  return $rc
}

# ---------------------------------------------------------------------------------------------------------
# Set-up: the CUDA root behind any nvcc wrapper, and PyYAML / Pillow / tqdm from the carried wheels.

# find_cuda_home: the CUDA root holding the real nvcc and lib64/libcudart.so (empty if none).
find_cuda_home() {
  local nvcc candidates=() c
  [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
  nvcc=$(command -v nvcc 2>/dev/null)
  if [ -n "$nvcc" ]; then
    nvcc=$(readlink -f "$nvcc")
    candidates+=("$(dirname "$(dirname "$nvcc")")")
    # a wrapper script (exec /usr/local/cuda-13.0/bin/nvcc "$@"): the nvcc paths it names
    if head -c 2 "$nvcc" | grep -q '#!'; then
      while read -r c; do candidates+=("$(dirname "$(dirname "$(readlink -f "$c")")")"); done \
        < <(grep -o '/[^ "'"'"']*/bin/nvcc' "$nvcc")
    fi
  fi
  candidates+=(/usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV))
  for c in "${candidates[@]}"; do
    if [ -x "$c/bin/nvcc" ] && ! head -c 2 "$c/bin/nvcc" | grep -q '#!' \
       && compgen -G "$c/lib64/libcudart.so*" > /dev/null; then
      echo "$c"
      return
    fi
  done
}

setup_environment() {
  local cuda_home
  cuda_home=$(find_cuda_home)
  echo "command -v nvcc: $(command -v nvcc 2>/dev/null || echo 'not found')"
  if [ -n "$cuda_home" ]; then
    export CUDA_HOME="$cuda_home"
    export PATH="$CUDA_HOME/bin:$PATH"
    echo "CUDA_HOME: $CUDA_HOME (real nvcc $CUDA_HOME/bin/nvcc, $(ls "$CUDA_HOME"/lib64/libcudart.so | head -n 1))"
  else
    echo "CUDA_HOME: not found (no CUDA root with bin/nvcc and lib64/libcudart.so): the cuda extension cannot build"
  fi
  local missing=() module
  for module in yaml PIL tqdm; do "$PY" -c "import $module" 2>/dev/null || missing+=("$module"); done
  if [ ${#missing[@]} -gt 0 ]; then
    local site="${TMPDIR:-/tmp}/council_fast_gpu_check_site"
    echo "missing ${missing[*]}: installing benchmarks/wheels into $site (no index)"
    "$PY" -m pip install -q --no-index --no-deps --target "$site" benchmarks/wheels/*.whl 2>&1 | tail -n 3
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
}

# ---------------------------------------------------------------------------------------------------------
# 1. environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname), $(nproc) cores; deadline ${DEADLINE}s (reserve ${RESERVE}s); $JOBS test processes"
  [ "$DRY_RUN" -eq 1 ] && echo "DRY RUN: every stage below is a stand-in"
  setup_environment
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  "${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>&1 | tail -n 2 || echo "nvcc not found"
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
EOF
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
# the exports of setup_environment ran in the block's subshell: run it again here (quietly)
setup_environment > /dev/null

# 2. the CUDA extension, once. SIGINT (the stage limit) becomes an error, so the build records it as failed.
stage build_cuda_extension "$BUILD_TIMEOUT" "$PY" -c "
import signal, time
def stopped(*_):
    raise RuntimeError('the build was stopped at gpu_check\'s stage limit (${BUILD_TIMEOUT} s)')
signal.signal(signal.SIGINT, stopped)
from council_fast.ops import load_extension
t = time.time()
load_extension('cuda', verbose=True)
print(f'cuda extension built/loaded in {time.time() - t:.1f} s')
" || CUDA_BUILD_OK=0

# 3. parity tests on the GPU (a failed build makes the cuda cases fail at once with the recorded error)
pytest_stage tests_fused_ops "$TEST_TIMEOUT" tests/test_op_decoder_tail.py tests/test_op_adain.py \
  tests/test_fast_generator.py -k "cuda or triton"
# every other test marked gpu
pytest_stage tests_gpu_marked "$TEST_TIMEOUT" -m gpu tests --deselect tests/test_op_decoder_tail.py \
  --deselect tests/test_op_adain.py --deselect tests/test_fast_generator.py

# 4-5. benchmarks, in the order the issues' targets need them (a stage that does not fit the deadline is
# skipped, so the target measurements come first): conversion bf16 at batch 32 (throughput target,
# with torch.compile in the same run), the training step at the official default (time and memory
# targets) and fused-vs-reference training parity, conversion bf16 at batch 1 (latency target), the
# training throughput at batch 32, then the fp32, batch-64, Triton and per-op tables.
bench() {  # bench NAME PRECISION BATCH REPEATS EXTRA...
  local name="$1" precision="$2" batch="$3" repeats="$4"
  shift 4
  stage "bench_$name" 120 "$PY" -m council_fast bench convert --device cuda --precision "$precision" \
    --batch "$batch" --size 256 --repeats "$repeats" --warmup 3 --json "$OUT/bench_$name.json" "$@"
}
bench bf16_b32 bf16 32 10
stage bench_train_fp32 150 "$PY" -m council_fast bench train --device cuda --config selfie2anime --batch 3 \
  --size 128 --repeats 10 --warmup 3 --json "$OUT/bench_train_fp32.json"
stage parity_train "$TEST_TIMEOUT" "$PY" -m council_fast parity --device cuda
bench bf16_b1 bf16 1 30 --no-compile
# throughput (issue: >= 250 training img/s at 128x128, the largest batch that fits)
stage bench_train_bf16_b32 120 "$PY" -m council_fast bench train --device cuda --config selfie2anime --batch 32 \
  --size 128 --precision bf16 --repeats 5 --warmup 2 --json "$OUT/bench_train_bf16_b32.json"
bench fp32_b1 fp32 1 30 --no-compile
bench fp32_b32 fp32 32 10 --no-compile
bench bf16_b64 bf16 64 5 --no-compile
bench bf16_b32_triton bf16 32 10 --no-compile --backend triton
bench fp32_b64 fp32 64 5 --no-compile
# per-op timings (AdaIN, instance norm, decoder tail; fwd and fwd+bwd) for the two GPU back-ends
for backend in cuda triton; do
  if [ "$backend" = cuda ] && [ "$CUDA_BUILD_OK" -eq 0 ]; then
    skip bench_ops_cuda "the cuda extension did not build"
    continue
  fi
  stage "bench_ops_$backend" 90 "$PY" -m council_fast bench ops --device cuda --precision bf16 --repeats 10 \
    --warmup 3 --backend "$backend" --json "$OUT/bench_ops_$backend.json"
done

# 6. summary and packing (the EXIT trap)
finish
