"""Use a finished run's model: load it, classify image files, evaluate a folder, export it.

The run folder holds the weights (``model.safetensors``) and the resolved config; the
architecture is rebuilt from the config through the model registry and the weights loaded
from safetensors (nothing is unpickled). :func:`load_model` wraps the network in a
:class:`Classifier` that takes images as users hold them and prepares them as the run's
dataset did, so the same code serves arrays in memory, image files and an exported file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abl.errors import AblError, DataError, StoreError
from abl.store import FINISHED, RunRecord, RunStore

BATCH = 256  # images decoded and classified at a time (bounds memory on large folders)
EXPORT_FORMATS = ("torchscript", "onnx")


class Classifier(nn.Module):
    """A run's network behind the run's input pipeline; ``forward`` returns logits.

    Takes uint8 images (values 0-255) or float images in [0, 1], as a batch ``(N, H, W, 3)``
    or ``(N, 3, H, W)`` or one image ``(H, W, 3)`` / ``(3, H, W)``, of any size: a dimension
    of length 3 right after the batch one is read as channels first. Images are divided by
    255 (uint8) and resized to the run's ``image_size`` as its dataset did (bilinear,
    antialiased; for ``imagefolder`` runs the shorter side, keeping the centre square).
    The zoo's models normalise nothing else. ``classes[i]`` names logit ``i``.

    Written so that ``torch.jit.script`` compiles it: :func:`export_model` ships this input
    handling inside the exported file.
    """

    def __init__(self, net: nn.Module, classes: list[str], image_size: int, crop: bool) -> None:
        super().__init__()
        self.net = net
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.crop = bool(crop)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as float ``(N, 3, image_size, image_size)`` in [0, 1]."""
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4:
            raise ValueError("images must be (N, H, W, 3) or (N, 3, H, W), or one image (H, W, 3) or (3, H, W)")
        if x.shape[1] != 3:
            if x.shape[3] != 3:
                raise ValueError("images must have 3 colour channels, first or last: (N, 3, H, W) or (N, H, W, 3)")
            x = x.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        else:
            x = x.float()
            # float images in 0-255 would otherwise be classified as near-white, silently
            if x.numel() > 0 and (bool(x.min() < -1e-3) or bool(x.max() > 1.001)):
                raise ValueError("float images must be in [0, 1]: divide 0-255 values by 255, or pass uint8")
        size = self.image_size
        h, w = x.shape[2], x.shape[3]
        if h != size or w != size:
            if self.crop and h != w:
                s = min(h, w)
                top, left = (h - s) // 2, (w - s) // 2
                x = x[:, :, top : top + s, left : left + s]
            x = F.interpolate(x, size=[size, size], mode="bilinear", align_corners=False, antialias=True)
        return x.contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

    @torch.jit.unused
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class indices, their softmax probabilities)`` of ``images``, without gradients."""
        with torch.inference_mode():
            probs = self(images).float().softmax(1)
        p, idx = probs.max(1)
        return idx, p


# --------------------------------------------------------------------------- loading


def resolve_run(run: str | os.PathLike | RunRecord, runs_dir: str | os.PathLike | None = None) -> RunRecord:
    """A run from its record, its folder, or its id (or unique id prefix) in ``runs_dir``
    (default ``runs``)."""
    if isinstance(run, RunRecord):
        return run
    folder = Path(run)
    if runs_dir is None and folder.is_dir():
        if (folder / "meta.json").is_file():
            return RunStore(folder.resolve().parent).get(folder.resolve().name)
        raise StoreError(f"'{folder}' is not a run folder (it has no meta.json); give a run folder, or a run id "
                         "with --runs-dir (runs_dir=)")
    root = Path(runs_dir if runs_dir is not None else "runs")
    if not root.is_dir():
        raise StoreError(
            f"'{run}' is not a run folder (no meta.json there) and the runs folder '{root}' does not exist; "
            "give a run folder, or a run id with --runs-dir (runs_dir=)"
        )
    return RunStore(root).get(str(run))


def _fc_rows(state: dict[str, torch.Tensor]) -> int:
    """The number of classes: rows of the final linear layer (``fc``, the zoo's contract)."""
    for key in ("fc.weight", "net.fc.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise AblError("the saved model has no final layer 'fc'; it was not written by this version of abl")


def _build_network(config: dict[str, Any], state: dict[str, torch.Tensor], n_classes: int, size: int) -> nn.Module:
    """The run's architecture, from its config through the registry."""
    if "net.fc.weight" in state:
        # finetune_imagenet replaced the network by a torchvision ResNet-34 behind ImageNet
        # normalisation; the weights file holds it all, so no pretrained download is needed
        import torchvision

        from abl.unlearning.table8 import _ImageNetInput

        unlearner = (config.get("defense") or {}).get("unlearner") or {}
        net = torchvision.models.resnet34()
        net.fc = nn.Linear(net.fc.in_features, n_classes)
        return _ImageNetInput(net, int(unlearner.get("resize", 0) or 0))
    from abl.models import MODELS

    spec = config.get("model")
    if not isinstance(spec, dict):
        raise AblError("the run's config.yaml has no 'model' section; it was not written by abl run")
    return MODELS.create(spec, "model").build(n_classes, size)


def _class_names(dataset: Any, n_classes: int) -> list[str]:
    """The run's class names, read from what its dataset config points at (cheap: folder
    names or array headers); ``'0'..'C-1'`` where they cannot be known any more."""
    from abl.data import imageio
    from abl.data.arrays import Arrays
    from abl.data.datasets import CIFAR10, CIFAR10_CLASSES, GTSRB, GTSRB_CLASSES, ImageFolder

    names: list[str] | None = None
    try:
        if isinstance(dataset, Arrays):
            names = dataset.peek()[1]
        elif isinstance(dataset, ImageFolder) or (isinstance(dataset, CIFAR10) and dataset.root):
            train = Path(str(dataset.root)) / "train"
            if train.is_dir():
                names = imageio.list_class_dirs(train)
            elif isinstance(dataset, CIFAR10):
                names = list(CIFAR10_CLASSES)
        elif isinstance(dataset, CIFAR10):
            names = list(CIFAR10_CLASSES)
        elif isinstance(dataset, GTSRB):
            names = list(GTSRB_CLASSES)
    except DataError:
        names = None  # the data moved: numbered classes still let the model be used
    if names is None or len(names) != n_classes:
        names = [str(i) for i in range(n_classes)]
    return names


def _image_size(dataset: Any) -> int:
    from abl.data.arrays import Arrays

    if isinstance(dataset, Arrays):
        return dataset.peek()[0]
    size = getattr(dataset, "size", None)
    if not isinstance(size, int) or isinstance(size, bool):
        raise AblError(f"cannot tell the image size of dataset '{type(dataset).__name__}' from the run's config")
    return size


def load_model(
    run: str | os.PathLike | RunRecord, runs_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> Classifier:
    """The model a finished run saved, ready to classify images (eval mode).

    ``run`` is a run folder, a run id (or unique prefix) in ``runs_dir`` (default ``runs``),
    or a :class:`~abl.store.RunRecord`. Returns a :class:`Classifier`: call it on a batch of
    uint8 or [0, 1] float images of any size for logits; ``.classes`` names the outputs,
    ``.predict(images)`` gives class indices and probabilities. The weights come from
    ``model.safetensors``; the architecture is rebuilt from the run's ``config.yaml``.
    """
    from abl.data import DATASETS

    rec = resolve_run(run, runs_dir)
    if rec.status != FINISHED:
        raise StoreError(f"run {rec.run_id} is {rec.status}; only a finished run has a model to load")
    if not (rec.path / "model.safetensors").is_file():
        raise StoreError(
            f"run {rec.run_id} saved no model (model.safetensors); rerun it with output.save_model: true"
        )
    state = rec.tensors("model")
    config = rec.config
    dataset = DATASETS.create(config.get("dataset") or {}, "dataset")
    n_classes = _fc_rows(state)
    size = _image_size(dataset)
    net = _build_network(config, state, n_classes, size)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["mismatch"])[0]
        raise StoreError(
            f"run {rec.run_id}: model.safetensors does not fit the model its config names ({first})"
        ) from None
    from abl.data.datasets import ImageFolder

    model = Classifier(net, _class_names(dataset, n_classes), size, crop=isinstance(dataset, ImageFolder))
    return model.to(device).eval()


# --------------------------------------------------------------------------- files


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each image file named, and every image under each folder named (recursively, sorted)."""
    from abl.data import imageio

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = imageio.list_images(p)
            if not found:
                raise DataError(f"folder '{p}' holds no images ({', '.join(imageio.IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"'{p}' does not exist; give image files or folders of images")
    return out


def classify_files(model: Classifier, files: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class index, probability)`` per file. Files are decoded exactly as the run's
    dataset decoded its images (same resize and crop), then classified in batches."""
    from abl.data import imageio

    size, crop = model.image_size, model.crop
    device = next(model.parameters()).device
    indices, probs = [], []
    for start in range(0, len(files), BATCH):
        chunk = imageio.decode_images(files[start : start + BATCH], size, crop=crop)
        idx, p = model.predict(torch.from_numpy(chunk).to(device))
        indices.append(idx.cpu())
        probs.append(p.cpu())
    if not indices:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(indices), torch.cat(probs)


def predict_csv(model: Classifier, paths: Iterable[str | os.PathLike]) -> str:
    """CSV text with a header ``file,class,probability`` and one row per image file under
    ``paths`` (files, or folders searched recursively), the file as given or found."""
    files = image_files(paths)
    idx, p = classify_files(model, files)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "class", "probability"])
    for f, i, q in zip(files, idx.tolist(), p.tolist()):
        writer.writerow([str(f), model.classes[i], f"{q:.4f}"])
    return buf.getvalue()


