"""Engine overhead and ranking speed on CIFAR-10.

Measures, in one process and interleaved so machine noise hits both alike:
  * seconds per training epoch of ``Engine.run_phase`` (per-example loss record,
    seeded device loader, LR schedule, divergence check) against a bare
    forward/backward/step loop over the same model, data tensors and batch size;
  * seconds to rank every training example (``Engine.per_example_loss``), the ABL
    isolation step that the authors' code does one example at a time.

Usage:
    python benchmarks/bench_engine.py --data ../shared/data/cifar10-jpeg.tar.gz [--train-size 50000] [--repeats 2]

The archive is unpacked once into ``.cache/bench-data``. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from abl.attacks import ATTACKS
from abl.data.datasets import CIFAR10
from abl.data.loader import to_float
from abl.engine import Engine, TrainConfig
from abl.models import MODELS

REPO = Path(__file__).resolve().parents[1]


def unpack(archive: Path) -> Path:
    if archive.is_dir():
        return archive
    target = REPO / ".cache" / "bench-data" / archive.name.split(".")[0]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(target)
    return target


def bare_epoch(model, images, labels, batch_size, device, autocast_dtype, channels_last) -> float:
    """The minimal loop: shuffle, gather, forward, mean CE, backward, step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    sync(device)
    t0 = time.perf_counter()
    order = torch.randperm(len(labels), device=device)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        x = to_float(images[idx])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(x)
        loss = F.cross_entropy(out.float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--train-size", type=int, default=50000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    cfg = TrainConfig(batch_size=args.batch_size, eval_every=0, eval_subset=500, progress=False, device=args.device, compile=args.compile)
    device = cfg.resolve_device()
    splits = CIFAR10(root=str(unpack(Path(args.data)))).load(cache_dir=REPO / ".cache" / "bench-cache")
    train = splits.train.subset(torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[: args.train_size])
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1})
    attack.setup(32, 10)
    t0 = time.perf_counter()
    data = attack.poison(train, device)
    sync(device)
    poison_s = time.perf_counter() - t0

    torch.manual_seed(0)
    model = MODELS.create({"name": "wrn"}).build(10, 32)
    engine = Engine(model, data, splits.test.subset(torch.arange(500)), None, cfg)
    bare_model = engine.train_model  # same module (compiled if asked), same layout

    # warm-up (allocators, cudnn autotune, compile)
    engine.run_phase("warmup", epochs=1, lr=0.01)
    bare, eng = [], []
    for _ in range(args.repeats):
        bare.append(bare_epoch(bare_model, data.images, data.labels, args.batch_size, device, engine.autocast_dtype, engine.channels_last))
        engine.run_phase("train", epochs=1, lr=0.01)
        eng.append(engine.history[-1]["time_s"])
    sync(device)
    t0 = time.perf_counter()
    losses = engine.per_example_loss()
    sync(device)
    rank_s = time.perf_counter() - t0

    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "train_size": args.train_size,
        "batch_size": args.batch_size,
        "compile": args.compile,
        "poison_s": round(poison_s, 3),
        "bare_epoch_s": [round(b, 2) for b in bare],
        "engine_epoch_s": [round(e, 2) for e in eng],
        "engine_over_bare": round(min(eng) / min(bare), 3),
        "rank_s": round(rank_s, 2),
        "ranked": int(losses.numel()),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
