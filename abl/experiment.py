"""An experiment: dataset + model + attack + defense + engine settings, run into the store.

This is the library entry point behind ``abl run``; it composes the registries and
never holds component logic of its own.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from abl.attacks import ATTACKS, Attack
from abl.config import apply_overrides, build_dataclass, check, check_seed, load_yaml, to_plain
from abl.data.datasets import DATASETS  # noqa: F401  (registration)
from abl.data.loader import data_augment
from abl.data.types import DatasetSplits, PoisonedSet
from abl.defenses import DEFENSES, Defense
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError, DataError, StoreError
from abl.models import MODELS
from abl.stages import BackdoorSchedule, control_model, stage_dir_for
from abl.store import RunRecord, RunStore

PREVIEW = 64  # isolated images stored with a run for the report's picture grid


@dataclass
class OutputConfig:
    """Where results go: ``runs_dir`` holds the run folders and the SQLite index;
    ``cache_dir`` the decoded dataset tensors (default ``$ABL_CACHE_DIR`` or ``~/.cache/abl``)."""

    runs_dir: str = "runs"
    cache_dir: str | None = None
    save_model: bool = True


@dataclass
class SliceConfig:
    """Train/test on a seeded random subset (``None``: all). For quick runs and CPU tests.

    The slice is drawn from the splits as loaded, i.e. after the dataset's ``order_seed``
    shuffle; the kept training examples carry their file names and source indices
    (``train_order``) with them.
    """

    train: int | None = None
    test: int | None = None
    seed: int = 0

    def validate(self) -> None:
        check(self.train is None or self.train >= 1, "slice.train", "must be >= 1 or null")
        check(self.test is None or self.test >= 1, "slice.test", "must be >= 1 or null")

    def apply(self, splits: DatasetSplits) -> DatasetSplits:
        gen = torch.Generator().manual_seed(self.seed)
        if self.train is not None and self.train < len(splits.train):
            # reordered() takes files and train_order along, so they stay aligned
            splits = splits.reordered(torch.randperm(len(splits.train), generator=gen)[: self.train])
        test = splits.test
        if self.test is not None and self.test < len(test):
            test = test.subset(torch.randperm(len(test), generator=gen)[: self.test])
        return DatasetSplits(
            splits.name, splits.train, test, splits.num_classes, splits.class_names, splits.source,
            splits.train_files, splits.train_order, fingerprint=splits.fingerprint,
        )


@dataclass
class Experiment:
    """A fully built, validated experiment."""

    name: str
    seed: int
    dataset: Any
    model: Any
    attack: Attack | None
    defense: Defense
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    slice: SliceConfig = field(default_factory=SliceConfig)

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as saved beside the results."""
        return {
            "name": self.name,
            "seed": self.seed,
            "dataset": to_plain(self.dataset),
            "model": to_plain(self.model),
            "attack": to_plain(self.attack) if self.attack is not None else None,
            "defense": to_plain(self.defense),
            "train": to_plain(self.train),
            "output": to_plain(self.output),
            "slice": to_plain(self.slice),
        }


TOP_LEVEL = ("name", "seed", "dataset", "model", "attack", "defense", "train", "output", "slice")


def build_experiment(raw: dict[str, Any]) -> Experiment:
    """Validate a raw config mapping (from YAML plus overrides) into an :class:`Experiment`."""
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}'; valid top-level keys: {', '.join(TOP_LEVEL)}")
    for key in ("dataset", "model", "defense"):
        if key not in raw:
            raise ConfigError(f"'{key}' is required (a mapping with a 'name'; see `abl list`)")
    name = raw.get("name", "experiment")
    seed = raw.get("seed", 0)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"'name' must be a non-empty string, got {name!r}")
    check_seed(seed, "seed")
    attack_raw = raw.get("attack")
    attack = None
    if attack_raw not in (None, "none"):
        attack_spec = dict(attack_raw) if isinstance(attack_raw, dict) else attack_raw
        if isinstance(attack_spec, dict):
            attack_spec.setdefault("seed", seed)
        attack = ATTACKS.create(attack_spec, "attack")
    exp = Experiment(
        name=name,
        seed=seed,
        dataset=DATASETS.create(raw["dataset"], "dataset"),
        model=MODELS.create(raw["model"], "model"),
        attack=attack,
        defense=DEFENSES.create(raw["defense"], "defense"),
        train=build_dataclass(TrainConfig, raw.get("train") or {}, "train"),
        output=build_dataclass(OutputConfig, raw.get("output") or {}, "output"),
        slice=build_dataclass(SliceConfig, raw.get("slice") or {}, "slice"),
    )
    return exp