# --------------------------------------------------------------------------- evaluate


@dataclass
class Evaluation:
    """What :func:`evaluate_folder` measured.

    ``correct``/``labelled`` count images in class folders (``None`` for a folder without
    labels). ``target_hits`` of ``target_total`` images were classified as ``target``; with
    labels, images whose own folder is the target class are left out of that count, as the
    attack success rate does.
    """

    images: int
    correct: int | None = None
    labelled: int | None = None
    classes_seen: int | None = None
    target: str | None = None
    target_hits: int | None = None
    target_total: int | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.correct is not None and self.labelled else None

    @property
    def target_share(self) -> float | None:
        return self.target_hits / self.target_total if self.target_hits is not None and self.target_total else None


def _labelled_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int], int]:
    from abl.data import imageio

    index = {name: i for i, name in enumerate(classes)}
    folders = imageio.list_class_dirs(root)
    loose = [p for p in root.iterdir() if p.is_file() and imageio.is_image_file(p.name) and not p.name.startswith(".")]
    if loose:
        raise DataError(f"'{root}' holds class folders and loose images ('{loose[0].name}'); move the images into "
                        "class folders, or evaluate a folder of loose images with --target only")
    unknown = [f for f in folders if f not in index]
    if unknown:
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise DataError(f"class folder '{root / unknown[0]}' is not one of the run's classes ({shown}); rename or "
                        "remove it")
    files: list[Path] = []
    labels: list[int] = []
    for name in folders:
        found = imageio.list_images(root / name)
        if not found:
            raise DataError(f"class folder '{root / name}' has no images ({', '.join(imageio.IMAGE_EXTENSIONS)})")
        files += found
        labels += [index[name]] * len(found)
    return files, labels, len(folders)


