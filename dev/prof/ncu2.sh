R="barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle lg_throttle wait not_selected dispatch_stall no_instruction branch_resolving drain membar tex_throttle sleeping selected"
M=$(for r in $R; do printf "smsp__average_warps_issue_stalled_%s_per_issue_active.ratio," "$r"; done)
M="${M}smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum"
export FDMA_LIBRARY=/tmp/fb/libflashdma.so PYTHONPATH=$PWD/python
for c in "wgmma_sparse w1c@16384" "wgmma_dense dense@16384"; do set -- $c
timeout 200 ncu --clock-control none --metrics "$M" -k regex:"$1" --launch-skip 1 --launch-count 1 python3 dev/prof/kprof.py $2 > "$OUT/ncu_$1.txt" 2>&1
echo "== $c rc=$?"; grep -E "smsp__|sm__|l1tex|gpu__|dram__|lts__|==ERR" "$OUT/ncu_$1.txt" | sed -e 's/smsp__average_warps_issue_stalled_//' -e 's/_per_issue_active.ratio//' | awk '{print $1, $NF}' | tr '\n' ';'; echo
done
