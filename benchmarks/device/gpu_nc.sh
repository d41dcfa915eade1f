#!/bin/bash
# Data: copy ../shared/data/cifar10-jpeg.tar.gz (and, for gpu_nc.sh, triggers/abl-official-trojan-cifar10.npz)
# into the git-ignored device-data/ and carry it; the figures are in benchmarks/README.md.
# Second GPU call (2026-11-27): Neural Cleanse with the authors' schedule at full data, then
# ABL's unlearning on its reversed trigger (Table 11), for BadNets and Trojan in parallel.
# The backdoored models train 40 epochs (lr /10 at 8 and 28), not 100: the call's time.
# CPU rehearsal: REHEARSE=1 OUT=/tmp/out ROOT=<cifar10 folder> bash benchmarks/device/gpu_nc.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/wnc; rm -rf $W; mkdir -p $W
export PYTHONUNBUFFERED=1 ABL_CACHE_DIR=/tmp/ablcache
LIMIT=${LIMIT:-230}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
if [ -n "${REHEARSE:-}" ]; then
  BL="--train 600 --test 300 --backdoor-epochs 2 --backdoor-milestones 1 --part-set steps=3 --part-set batches_per_step=2"; TH=1
else
  BL="--train 50000 --test 10000 --backdoor-epochs 40 --backdoor-milestones 8 28"; TH=2
fi
ROOT=${ROOT:-/tmp/d/cifar10}
[ -d "$ROOT/train" ] || { mkdir -p "$ROOT" && tar xzf device-data/cifar10-jpeg.tar.gz -C "$ROOT"; }
python3 -c "
from abl.data.registry import DATASETS
DATASETS.create({'name':'cifar10','root':'$ROOT'}).load()" > $W/load.log 2>&1
for a in badnets trojan; do
  extra=""; [ $a = trojan ] && extra="--attack-set trigger_file=$PWD/device-data/abl-official-trojan-cifar10.npz"
  timeout $(left) python3 benchmarks/compare_parts.py baselines --root $ROOT --threads $TH --cache-dir /tmp/ablcache/bench \
    $BL --attack $a $extra --out $W/nc-$a --only neural_cleanse+gga > $W/nc-$a.log 2>&1 &
done
wait
echo "all done after $(( $(date +%s) - T0 )) s" >> $W/load.log
(cd $W && tar czf "$OUT/results.tgz" $(find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' -o -name '*.log' \) -size -4M))
for f in $W/*.log; do echo "== $f"; tail -n 4 $f | cut -c1-600; done