def evaluate_folder(model: Classifier, root: str | os.PathLike, target: str | None = None) -> Evaluation:
    """Accuracy on ``root/<class>/*`` (class folders named as the run's classes, any subset)
    and, with ``target``, the share of images classified as that class.

    A folder with images but no class folders has no labels: it needs ``target`` (the share
    of all its images sent there), e.g. test images carrying a trigger you found.
    """
    from abl.data import imageio

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder; give a folder of <class>/<image> folders (or of images with --target)")
    if target is not None and target not in model.classes:
        shown = ", ".join(model.classes[:12]) + (", ..." if len(model.classes) > 12 else "")
        raise AblError(f"--target '{target}' is not one of the run's classes ({shown})")
    if imageio.list_class_dirs(root):
        files, labels, n_folders = _labelled_files(root, model.classes)
    else:
        if target is None:
            raise DataError(f"'{root}' holds no class folders: give <class>/<image> folders named as the run's classes, "
                            "or pass --target CLASS to count the images classified as CLASS")
        files, labels, n_folders = image_files([root]), [], 0
    idx, _ = classify_files(model, files)
    result = Evaluation(images=len(files))
    if labels:
        y = torch.tensor(labels)
        result.correct, result.labelled, result.classes_seen = int((idx == y).sum()), len(labels), n_folders
    if target is not None:
        t = model.classes.index(target)
        keep = torch.tensor(labels) != t if labels else torch.ones(len(files), dtype=torch.bool)
        result.target, result.target_hits, result.target_total = target, int((idx[keep] == t).sum()), int(keep.sum())
    return result


