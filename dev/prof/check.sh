#!/usr/bin/env bash
# check.sh -- quick GPU check of one change (dev tool, run on the GPU machine): optional file snapshot restore,
#   library build, selected pytest files, memcheck of the sparse backward, kprof kernel times, ncu stall reasons,
#   SASS opcode histograms. Each stage is set by an environment variable ("none" or empty skips it):
#   FDMA_BASE_TAR=dev/prof/base.tar  files to restore first, e.g. helpers' work in progress left out:
#                                    git archive -o dev/prof/base.tar HEAD <their files>
#   FDMA_PYTEST="tests/python/test_sparse.py"   FDMA_MC= (skip memcheck)   FDMA_KPROF="w1c w1 dense"
#   FDMA_NCU="kernel-regex skip count" FDMA_NCU_CASE=w1c   FDMA_SASS="mangled kernel names"
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/prof_out}; mkdir -p "$OUT"
[ -n "${FDMA_BASE_TAR:-}" ] && tar xf "$FDMA_BASE_TAR" && echo "restored $(tar tf "$FDMA_BASE_TAR" | wc -l) files"
T0=$(date +%s)
cmake -S . -B /tmp/fb -G Ninja -DCMAKE_BUILD_TYPE=Release -DFDMA_CUDA_ARCHS=90 -DFDMA_WITH_CUDA=ON -DFDMA_BUILD_TESTS=OFF \
  > "$OUT/build.log" 2>&1 && cmake --build /tmp/fb -j 16 --target flashdma >> "$OUT/build.log" 2>&1
echo "build rc=$? $(( $(date +%s) - T0 )) s"; grep -E "error|warning" "$OUT/build.log" | head -10
export FDMA_LIBRARY=/tmp/fb/libflashdma.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
[ "${FDMA_PYTEST:-}" != none ] && timeout 300 python3 -m pytest -m gpu -q -x -p no:cacheprovider ${FDMA_PYTEST:-tests/python/test_sparse.py} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? $(( $(date +%s) - T0 )) s: $(tail -1 "$OUT/pytest.log")"; grep -E "^(FAILED|ERROR)|^E  " "$OUT/pytest.log" | head -12 | cut -c1-220
if [ -n "${FDMA_MC-1}" ]; then
timeout 200 compute-sanitizer --tool memcheck --leak-check no --print-limit 10 python3 -m pytest -q -p no:cacheprovider \
    "tests/python/test_sparse.py::test_fused_equals_dense_mask_path[bfloat16-B2-H8-Hkv2-bkv-m-Sq77-Sk300-D64-w1-randn]" \
    "tests/python/test_sparse.py::test_deterministic_is_bitwise[float16-B2-H4-Hkv1-bb1-nom-Sq257-Sk257-D64-w7-few]" > "$OUT/mc.log" 2>&1
echo "memcheck rc=$?: $(grep 'ERROR SUMMARY' "$OUT/mc.log" | tail -1) $(tail -1 "$OUT/mc.log")"
fi
[ "${FDMA_KPROF:-}" != none ] && timeout 120 python3 dev/prof/kprof.py ${FDMA_KPROF:-w1c w1} > "$OUT/kprof.log" 2>&1
grep -E "^====|^ +[0-9.]+ us|total" "$OUT/kprof.log" | head -40 | cut -c1-140
echo "done $(( $(date +%s) - T0 )) s"
if [ -n "${FDMA_NCU:-}" ]; then   # FDMA_NCU="regex skip count": ncu (stall reasons) on kprof $FDMA_NCU_CASE
    set -- $FDMA_NCU
    R="barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle lg_throttle wait not_selected dispatch_stall no_instruction branch_resolving drain membar tex_throttle"
    M=$(for r in $R; do printf "smsp__average_warps_issue_stalled_%s_per_issue_active.ratio," "$r"; done)
    M="${M}smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,gpu__time_duration.sum"
    timeout 240 ncu --clock-control none --metrics "$M" -k regex:"$1" --launch-skip "$2" --launch-count "$3" \
        python3 dev/prof/kprof.py ${FDMA_NCU_CASE:-w1c} > "$OUT/ncu.txt" 2>&1
    echo "ncu rc=$?"; grep -E "^  [a-zA-Z_].*\(|smsp__|sm__|l1tex|gpu__|dram__|lts__" "$OUT/ncu.txt" | sed -e 's/smsp__average_warps_issue_stalled_//' -e 's/_per_issue_active.ratio//' | cut -c1-150
fi
if [ -n "${FDMA_SASS:-}" ]; then   # FDMA_SASS="mangled kernel name ...": static opcode histogram of each
    for fn in $FDMA_SASS; do
        cuobjdump -sass -fun "$fn" /tmp/fb/libflashdma.so > "$OUT/sass_$(echo "$fn" | md5sum | cut -c1-8).txt" 2>&1
        echo "== SASS $fn: $(grep -cE '^\s+/\*[0-9a-f]{4,6}\*/' "$OUT/sass_$(echo "$fn" | md5sum | cut -c1-8).txt") instructions"
        grep -oE '^\s+/\*[0-9a-f]{4,6}\*/\s+(@!?U?P[0-9T] )?[A-Z0-9_]+' "$OUT/sass_$(echo "$fn" | md5sum | cut -c1-8).txt" | awk '{print $NF}' | sort | uniq -c | sort -rn | head -25 | tr '\n' ' '; echo
    done
fi