INPUT_PATH_SECTIONS = ("dataset", "attack")
"""Sections whose ``root``, ``path`` and ``*_file`` keys name input files or folders."""


def resolve_input_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """``raw`` with each relative ``dataset.root`` and ``attack.*_file`` made absolute against
    ``base`` (links resolved); ``~`` paths and absolute ones are kept as written. Sections
    are copied, not edited in place."""
    out = dict(raw)
    for section in INPUT_PATH_SECTIONS:
        spec = out.get(section)
        if not isinstance(spec, dict):
            continue
        spec = dict(spec)
        for key, value in spec.items():
            if (key in ("root", "path") or key.endswith("_file")) and isinstance(value, str) and value.strip():
                if not Path(value).expanduser().is_absolute():
                    spec[key] = str((base / value).resolve())  # resolve(): no 'configs/../' in the record
        out[section] = spec
    return out


def load_experiment(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> Experiment:
    """Read a YAML config (or start from ``base``), apply ``key=value`` overrides, validate.

    Relative input paths (``dataset.root``, ``attack.*_file``) in the file are read against
    the file's folder, so a config works from any directory; those given as overrides or in
    ``base`` against the current directory. Either way the absolute path is what is
    validated and recorded with the run.
    """
    if path is not None:
        raw = resolve_input_paths(load_yaml(path), Path(path).absolute().parent)
    else:
        raw = dict(base or {})
    raw = apply_overrides(raw, list(overrides or []))
    return build_experiment(resolve_input_paths(raw, Path.cwd()))


def check_runs_dir(runs_dir: str | Path) -> None:
    """Raise ConfigError if results cannot be written under ``runs_dir`` (it, or the nearest
    folder above it that exists, must be a writable folder): checked before any data loads."""
    root = Path(runs_dir)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    how = "pass --runs-dir DIR or set output.runs_dir to a folder you can write"
    if not existing.is_dir():
        raise ConfigError(f"runs folder '{root}' cannot be made: '{existing}' is a file, not a folder; {how}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"runs folder '{root}' cannot be written: no write permission in '{existing}'; {how}")
    if existing != root:
        # permission bits do not tell (root passes them): some file systems refuse any new
        # folder (/proc, sysfs). Make the first missing one and take it away again.
        probe = root
        while probe.parent != existing:
            probe = probe.parent
        try:
            probe.mkdir()
        except FileExistsError:
            pass  # another process made it meanwhile
        except OSError as exc:
            raise ConfigError(f"runs folder '{root}' cannot be made: '{existing}' takes no new folders "
                              f"({exc.strerror or exc}); {how}") from None
        else:
            probe.rmdir()
    index = root / "index.sqlite"
    if index.exists() and not index.is_file():
        raise ConfigError(f"runs folder '{root}': its index '{index}' is not a file; move it away (abl rebuilds "
                          "the index from the run folders)")


def check_model_input(model_cfg: Any, image_size: int, num_classes: int = 2) -> None:
    """Raise ConfigError if the model cannot take ``image_size`` images.

    Builds the model on the CPU and runs it once on a blank image in eval mode, so a size
    too small for its pooling fails here with the model's name rather than as a traceback
    in the first training batch. The global RNG is restored, so runs stay reproducible.
    """
    name = getattr(type(model_cfg), "registered_name", type(model_cfg).__name__)
    with torch.random.fork_rng(devices=[]):
        model = model_cfg.build(num_classes, image_size).eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"model '{name}' cannot take {image_size}x{image_size} images ({text}); "
                "set a larger dataset.size or pick another model"
            ) from None


def preflight(exp: Experiment, runs_dir: str | Path) -> int | None:
    """The checks that need no data, run before loading it: the runs folder is writable and,
    when the dataset config fixes the image size, the model takes it and the attack's
    trigger (its files included) builds for it. Returns that size (``None``: unknown)."""
    check_runs_dir(runs_dir)
    size = getattr(exp.dataset, "size", None)
    if not isinstance(size, int) or isinstance(size, bool):
        return None
    check_model_input(exp.model, size)
    if exp.attack is not None:
        # on a copy: the run's attack is set up for real once the data has loaded
        copy.deepcopy(exp.attack).build(size)
    return size


def check_classes(splits: DatasetSplits) -> None:
    """Raise DataError if the training split (after any slice) holds fewer than two classes:
    such a model cannot be wrong, and its "100% accuracy" means nothing."""
    present = splits.train.labels.unique().tolist()
    if len(present) < 2:  # never 0: the splits' own check refuses an empty split
        label = int(present[0])
        only = splits.class_names[label] if label < len(splits.class_names) else str(label)
        raise DataError(
            f"{splits.name}: the training set holds images of one class only ('{only}'); a classifier needs at "
            "least 2 classes: add images of the others (or, with slice.train, keep more examples)"
        )


DATA_FINGERPRINT_FORMAT = 1
"""Bump when what :func:`data_fingerprint` hashes changes: a run recorded with another
format resumes with its data unchecked (a warning says so) rather than refused."""


def data_fingerprint(splits: DatasetSplits) -> dict[str, Any]:
    """What the run trains on, recorded in its ``meta.json`` and checked by ``abl resume``.

    The dataset cache's content hash of the source files (every file's path, size and bytes,
    so a file edited, added, removed or moved to another class folder changes it) where the
    dataset has one; else (data built in memory, e.g. the bundled digits) a hash of the
    decoded training and test tensors.
    """
    from abl.data.cache import CACHE_FORMAT

    if splits.fingerprint is not None:
        kind, parts = "files", to_plain(splits.fingerprint)
    else:
        kind, parts = "decoded", []
        for split in (splits.train, splits.test):
            h = hashlib.sha256()
            for t in (split.images, split.labels):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.contiguous().cpu().numpy().tobytes())
            parts.append(f"{len(split)}:{h.hexdigest()[:32]}")
    return {"format": DATA_FINGERPRINT_FORMAT, "cache_format": CACHE_FORMAT, "dataset": splits.name,
            "source": str(splits.source) if splits.source is not None else None, "kind": kind, "parts": parts}


