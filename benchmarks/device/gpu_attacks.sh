#!/bin/bash
# Data: copy ../shared/data/cifar10-jpeg.tar.gz and triggers/abl-official-trojan-cifar10.npz
# into the git-ignored device-data/ and carry it; the figures are in benchmarks/README.md.
# Third GPU session (2026-11-27, evening): every job in parallel on the one GPU, each under
# the wall limit LIMIT; whatever a job leaves in its folder comes back even if it is cut.
#   official       - benchmarks/full_scale.py --runs official (issue 7: the missing full-scale row)
#   abl-ATTACK     - the default ABL (no preset named) against Blend, Trojan, SIG, CBA, LBA and
#                    DFST at full scale, each with the example config of its attack (issue 11;
#                    the default was validated at full scale on BadNets only)
#   nc-ATTACK      - Neural Cleanse with the authors' schedule, then GGA on its reversed trigger
#                    (Table 11), BadNets and Trojan, from 40-epoch backdoored models (issue 10)
# CPU rehearsal: REHEARSE=1 OUT=/tmp/out ROOT=<cifar10 folder> bash benchmarks/device/gpu_attacks.sh
set -u
W=/tmp/wa; LIMIT=${LIMIT:-500}
if [ -n "${REHEARSE:-}" ]; then
  FS="--train 600 --test 300 --epochs-scale 0.03"
  SET="--set slice.train=600 --set slice.test=300 --set defense.isolation_epochs=2 --set defense.recovery_epochs=2
       --set defense.recovery_milestones=[1] --set defense.unlearning_epochs=1"
  LBA="--set attack.steps=2 --set attack.surrogate_epochs=1"
  DFST="--set attack.style_steps=2 --set attack.detox_steps=1 --set attack.surrogate_epochs=1"
  NC="--train 600 --test 300 --backdoor-epochs 2 --backdoor-milestones 1 --part-set steps=3 --part-set batches_per_step=2"
else
  FS=""; SET=""; LBA=""; DFST=""
  NC="--train 50000 --test 10000 --backdoor-epochs 40 --backdoor-milestones 8 28"
fi
source benchmarks/device/common.sh

timeout $(left) python3 benchmarks/full_scale.py --root $ROOT --runs official --runs-dir $W/runs-official \
  --threads 1 --progress --row-json $W/official.json $FS > $W/official.log 2>&1 &
ABL="python3 -m abl.cli run --set dataset.root=$ROOT --set dataset.download=false --set defense={'name':'abl'}
     --set train.threads=1 --set train.progress=true --set train.eval_every=5 --set output.save_model=false $SET"
for a in blend trojan sig cba lba dfst; do
  extra=""
  [ $a = trojan ] && extra="--set attack.trigger_file=$TROJAN"
  [ $a = lba ] && extra="$LBA"
  [ $a = dfst ] && extra="$DFST"
  timeout $(left) $ABL configs/cifar10-$a-abl.yaml --set name=$a-default $extra --runs-dir $W/runs-$a \
    > $W/abl-$a.log 2>&1 &
done
for a in badnets trojan; do
  extra=""; [ $a = trojan ] && extra="--attack-set trigger_file=$TROJAN"
  timeout $(left) python3 benchmarks/compare_parts.py baselines --root $ROOT --threads 1 --cache-dir /tmp/ablcache/bench \
    $NC --attack $a $extra --out $W/nc-$a --only neural_cleanse+gga > $W/nc-$a.log 2>&1 &
done
wait
echo "all done after $(( $(date +%s) - T0 )) s" >> $W/device.txt
cp $W/device.txt "$OUT"/
(cd $W && tar czf "$OUT/results.tgz" $(find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' -o -name '*.log' -o -name '*.txt' \) -size -4M))
cat $W/device.txt
for f in $W/*.log; do echo "== $f"; grep -v "^ *epoch\|it/s\|s/it" $f | tail -n 6 | cut -c1-300; done