def evaluation_lines(ev: Evaluation) -> list[str]:
    """The evaluation as the lines ``abl evaluate`` prints."""
    lines = []
    if ev.accuracy is not None:
        lines.append(f"accuracy: {100 * ev.accuracy:.1f}% ({ev.correct} of {ev.labelled} images correct, "
                     f"{ev.classes_seen} class folder{'s' if ev.classes_seen != 1 else ''})")
    if ev.target is not None:
        if ev.target_total:
            of = "images from the other classes" if ev.labelled else "images"
            lines.append(f"classified as '{ev.target}': {100 * ev.target_share:.1f}% ({ev.target_hits} of "
                         f"{ev.target_total} {of})")
        else:
            lines.append(f"classified as '{ev.target}': no images outside the '{ev.target}' folder to count")
    return lines


# --------------------------------------------------------------------------- export


def export_model(model: Classifier, out: str | os.PathLike, fmt: str = "torchscript") -> Path:
    """Write ``model`` to ``out`` for use without abl, atomically (a failed export leaves no file).

    ``torchscript``: the whole :class:`Classifier`, input handling included (uint8 or
    float, either channel order, any size); plain ``torch.jit.load(out)`` runs it, and
    ``.classes`` is kept on the module (also as ``abl.json`` in the archive).
    ``onnx`` (needs ``pip install 'abl[onnx]'``): input ``images``, uint8
    ``(N, 3, S, S)`` at the run's image size ``S``, output ``logits``; the class names are
    in the model's metadata under ``abl``.
    """
    if fmt not in EXPORT_FORMATS:
        raise AblError(f"unknown export format '{fmt}'; use one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise AblError(f"export target '{out}' is a folder; give a file name such as model.pt")
    if not out.parent.is_dir():
        raise AblError(f"cannot write '{out}': folder '{out.parent}' does not exist")
    meta = json.dumps({"classes": model.classes, "image_size": model.image_size, "crop": model.crop})
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 marks TorchScript deprecated; the file it writes still loads everywhere
            warnings.simplefilter("ignore", FutureWarning)
            if fmt == "torchscript":
                _export_torchscript(model, tmp, meta)
            else:
                _export_onnx(model, tmp, meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an exported model is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        Path(tmp + ".data").unlink(missing_ok=True)  # ONNX weights, in case an exporter wrote them beside
    return out


def _export_torchscript(model: Classifier, path: str, meta: str) -> None:
    device = next(model.parameters()).device
    example = torch.rand(1, 3, model.image_size, model.image_size, device=device)
    with torch.no_grad():
        # the zoo's forward passes do not branch on data, so a trace of the network is exact;
        # the wrapper's input handling does branch, so it is scripted around the trace
        traced = torch.jit.trace(model.net.eval(), example, check_trace=False)
    scripted = torch.jit.script(Classifier(traced, model.classes, model.image_size, model.crop).eval())
    torch.jit.save(scripted, path, _extra_files={"abl.json": meta})


def _export_onnx(model: Classifier, path: str, meta: str) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise AblError("ONNX export needs the onnx extra: pip install 'abl[onnx]' (onnx, onnxscript)") from None
    size = model.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8, device=next(model.parameters()).device)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(
            model.eval(), (example,), path, dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, external_data=False,
        )
    proto = onnx.load(path)
    proto.metadata_props.add(key="abl", value=meta)
    onnx.save(proto, path)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, so a failed write leaves no
    half-written result under the final name."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AblError(f"cannot write '{path}': folder '{path.parent}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # as a plain open() would have made it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "Classifier", "Evaluation", "classify_files", "evaluate_folder", "evaluation_lines", "export_model",
    "image_files", "load_model", "predict_csv", "resolve_run", "write_atomic",
]