def _part_name(i: int, part: Any, kind: str) -> str:
    if isinstance(part, list) and len(part) == 3 and isinstance(part[0], str):
        return f"file '{part[0]}'"  # [name, size, digest]
    if isinstance(part, list) and part and all(isinstance(p, list) and p and isinstance(p[0], str) for p in part):
        return "file " + ", ".join(f"'{p[0]}'" for p in part)
    noun = "files" if kind == "files" else "images or labels"
    return (f"training {noun}", f"test {noun}")[i] if i < 2 else f"part {i + 1} of the files"


def check_data_fingerprint(run_id: str, recorded: Any, splits: DatasetSplits) -> None:
    """Raise DataError if the data decoded now is not what run ``run_id`` started on.

    Runs stored before fingerprints were recorded (or with another fingerprint format)
    resume unchecked, with a warning saying so.
    """
    import warnings

    now = data_fingerprint(splits)
    if not isinstance(recorded, dict) or recorded.get("format") != now["format"] \
            or recorded.get("cache_format") != now["cache_format"] or recorded.get("kind") != now["kind"]:
        why = "was stored without a data fingerprint" if not isinstance(recorded, dict) else \
            "recorded its data fingerprint in another format"
        warnings.warn(f"run {run_id} {why}: that it resumes on the same data could not be checked", stacklevel=3)
        return
    old, new = recorded.get("parts") or [], now["parts"]
    changed = [_part_name(i, p, now["kind"]) for i, p in enumerate(new) if i >= len(old) or old[i] != p]
    if len(old) != len(new) and not changed:
        changed = ["the list of files"]
    if not changed:
        return
    where = f" in '{now['source']}'" if now["source"] else ""
    raise DataError(
        f"run {run_id} cannot resume: its {now['dataset']} data{where} changed since it started "
        f"({'; '.join(changed)}: edited, added, removed or moved between class folders), and the run would "
        "finish trained on two datasets; put the data back as it was, or start a new run with `abl run`"
    )


