"""Engine overhead and ranking speed on CIFAR-10.

Measures, in one process and interleaved so machine noise hits all alike:
  * seconds per training epoch of ``Engine.run_phase`` (per-example loss record,
    seeded device loader, LR schedule, divergence check) on the plain loop
    (``train.fast_step=off``, "old") and on the planned-epoch step ("new": a CUDA graph
    replayed per batch on CUDA, the same function run eagerly elsewhere), against a bare
    forward/backward/step loop over the same model, data tensors and batch size, for
    each ``--batch-size`` given; a bare epoch runs between two engine epochs;
  * seconds to rank every training example (``Engine.per_example_loss``), the ABL
    isolation step that the authors' code does one example at a time.

Usage:
    python benchmarks/bench_engine.py --data ../shared/data/cifar10-jpeg.tar.gz [--train-size 50000] [--repeats 2]
        [--batch-size 128 512] [--paths old new]

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
    ap.add_argument("--batch-size", type=int, nargs="+", default=[128])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"],
                    help="engine paths: old = train.fast_step=off, new = on")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = TrainConfig(device=args.device).resolve_device()
    splits = CIFAR10(root=str(unpack(Path(args.data)))).load(cache_dir=REPO / ".cache" / "bench-cache")
    train = splits.train.subset(torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[: args.train_size])
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1})
    attack.setup(32, 10)
    t0 = time.perf_counter()
    data = attack.poison(train, device)
    sync(device)
    poison_s = time.perf_counter() - t0

    rows = [measure(bs, args, data, splits.test.subset(torch.arange(500)), device) for bs in args.batch_size]
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "train_size": args.train_size,
        "compile": args.compile,
        "poison_s": round(poison_s, 3),
        "batches": rows,
    }
    print(json.dumps(out, indent=1))


def measure(batch_size: int, args: argparse.Namespace, data, test, device: torch.device) -> dict:
    """Epoch times of the bare loop and of each engine path at ``batch_size``: each path
    trains ``repeats + 1`` epochs in one phase (the first warms up: allocator, cuDNN
    autotune, compile, graph capture) with a bare epoch after each."""
    steps = -(-args.train_size // batch_size)
    row: dict = {"batch_size": batch_size, "steps_per_epoch": steps}
    bare: list[float] = []
    engines = {}
    for path in args.paths:
        cfg = TrainConfig(batch_size=batch_size, eval_every=0, eval_subset=500, progress=False, device=args.device,
                          compile=args.compile, fast_step={"old": "off", "new": "on"}[path])
        torch.manual_seed(0)
        engine = Engine(MODELS.create({"name": "wrn"}).build(10, 32), data, test, None, cfg)
        bare_model = engine.train_model  # same module (compiled if asked), same layout

        def after(e: int, engine=engine, bare_model=bare_model) -> None:
            bare.append(bare_epoch(bare_model, data.images, data.labels, batch_size, device, engine.autocast_dtype,
                                   engine.channels_last))

        engine.run_phase("train", epochs=args.repeats + 1, lr=0.01, after_epoch=after)
        times = [h["time_s"] for h in engine.history[1:]]
        engines[path] = engine
        row[f"{path}_epoch_s"] = [round(t, 3) for t in times]
        row[f"{path}_steps_per_s"] = round(steps / min(times), 3)
    bare = bare[1:] if len(bare) > 1 else bare
    row["bare_epoch_s"] = [round(b, 3) for b in bare]
    row["bare_steps_per_s"] = round(steps / min(bare), 3)
    for path in args.paths:
        row[f"{path}_over_bare"] = round(min(row[f"{path}_epoch_s"]) / min(bare), 3)
    if "old_steps_per_s" in row and "new_steps_per_s" in row:
        row["new_over_old_steps"] = round(row["new_steps_per_s"] / row["old_steps_per_s"], 2)
    engine = next(iter(engines.values()))
    sync(device)
    t0 = time.perf_counter()
    losses = engine.per_example_loss()
    sync(device)
    row["rank_s"] = round(time.perf_counter() - t0, 2)
    row["ranked"] = int(losses.numel())
    return row


if __name__ == "__main__":
    main()
