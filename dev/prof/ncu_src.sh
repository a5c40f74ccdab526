#!/usr/bin/env bash
# ncu_src.sh KERNEL_REGEX KPROF_CASE -- per-SASS-instruction warp-stall samples of one launch of a kernel under
# dev/prof/kprof.py (dev tool): writes $OUT/src_<regex>.csv (ncu's source page, SASS) for dev/prof/src_top.py.
#   bash dev/prof/ncu_src.sh wgmma_sparse w1c@16384      (FDMA_LIBRARY: the library to profile)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp}
rep=/tmp/ncu_src_$1
timeout 240 ncu --set full --import-source no --clock-control none -k regex:"$1" --launch-skip 1 --launch-count 1 -f \
    -o "$rep" python3 dev/prof/kprof.py "$2" > "$OUT/ncu_src_$1.log" 2>&1
echo "ncu rc=$?"
ncu --import "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/src_$1.csv" 2>> "$OUT/ncu_src_$1.log"
echo "source page rc=$? $(wc -l < "$OUT/src_$1.csv") lines"
ncu --import "$rep.ncu-rep" --page details --section WarpStateStats --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis > "$OUT/details_$1.txt" 2>&1