@dataclass
class _Prepared:
    """What a run trains on: built once per process, identical for a resumed run."""

    splits: DatasetSplits
    data: PoisonedSet
    triggered: Any
    attack_metrics: dict[str, float]
    model: torch.nn.Module
    device: torch.device


def _prepare(
    exp: Experiment, store: RunStore, threads: int | None = None, resuming: RunRecord | None = None
) -> _Prepared:
    """Preflight, load, poison once and build the model (seeded). ``resuming``: the run being
    resumed, whose data fingerprint the loaded data must match (checked before any training)."""
    if threads or exp.train.threads:
        torch.set_num_threads(int(threads or exp.train.threads))
    device = exp.train.resolve_device()
    checked_size = preflight(exp, store.root)  # fail in seconds, not after loading the data
    splits = exp.slice.apply(exp.dataset.load(Path(exp.output.cache_dir) if exp.output.cache_dir else None))
    if resuming is not None:
        check_data_fingerprint(resuming.run_id, resuming.meta.get("data_fingerprint"), splits)
    check_classes(splits)
    n_classes, size = splits.num_classes, splits.image_size
    if size != checked_size:
        check_model_input(exp.model, size, n_classes)

    triggered = None
    attack_metrics: dict[str, float] = {}
    if exp.attack is not None:
        t_poison = time.perf_counter()
        exp.attack.setup(size, n_classes)
        data = exp.attack.poison(splits.train, device)
        triggered = exp.attack.triggered_test(splits.test, device)
        # includes fitting an optimised trigger (or reading it from the cache)
        attack_metrics = {"poison_s": time.perf_counter() - t_poison,
                          "n_poison": float(int(data.poison_mask.sum())), **exp.attack.fit_metrics()}
    else:
        labels = splits.train.labels.to(device)
        data = PoisonedSet(
            splits.train.images.to(device), labels, labels.clone(), torch.zeros(len(labels), dtype=torch.bool, device=device)
        )
    torch.manual_seed(exp.seed)
    model = exp.model.build(n_classes, size)
    return _Prepared(splits, data, triggered, attack_metrics, model, device)


def run_experiment(
    exp: Experiment,
    store: RunStore | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    sweep: dict[str, Any] | None = None,
) -> RunRecord:
    """Load, poison once, train with the defense, and record everything in the store.

    ``sweep`` (set by ``abl sweep``): the grid and cell this run belongs to, recorded in its
    config under ``sweep`` so that a rerun of the grid finds it finished.

    A run that raises (bad data, divergence) is marked failed, never finished; one stopped
    by Ctrl-C or SIGTERM is marked interrupted and can be continued with
    :func:`resume_experiment` from its last checkpoint.
    """
    store = store or RunStore(exp.output.runs_dir)
    t_start = time.perf_counter()
    prep = _prepare(exp, store)
    resolved = exp.resolved()
    resolved["device"] = str(prep.device)
    resolved["threads_used"] = torch.get_num_threads()
    if sweep is not None:
        resolved["sweep"] = dict(sweep)
    writer = store.create_run(resolved, name=exp.name, seed=exp.seed, data_fingerprint=data_fingerprint(prep.splits))
    return _execute(exp, store, writer, prep, on_epoch, t_start=t_start)


def keeps_checkpoints(rec: RunRecord) -> bool:
    """Whether run ``rec`` writes checkpoints, i.e. can be resumed (``train.checkpoint``)."""
    train = rec.config.get("train")
    return not (isinstance(train, dict) and train.get("checkpoint") is False)


#: keys that ``run_experiment`` adds to the resolved config it records (not config keys)
_RECORDED_EXTRA = ("device", "threads_used", "sweep")


