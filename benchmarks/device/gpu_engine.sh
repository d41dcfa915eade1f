#!/bin/bash
# Issue 26's device checks, in the order to run them (the first call of a session with a GPU):
#   1. benchmarks/bench_engine.py: steps/s of the plain loop (train.fast_step=off, "old") and
#      of the planned-epoch step replayed as a CUDA graph ("new") side by side in one process,
#      at batch 128 and 512, with a bare loop between epochs (target: new >= 4x old at 128);
#   2. benchmarks/full_scale.py --runs default alone (target: <= 70 s on one H100; 330 s on
#      an H200 with the old path);
#   3. while time is left, the backlog of gpu_next.sh (CALL=official, attacks, sleeper), each
#      into its own $OUT/next-<call>/ (they need their own calls if the engine is not faster).
# Data: copy ../shared/data/cifar10-jpeg.tar.gz and triggers/abl-official-trojan-cifar10.npz
# into the git-ignored device-data/ and carry it; record the figures in benchmarks/README.md
# with the device, the command and the date.
# CPU rehearsal: REHEARSE=1 OUT=/tmp/out ROOT=<cifar10 folder> bash benchmarks/device/gpu_engine.sh
set -u
W=/tmp/we; LIMIT=${LIMIT:-560}
if [ -n "${REHEARSE:-}" ]; then
  BENCH="--train-size 512 --repeats 1 --threads 1"
  FS="--train 600 --test 300 --epochs-scale 0.05 --threads 1"  # 0.03 makes recovery milestone = its epochs
  NEXT=""  # the backlog has its own rehearsal (gpu_next.sh); here only that it is reached
else
  BENCH="--train-size 50000 --repeats 2"
  FS="--threads 4"
  NEXT="official attacks sleeper"
fi
source benchmarks/device/common.sh

timeout $(left) python3 benchmarks/bench_engine.py --data $ROOT --batch-size 128 512 $BENCH \
  > $W/bench_engine.json 2> $W/bench_engine.log
timeout $(left) python3 benchmarks/full_scale.py --root $ROOT --runs default --runs-dir $W/runs-default \
  --progress --row-json $W/default.json $FS > $W/default.log 2>&1
echo "engine checks done after $(( $(date +%s) - T0 )) s" >> $W/device.txt
for c in $NEXT; do
  if [ "$(left)" -lt 150 ]; then echo "no time left for CALL=$c" >> $W/device.txt; continue; fi
  mkdir -p "$OUT/next-$c"
  CALL=$c LIMIT=$(left) OUT="$OUT/next-$c" ROOT=$ROOT bash benchmarks/device/gpu_next.sh > $W/next-$c.txt 2>&1
  echo "CALL=$c done after $(( $(date +%s) - T0 )) s" >> $W/device.txt
done
echo "all done after $(( $(date +%s) - T0 )) s" >> $W/device.txt
cp $W/device.txt "$OUT"/
(cd $W && tar czf "$OUT/results.tgz" $(find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.txt' \) -size -4M))
cat $W/device.txt
cat $W/bench_engine.json
grep -v "it/s\|s/it" $W/default.log | grep -i "warn\|error\|| default\|CA " | cut -c1-250
