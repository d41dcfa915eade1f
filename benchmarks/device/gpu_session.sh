#!/bin/bash
# Data: copy ../shared/data/cifar10-jpeg.tar.gz (and, for gpu_nc.sh, triggers/abl-official-trojan-cifar10.npz)
# into the git-ignored device-data/ and carry it; the figures are in benchmarks/README.md.
# One GPU session (2026-11-27), every job in parallel on the one GPU, each under a wall limit:
#   default  - benchmarks/full_scale.py --runs default (ABL's default preset, full scale)
#   fc       - feature collision, no defense, 100 epochs (issue 11: FC at full scale)
#   sleeper  - Sleeper Agent (1% budget, the paper's), no defense, $SLEEPER_EPOCHS epochs
#   bl-*     - the post-training baselines from one 100-epoch backdoored model (issue 10):
#              fine-pruning trains and caches it, then the other four run in parallel.
# CPU rehearsal: REHEARSE=1 OUT=/tmp/out ROOT=<cifar10 folder> bash benchmarks/device/gpu_session.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/w; rm -rf $W; mkdir -p $W
export PYTHONUNBUFFERED=1 ABL_CACHE_DIR=/tmp/ablcache
LIMIT=${LIMIT:-540}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
if [ -n "${REHEARSE:-}" ]; then
  FS="--train 600 --test 300 --epochs-scale 0.03"
  BL="--train 600 --test 300 --backdoor-epochs 2 --backdoor-milestones 1 --curve-epochs 2"
  SET="--set slice.train=600 --set slice.test=300 --set defense.epochs=2 --set defense.milestones=[1] --set attack.steps=2 --set attack.surrogate_epochs=1"
  SL="--set attack.retrains=1"; TH=1
else
  FS=""; BL="--train 50000 --test 10000 --backdoor-epochs 100 --backdoor-milestones 20 70 --curve-epochs 100"
  SET="--set defense.epochs=100 --set defense.milestones=[20,70]"
  SL="--set defense.epochs=${SLEEPER_EPOCHS:-40} --set defense.milestones=[8,28]"; TH=2
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch,sys;print(sys.version, torch.__version__, torch.cuda.is_available())"; } > $W/device.txt 2>&1
ROOT=${ROOT:-/tmp/d/cifar10}
[ -d "$ROOT/train" ] || { mkdir -p "$ROOT" && tar xzf device-data/cifar10-jpeg.tar.gz -C "$ROOT"; }
# decode the JPEGs once into the dataset cache, so the parallel jobs all hit it
python3 -c "
import time; t=time.perf_counter()
from abl.data.registry import DATASETS
s = DATASETS.create({'name':'cifar10','root':'$ROOT'}).load()
print('load s', round(time.perf_counter()-t,1), tuple(s.train.images.shape))" >> $W/device.txt 2>&1

ABL="python3 -m abl.cli run configs/cifar10-fc-abl.yaml --set dataset.root=$ROOT --set dataset.download=false --set defense={'name':'none'} --set train.threads=$TH --set train.progress=true --set train.eval_every=5 --set output.save_model=false"
timeout $(left) python3 benchmarks/full_scale.py --root $ROOT --runs default --runs-dir $W/runs-default --threads $TH --progress $FS > $W/default.log 2>&1 &
timeout $(left) $ABL $SET --set name=fc-full --runs-dir $W/runs-fc > $W/fc.log 2>&1 &
timeout $(left) $ABL $SET $SL --set name=sleeper-full --set attack.name=sleeper_agent --set attack.rate=0.01 --runs-dir $W/runs-sleeper > $W/sleeper.log 2>&1 &
CP="python3 benchmarks/compare_parts.py baselines --root $ROOT --threads $TH --cache-dir /tmp/ablcache/bench $BL"
(
  timeout $(left) $CP --out $W/bl-fp --only fine_pruning > $W/bl-fp.log 2>&1
  for o in neural_cleanse+gga mcr nad neural_cleanse; do
    timeout $(left) $CP --out $W/bl-$o --only $o > $W/bl-$o.log 2>&1 &
  done
  wait
) &
wait
echo "all done after $(( $(date +%s) - T0 )) s" >> $W/device.txt
cp $W/device.txt "$OUT"/
(cd $W && tar czf "$OUT/results.tgz" $(find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' -o -name '*.log' -o -name '*.txt' \) -size -4M))
for f in $W/*.log; do echo "== $f"; grep -v "^ *epoch\|it/s\|s/it" $f | tail -n 8 | cut -c1-400; done
ls -la "$OUT"