def stored_raw(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run's config as :func:`build_experiment` must read it to run as it ran: the
    keys recorded beside the config dropped, and a key added since with a default other than
    what such runs did filled in. ABL's ``isolation_count`` (default ``auto`` since
    2026-12-07) did not exist before it: every such run isolated a fixed share."""
    raw = {k: v for k, v in config.items() if k not in _RECORDED_EXTRA}
    defense = raw.get("defense")
    if isinstance(defense, dict) and defense.get("name") == "abl" and "isolation_count" not in defense:
        raw["defense"] = {**defense, "isolation_count": "fixed"}
    return raw


def resume_experiment(
    run_id: str, store: RunStore, on_epoch: Callable[[dict], None] | None = None
) -> RunRecord:
    """Continue an interrupted run from its last checkpoint (``abl resume``).

    The run's recorded config is validated and built again, the data loaded and poisoned
    again (seeded, so identically), and the defense continues after the last complete
    epoch: on a CPU with the same thread count it ends with the metrics an uninterrupted
    run would have. A run interrupted before its first checkpoint starts over in its folder.

    Refused (before any data loads) for a run started with ``train.checkpoint: false``,
    which has nothing to continue from, and (before any training) when the data's
    fingerprint differs from the one recorded at the start.
    """
    from abl import checkpoint

    rec = store.get(run_id)
    store.check_resumable(rec)
    if not keeps_checkpoints(rec):
        raise StoreError(
            f"run {rec.run_id} kept no checkpoint (it was started with train.checkpoint: false), so it cannot "
            "continue where it stopped: start a new run with `abl run` (leave train.checkpoint on to be able to resume)"
        )
    exp = build_experiment(stored_raw(rec.config))
    t_start = time.perf_counter()
    recorded_threads = rec.config.get("threads_used")
    # the thread count changes float summation order: keep the one the run started with
    prep = _prepare(exp, store, threads=recorded_threads if isinstance(recorded_threads, int) else None, resuming=rec)
    ck_path = rec.path / checkpoint.FILE_NAME
    ck = checkpoint.load(ck_path) if ck_path.exists() else None
    writer = store.reopen_run(rec.run_id, history=ck["history"] if ck is not None else [])
    return _execute(exp, store, writer, prep, on_epoch, t_start=t_start, resume=ck)


def control_schedule(defense: Defense) -> BackdoorSchedule:
    """The training schedule of the clean-model control: the defense's own when it is a plain
    training (``none``, ``clean``), else the no-defense schedule it names for its backdoored
    model (``backdoor``, e.g. ABL's), else the paper's (appendix A.2)."""
    fields = ("epochs", "lr", "milestones", "lr_factor", "augment")
    if all(hasattr(defense, f) for f in fields):
        return BackdoorSchedule(*(copy.deepcopy(getattr(defense, f)) for f in fields))
    own = getattr(defense, "backdoor", None)
    return own if isinstance(own, BackdoorSchedule) else BackdoorSchedule()


def run_control(exp: Experiment, prep: _Prepared) -> dict[str, Any]:
    """The clean-model control of ``attack.control`` (:func:`abl.stages.control_model`): a
    model of the run's architecture and seed trained on the run's clean training set (before
    poisoning, so without any poison, cross or negative example) with
    :func:`control_schedule`, scored on the run's clean and triggered test sets."""
    splits, device = prep.splits, prep.device
    labels = splits.train.labels.to(device)
    clean = PoisonedSet(splits.train.images.to(device), labels, labels.clone(),
                        torch.zeros(len(labels), dtype=torch.bool, device=device))
    with torch.random.fork_rng(devices=[]):  # the same initial weights as the run's model
        torch.manual_seed(exp.seed)
        model = exp.model.build(splits.num_classes, splits.image_size)
    engine = Engine(model, clean, splits.test, prep.triggered, exp.train, seed=exp.seed)
    engine.stage_dir = stage_dir_for(exp.output.cache_dir)
    return control_model(engine, control_schedule(exp.defense))


def _execute(
    exp: Experiment,
    store: RunStore,
    writer: Any,
    prep: _Prepared,
    on_epoch: Callable[[dict], None] | None,
    *,
    t_start: float,
    resume: dict | None = None,
) -> RunRecord:
    from abl import checkpoint

    data, splits, device, model = prep.data, prep.splits, prep.device, prep.model
    elapsed_before = float(resume.get("elapsed_s", 0.0)) if resume is not None else 0.0

    def log(record: dict) -> None:
        writer.log_epoch(record)
        if on_epoch is not None:
            on_epoch(record)

    def save_checkpoint(state: dict) -> None:
        state["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
        writer.save_checkpoint(lambda path: checkpoint.save(path, state))

    with writer:
        mask = data.poison_mask.cpu()
        writer.save_array("poison_mask", mask.numpy())
        writer.save_array("poison_indices", mask.nonzero().squeeze(1).numpy())
        if splits.train_order is not None:  # training index -> index in the dataset's source order
            writer.save_array("train_order", splits.train_order.numpy())
        if exp.attack is not None and exp.attack.artefacts():
            writer.save_tensors("trigger", {k: v.contiguous() for k, v in exp.attack.artefacts().items()})
        engine = Engine(model, data, splits.test, prep.triggered, exp.train, seed=exp.seed, on_epoch=log)
        engine.stage_dir = stage_dir_for(exp.output.cache_dir)
        engine.data_augment = data_augment(exp.dataset, splits.image_size)
        engine.plan_for(exp.defense)  # progress across the run's phases, with a run ETA
        engine.model_factory = lambda: exp.model.build(splits.num_classes, splits.image_size)
        if exp.train.checkpoint:
            engine.enable_checkpoints(save_checkpoint)
        if resume is not None:
            engine.resume_from(resume)
        control = None
        if exp.attack is not None and exp.attack.control:
            # before the run's own training: in a sweep, a control that another cell is
            # computing makes this cell yield its worker ("busy", its attempt dropped), which
            # must happen while nothing of it has been trained. The global RNG is restored so
            # that the run trains as it would without the control.
            with torch.random.fork_rng(devices=[]):
                control = run_control(exp, prep)
        result = exp.defense.run(engine)
        stages = dict(engine.state.get("stages") or {})
        if control is not None:
            stages["control"] = {"key": control["key"], "hit": control["hit"]}
        if stages:  # which cached stages it used or made, by key
            writer.save_json("stages", stages)
        if result.notes:  # e.g. the detector and unlearner an ABL run composed, resolved
            writer.save_json("notes", result.notes)
        if result.tensors:  # e.g. Neural Cleanse's reversed masks and patterns
            writer.save_tensors("defense_artefacts", {k: v.detach().cpu().contiguous() for k, v in result.tensors.items()})
        writer.save_array("example_losses", engine.loss_matrix().numpy().astype(np.float32))
        if result.isolated is not None:
            iso = result.isolated
            writer.save_array("isolated_indices", iso.numpy())
            writer.save_array("isolated_losses", result.isolated_losses.numpy().astype(np.float32))
            if exp.attack is not None:  # otherwise there is no ground truth to compare with
                writer.save_array("isolated_is_poison", mask[iso].numpy())
            writer.save_array("isolated_images", data.images[iso[:PREVIEW].to(device)].cpu().numpy())
            if splits.train_files is not None:
                writer.save_array("isolated_files", np.array([splits.train_files[i] for i in iso.tolist()], dtype=np.str_))
        if exp.output.save_model:
            # engine.model: an unlearner may have replaced the network (e.g. an ImageNet ResNet-34)
            writer.save_tensors("model", {k: v.detach().cpu().contiguous() for k, v in engine.model.state_dict().items()})
        attack_metrics = prep.attack_metrics
        metrics = {"attack": attack_metrics, **result.metrics} if attack_metrics else result.metrics
        if control is not None:
            metrics["control"] = {**control["metrics"], "stage_hit": float(control["hit"])}
            metrics.setdefault("final", {})["control_asr"] = control["metrics"]["asr"]
        writer.finish(metrics, wall_s=elapsed_before + time.perf_counter() - t_start)
    return store.get(writer.run_id)
