#!/usr/bin/env bash
# gpu_run.sh -- the one script to run on the GPU machine (from anywhere; it works in the repository root).
#
#   build    (always) the library with CMake (FDMA_CUDA_ARCHS=90, -j16, tests off) and, side by side, the three
#            standalone harnesses: every src/cuda/*.cu and tests/cuda/test_*.cu compiled by its own nvcc
#            (xargs -P16; -O3 --use_fast_math, sm_90; bwd_wgmma*.cu sm_90a), src/cuda objects put in one archive, each harness linked
#            against it (the linker takes only the members it needs: test_fwd = fwd*.cu + api_cuda.cu,
#            test_bwd = bwd*.cu, test_topk = topk*.cu)
#   test     test_fwd, test_bwd, test_topk (--no-timing when cbench runs: its timing runs there, on an idle GPU)
#   sanitize compute-sanitizer memcheck on test_fwd --small, test_bwd --small, test_topk --tiny --few
#   pytest   pytest -m gpu tests/python -q --timeout 120 (FDMA_LIBRARY = the built library)
#            test, sanitize and pytest are correctness runs: they run concurrently, each under its own timeout
#   cbench   C-level timings, one at a time: test_fwd --bench, test_bwd --bench, test_topk --timing-only
#   pybench  bench/bench.py --budget-s (what is left of the deadline), alone on the GPU
#   ncu      (not by default) one launch of the dense Sk=16K forward kernel under Nsight Compute
# Every stage runs under `timeout`; a failing stage never stops the next; the whole run keeps inside
# FDMA_DEADLINE_S (default 490 s from the start). A summary is printed last.
#
# Files in $OUT (default ./gpu_out), 7 at most: run.log (environment, build, stage times, summary), tests.log,
# memcheck.log, pytest.log, bench.log (cbench + bench.py output), bench.json, bench.png.
#
#   bash bench/gpu_run.sh                       build + test sanitize pytest cbench pybench
#   bash bench/gpu_run.sh test pybench          build + only those stages
#   FDMA_CUDA_DEFS="-DFDMA_FWD_KPREFETCH=0"     extra nvcc flags for harnesses and library
#   FDMA_BENCH_ARGS="--quick"                   extra bench.py arguments;  FDMA_DEADLINE_S=540  a longer run
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
T0=$(date +%s)
DEADLINE=${FDMA_DEADLINE_S:-490}
STAGES=${*:-"test sanitize pytest cbench pybench"}
NJ=16
PY=${PYTHON:-python3}
BUILD=/tmp/fdma_build
TB=/tmp/fdma_harness
L=/tmp/fdma_logs
ARCH="-gencode arch=compute_90,code=sm_90"
DEFS=${FDMA_CUDA_DEFS:-}
RUNLOG=$OUT/run.log
rm -rf "$TB" "$L"
mkdir -p "$TB/obj" "$L"
has() { [[ " $STAGES " == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - $(elapsed) )); }
# lim NOMINAL RESERVE: NOMINAL capped so that RESERVE seconds stay before the deadline; 0 = no time for it
lim() { local n=$1 l; l=$(( $(left) - ${2:-0} )); (( l < n )) && n=$l; (( n < 10 )) && n=0; echo "$n"; }
log() { echo "$*" | tee -a "$RUNLOG"; }
# job NAME LIMIT CMD...: run CMD under timeout in the background; output in $L/NAME.log, "rc seconds" in NAME.rc
job() {
    local name=$1 t=$2; shift 2
    if (( t <= 0 )); then echo "skipped: no time left before the deadline" > "$L/$name.log"; echo "skip 0" > "$L/$name.rc"; return; fi
    ( s=$(date +%s); timeout -k 5 "$t" "$@" > "$L/$name.log" 2>&1; echo "$? $(( $(date +%s) - s ))" > "$L/$name.rc" ) &
}
rcof() { [ -f "$L/$1.rc" ] && cat "$L/$1.rc" || echo "- 0"; }
state() {  # "rc=0 12 s" / "TIMEOUT 90 s" / "not run"
    local r; r=$(rcof "$1"); set -- $r
    case $1 in -) echo "not run";; skip) echo "skipped (deadline)";; 124|137) echo "TIMEOUT after $2 s";; *) echo "rc=$1 $2 s";; esac
}
section() { for n in "$@"; do echo "==== $n ($(state "$n")) ===="; cat "$L/$n.log" 2>/dev/null; echo; done; }

