#!/bin/bash
# before = main at the branch point (/work/wt/host-base), after = this branch (/work/wt/host); interleaved
set -e
OUT=/work/wt/host/benchmarks/results/cpu/host_overhead/fast-decode
mkdir -p $OUT
date -u > $OUT/when.txt
for i in 1 2 3; do
  for mode in default full; do
    flag=""; [ $mode = full ] && flag="--full-pool"
    for side in before after; do
      wt=/work/wt/host; [ $side = before ] && wt=/work/wt/host-base
      (cd $wt/benchmarks && OMP_NUM_THREADS=1 $wt/.venv/bin/python host_overhead.py $flag --out $OUT/$side-$mode-$i.json > $OUT/$side-$mode-$i.txt 2>&1)
      echo "$(date -u +%T) $side $mode $i done, load $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
date -u >> $OUT/when.txt
