# Sourced by the device scripts: the output and work folders, the wall-limit clock `left`,
# and CIFAR-10 unpacked into $ROOT and decoded once into the dataset cache, so that the
# parallel jobs all hit it. Set W (the work folder) and LIMIT's default before sourcing.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 ABL_CACHE_DIR=/tmp/ablcache
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
TROJAN=$PWD/device-data/abl-official-trojan-cifar10.npz
{ nvidia-smi --query-gpu=name,memory.total --format=csv; git log -1 --format=%h; \
  python3 -c "import torch,sys;print(sys.version, torch.__version__, torch.cuda.is_available())"; } > $W/device.txt 2>&1
ROOT=${ROOT:-/tmp/d/cifar10}
[ -d "$ROOT/train" ] || { mkdir -p "$ROOT" && tar xzf device-data/cifar10-jpeg.tar.gz -C "$ROOT"; }
python3 -c "
import time; t=time.perf_counter()
from abl.data.registry import DATASETS
s = DATASETS.create({'name':'cifar10','root':'$ROOT'}).load()
print('load s', round(time.perf_counter()-t,1), tuple(s.train.images.shape))" >> $W/device.txt 2>&1