{ echo "gpu_run.sh: stages '$STAGES', deadline ${DEADLINE} s, $(date -u)"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  nvcc --version | tail -1; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  echo "FDMA_CUDA_DEFS=$DEFS  git: $(git rev-parse --short HEAD 2>/dev/null) + $(git status --porcelain 2>/dev/null | wc -l) changed/untracked"; } > "$RUNLOG" 2>&1
cat "$RUNLOG"

# ---- build: harness objects (one nvcc per file) and the library (cmake), side by side ----
t=$(date +%s)
export TB ARCH DEFS
compile_one() {  # $1 = a .cu file; object named after its path: src_cuda_fwd_d128.o, tests_cuda_test_fwd.o
    local f=$1 o extra="" arch=$ARCH
    o=$TB/obj/$(echo "${f%.cu}" | tr '/' '_').o
    case $f in *test_topk.cu) extra="-Xcompiler -fopenmp";; *bwd_wgmma*.cu) arch="-gencode arch=compute_90a,code=sm_90a";; esac
    if nvcc -c -O3 --use_fast_math -std=c++17 $arch $DEFS -DFDMA_HAVE_WGMMA=1 $extra -Iinclude -Isrc -Xptxas -warn-spills "$f" -o "$o" \
        > "$o.log" 2>&1; then echo "ok   $f"; else echo "FAIL $f"; fi
    cat "$o.log"
}
export -f compile_one
( ls src/cuda/*.cu tests/cuda/test_*.cu | timeout -k 10 240 xargs -P "$NJ" -I{} bash -c 'compile_one {}'
  rm -f "$TB/libfdmacu.a"; ar rcs "$TB/libfdmacu.a" "$TB"/obj/src_cuda_*.o
  for h in fwd bwd topk; do
      x=""; [ $h = topk ] && x="-Xcompiler -fopenmp -lgomp"
      if [ -f "$TB/obj/tests_cuda_test_$h.o" ] && nvcc $ARCH "$TB/obj/tests_cuda_test_$h.o" "$TB/libfdmacu.a" $x -o "$TB/test_$h"; then
          echo "linked test_$h"; else echo "LINK FAILED test_$h"; fi
  done ) > "$L/build_harness.log" 2>&1 &
PH=$!
GEN=""; command -v ninja > /dev/null && GEN="-G Ninja"
( timeout -k 10 240 cmake -S . -B "$BUILD" $GEN -DCMAKE_BUILD_TYPE=Release -DFDMA_CUDA_ARCHS=90 -DFDMA_WITH_CUDA=ON \
      -DFDMA_BUILD_TESTS=OFF "-DCMAKE_CUDA_FLAGS=$DEFS" \
  && timeout -k 10 240 cmake --build "$BUILD" -j "$NJ" --target flashdma ) > "$L/build_lib.log" 2>&1 &
PL=$!
wait $PH
wait $PL; RL=$?
LIB=$BUILD/libflashdma.so
[ $RL -ne 0 ] && rm -f "$LIB"      # a stale library from an earlier run must not be tested
NOBJ_OK=$(grep -c '^ok ' "$L/build_harness.log"); NOBJ_FAIL=$(grep -c '^FAIL ' "$L/build_harness.log")
BUILD_LINE="build $(( $(date +%s) - t )) s: library rc=$RL; harness objects $NOBJ_OK ok, $NOBJ_FAIL failed; $(grep -E '^(linked|LINK FAILED)' "$L/build_harness.log" | tr '\n' ' ')"
{ echo "==== build: harnesses ===="; cat "$L/build_harness.log"; echo "==== build: library (rc=$RL) ===="; cat "$L/build_lib.log"; } >> "$RUNLOG"
MISSING=""
if [ -f "$LIB" ]; then
    MISSING=$(nm -D --undefined-only "$LIB" | awk '{print $2}' | grep '^fdma_' | tr '\n' ' ')
    [ -n "$MISSING" ] && BUILD_LINE="$BUILD_LINE library LACKS: $MISSING"
fi
log "$BUILD_LINE"
[ $RL -ne 0 ] && { grep -E "error|Error" "$L/build_lib.log" | head -15; }
[ "$NOBJ_FAIL" != 0 ] && { grep -E "error" "$L/build_harness.log" | head -15; }

# ---- correctness, concurrently: harnesses, memcheck, pytest ----
RES=0; has cbench && RES=40; has pybench && RES=200   # seconds kept for the timing stages after this phase
PYENV=(env FDMA_LIBRARY="$LIB" PYTHONPATH="$ROOT/python" PYTHONUNBUFFERED=1)
t=$(date +%s)
TOPK_ARGS=""; has cbench && TOPK_ARGS="--no-timing"
if has test; then
    [ -x "$TB/test_fwd" ] && job test_fwd "$(lim 150 $RES)" "$TB/test_fwd"
    [ -x "$TB/test_bwd" ] && job test_bwd "$(lim 150 $RES)" "$TB/test_bwd"
    [ -x "$TB/test_topk" ] && job test_topk "$(lim 180 $RES)" env OMP_NUM_THREADS=6 "$TB/test_topk" $TOPK_ARGS
fi
if has sanitize; then
    MC=(compute-sanitizer --tool memcheck --leak-check no --print-limit 20)
    [ -x "$TB/test_fwd" ] && job mc_fwd "$(lim 90 $RES)" "${MC[@]}" "$TB/test_fwd" --small
    [ -x "$TB/test_bwd" ] && job mc_bwd "$(lim 90 $RES)" "${MC[@]}" "$TB/test_bwd" --small
    [ -x "$TB/test_topk" ] && job mc_topk "$(lim 90 $RES)" env OMP_NUM_THREADS=4 "${MC[@]}" "$TB/test_topk" --tiny --few --no-timing
    # the top-k window paths (sparse forward + sparse backward kernels, D64 mma.sync and D128 wgmma; deterministic
    # sparse) through the package
    [ -f "$LIB" ] && job mc_sparse "$(lim 180 $RES)" "${PYENV[@]}" "${MC[@]}" $PY -m pytest -q -p no:cacheprovider \
        "tests/python/test_sparse.py::test_fused_equals_dense_mask_path[bfloat16-B2-H8-Hkv2-bkv-m-Sq77-Sk300-D64-w1-randn]" \
        "tests/python/test_sparse.py::test_deterministic_is_bitwise[float16-B2-H4-Hkv1-bb1-nom-Sq257-Sk257-D64-w7-few]" \
        "tests/python/test_sparse.py::test_fused_equals_dense_mask_path[bfloat16-B1-H8-Hkv2-bkv-nom-Sq300-Sk77-D128-w7-randn]" \
        "tests/python/test_sparse.py::test_fused_equals_dense_mask_path[float16-B1-H4-Hkv1-bh1-nom-Sq77-Sk300-D128-w7-const]"
fi
if has pytest && [ -f "$LIB" ]; then
    TO=""; $PY -c "import pytest_timeout" 2> /dev/null && TO="--timeout 120"
    job pytest "$(lim 340 $RES)" "${PYENV[@]}" $PY -m pytest -m gpu tests/python -q $TO -p no:cacheprovider
fi
wait
log "correctness phase $(( $(date +%s) - t )) s"
{ section test_fwd test_bwd test_topk; } > "$OUT/tests.log" 2>&1
{ section mc_fwd mc_bwd mc_topk mc_sparse; } > "$OUT/memcheck.log" 2>&1
{ section pytest; } > "$OUT/pytest.log" 2>&1

# ---- timings, one at a time on an idle GPU ----
: > "$OUT/bench.log"
if has cbench; then
    t=$(date +%s)
    for h in fwd bwd; do [ -x "$TB/test_$h" ] && { job cb_$h "$(lim 40 150)" "$TB/test_$h" --bench; wait; }; done
    [ -x "$TB/test_topk" ] && { job cb_topk "$(lim 40 150)" env OMP_NUM_THREADS=16 "$TB/test_topk" --timing-only; wait; }
    { section cb_fwd cb_bwd cb_topk; } >> "$OUT/bench.log" 2>&1
    log "cbench $(( $(date +%s) - t )) s"
fi
if has ncu && [ -x "$TB/test_fwd" ]; then
    job ncu "$(lim 120 60)" ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \
        -k regex:fdma_fwd --launch-skip 5 --launch-count 1 "$TB/test_fwd" --bench 1; wait
    { section ncu; } >> "$OUT/bench.log" 2>&1
fi
if has pybench && [ -f "$LIB" ]; then
    t=$(date +%s)
    B=$(( $(left) - 35 )); (( B > 400 )) && B=400   # bench.py stops itself at B (+ its import and report)
    if (( B >= 30 )); then
        job pybench $(( B + 20 )) "${PYENV[@]}" $PY bench/bench.py --out "$OUT" --budget-s "$B" ${FDMA_BENCH_ARGS:-}
        wait
    else
        echo "skip 0" > "$L/pybench.rc"
    fi
    { section pybench; } >> "$OUT/bench.log" 2>&1
    log "pybench $(( $(date +%s) - t )) s (budget $B s)"
fi

# ---- summary (last) ----
rm -f "$OUT/bench.json.tmp"
{
echo
echo "==================== summary ($(elapsed) s; $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)) ===================="
echo "$BUILD_LINE"
lastl() { grep -E "$2" "$L/$1.log" 2>/dev/null | tail -${3:-1} | tr '\n' ' '; }
cnt() { grep -cE "$2" "$L/$1.log" 2>/dev/null || true; }
has test && {
    echo "test_fwd   $(state test_fwd): $(lastl test_fwd '^(PASSED|FAILED)') ($(cnt test_fwd '^ok') ok lines, $(cnt test_fwd '^FAIL') FAIL)"
    echo "test_bwd   $(state test_bwd): $(lastl test_bwd 'cases passed') ($(cnt test_bwd '^FAIL') FAIL)"
    echo "test_topk  $(state test_topk): $(lastl test_topk '^correctness:')$(lastl test_topk '^FAIL ' 3 | cut -c1-300)"
    grep -hE "^FAIL " "$L/test_fwd.log" "$L/test_bwd.log" "$L/test_topk.log" 2>/dev/null | head -8 | cut -c1-200
    grep -hE "CUDA error|Segmentation|Aborted" "$L/test_fwd.log" "$L/test_bwd.log" "$L/test_topk.log" 2>/dev/null | head -3
}
has sanitize && for m in mc_fwd mc_bwd mc_topk mc_sparse; do
    echo "memcheck ${m#mc_} $(state $m): $(lastl $m 'ERROR SUMMARY') | $(lastl $m '(PASSED|FAILED|cases passed|^correctness:| passed| failed)')"
    grep -m3 -E "Invalid|out of bounds|misaligned|Uninitialized" "$L/$m.log" 2>/dev/null | cut -c1-200
done
has pytest && {
    echo "pytest     $(state pytest): $(lastl pytest '( in [0-9.]+s|no tests ran|Timeout|INTERNALERROR)')"
    grep -E "^(FAILED|ERROR) " "$L/pytest.log" 2>/dev/null | head -5 | cut -c1-200
    grep -E "^E  " "$L/pytest.log" 2>/dev/null | head -4 | cut -c1-200
}
has cbench && {
    echo "---- C-level timings (cbench) ----"
    grep -v '^$' "$L/cb_fwd.log" 2>/dev/null | head -16 | cut -c1-160
    grep -hE "^bench" "$L/cb_bwd.log" 2>/dev/null | head -6 | cut -c1-200
    grep -A11 "^timing" "$L/cb_topk.log" 2>/dev/null | head -12
}
if has pybench; then
    echo "---- bench.py $(state pybench) ----"
    if grep -q "^==== bench table" "$L/pybench.log" 2>/dev/null; then
        sed -n '/^==== bench table/,$p' "$L/pybench.log"
    elif [ -f "$OUT/bench.json" ]; then
        echo "(bench.py did not finish: table from the bench.json it left)"
        timeout 60 $PY bench/bench.py --report "$OUT/bench.json" 2>&1 | tail -60
    else
        tail -15 "$L/pybench.log" 2>/dev/null
    fi
fi
} 2>&1 | tee -a "$RUNLOG"
exit 0
