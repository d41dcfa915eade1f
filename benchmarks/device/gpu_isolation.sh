#!/bin/bash
# Data: as gpu_attacks.sh (device-data/cifar10-jpeg.tar.gz and the Trojan trigger, carried).
# Second call of the 2026-11-27 evening session: gpu_attacks.sh ran nine jobs side by side and
# none of the default ABL runs got past recovery in its limit, so their isolation figures were
# lost with them. This call runs only the default's isolation stage (recovery and unlearning
# set to 0 epochs) against the six attacks, so that each run ends and records its isolation
# precision and separation at full scale.
# CPU rehearsal: REHEARSE=1 OUT=/tmp/out ROOT=<cifar10 folder> bash benchmarks/device/gpu_isolation.sh
set -u
W=/tmp/wi; LIMIT=${LIMIT:-270}
if [ -n "${REHEARSE:-}" ]; then
  SET="--set slice.train=600 --set slice.test=300 --set defense.isolation_epochs=2"
  LBA="--set attack.steps=2 --set attack.surrogate_epochs=1"
  DFST="--set attack.style_steps=2 --set attack.detox_steps=1 --set attack.surrogate_epochs=1"
else
  SET=""; LBA=""; DFST=""
fi
source benchmarks/device/common.sh
ABL="python3 -m abl.cli run --set dataset.root=$ROOT --set dataset.download=false --set defense={'name':'abl'}
     --set defense.recovery_epochs=0 --set defense.recovery_milestones=[] --set defense.unlearning=none
     --set train.threads=1 --set train.eval_every=5 --set output.save_model=false $SET"
for a in blend trojan sig cba lba dfst; do
  extra=""
  [ $a = trojan ] && extra="--set attack.trigger_file=$TROJAN"
  [ $a = lba ] && extra="$LBA"
  [ $a = dfst ] && extra="$DFST"
  timeout $(left) $ABL configs/cifar10-$a-abl.yaml --set name=$a-default-iso $extra --runs-dir $W/runs-$a \
    > $W/iso-$a.log 2>&1 &
done
wait
echo "all done after $(( $(date +%s) - T0 )) s" >> $W/device.txt
(cd $W && tar czf "$OUT/results.tgz" $(find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.txt' \) -size -4M))
cat $W/device.txt
for f in $W/*.log; do echo "== $f"; grep -v "it/s\|s/it" $f | grep -i "warn\|finished\|error\|done" | cut -c1-250; done
