"""Using a finished run's model as the README tells a user to: train on an image folder,
``abl predict`` a few files, ``abl evaluate`` a clean and a triggered folder, ``abl export``
and load the export with plain torch; every number is checked against the run's own network
applied to the same decoded images."""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import abl
from abl.cli import main
from abl.data import imageio
from abl.errors import AblError
from abl.store import RunStore
from practitioner_data import make_poisoned_folder, paste

pytestmark = pytest.mark.xdist_group("inference")

TARGET = "airplane"


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("abl: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def folder_run(cifar10_root, tmp_path_factory):
    """`abl run` on a 200-image poisoned folder (real CIFAR-10 images at 24x24, the test
    images 30x24, so the resize and centre crop are exercised), tiny ABL, one thread;
    returns (run folder, data, work dir)."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("inference")
    data = work / "mine"
    make_poisoned_folder(cifar10_root, data, per_class=20, test_per_class=4, rate=0.1, target=TARGET)
    for png in data.rglob("*.png"):  # the user's images need not be the run's size, nor square
        Image.open(png).resize((24, 24) if png.parts[-3] == "train" else (30, 24)).save(png)
    cfg = {
        "name": "inference",
        "dataset": {"name": "imagefolder", "root": "mine", "size": 32},
        "model": {"name": "small_cnn", "width": 8},
        "attack": None,
        "defense": {"name": "abl", "isolation_epochs": 2, "recovery_epochs": 1, "unlearning_epochs": 1,
                    "isolation_rate": 0.05},
        "train": {"progress": False, "batch_size": 32, "threads": 1},
        "output": {"runs_dir": str(work / "runs"), "cache_dir": str(work / "cache")},
    }
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(work / "cfg.yaml")]) == 0
    (rec,) = RunStore(work / "runs").list_runs()
    return rec.path, data, work


def reference(run: Path, files: list[Path]) -> torch.Tensor:
    """The run's logits for ``files`` computed by hand: the dataset's own decoding (shorter
    side to 32, centre crop), /255, the saved weights in a network built from the config."""
    from safetensors.torch import load_file

    from abl.models import MODELS

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    net = MODELS.create(cfg["model"]).build(10, 32)
    net.load_state_dict(load_file(run / "model.safetensors"))
    x = torch.from_numpy(imageio.decode_images(files, 32, crop=True)).float() / 255
    with torch.no_grad():
        return net.eval()(x)


def triggered_folder(data: Path, out: Path, labelled: bool) -> list[Path]:
    """The test images (all classes) with the attacker's sticker pasted on."""
    rng = np.random.default_rng(1)
    written = []
    for f in sorted((data / "test").rglob("*.png")):
        dest = out / f.parent.name / f.name if labelled else out / f"{f.parent.name}-{f.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(paste(np.asarray(Image.open(f).convert("RGB")), rng)).save(dest)
        written.append(dest)
    return written


def test_load_model_matches_the_run(folder_run):
    run, data, work = folder_run
    model = abl.load_model(run)
    assert model.classes == sorted(p.name for p in (data / "train").iterdir())
    files = sorted((data / "test").rglob("*.png"))[:12]
    ref = reference(run, files)
    decoded = torch.from_numpy(imageio.decode_images(files, 32, crop=True))
    with torch.no_grad():
        assert torch.allclose(model(decoded), ref, atol=1e-5)  # uint8 NCHW
        assert torch.allclose(model(decoded.permute(0, 2, 3, 1)), ref, atol=1e-5)  # uint8 NHWC
        assert torch.allclose(model(decoded.float() / 255), ref, atol=1e-5)  # float [0, 1]
        assert torch.allclose(model(decoded[0]), ref[:1], atol=1e-5)  # one image
        # any size: 30x24 arrays are centre-cropped and resized to the run's 32 inside the model,
        # in torch (bilinear, antialiased) as Pillow did for the run: close, not bit-equal
        raw = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
        assert torch.allclose(model(raw), ref, atol=0.02)
        # by run id in a runs folder, the same weights
        by_id = abl.load_model(run.name[:15], runs_dir=run.parent)
        assert torch.equal(by_id(decoded), model(decoded))
        with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
            model(decoded.float())


def test_predict_writes_a_csv_of_files_classes_and_probabilities(folder_run, capsys, monkeypatch):
    run, data, work = folder_run
    monkeypatch.chdir(work)
    a, b = sorted((data / "test" / "cat").glob("*.png"))[:2]
    code, out, err = cli(["predict", run, a.relative_to(work), b, Path("mine/test/dog"), "--out", "preds.csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO((work / "preds.csv").read_text())))
    dog = sorted((data / "test" / "dog").glob("*.png"))
    assert [r["file"] for r in rows] == [str(a.relative_to(work)), str(b)] + [str(f.relative_to(work)) for f in dog]
    probs = reference(run, [a, b, *dog]).softmax(1)
    classes = abl.load_model(run).classes
    assert [r["class"] for r in rows] == [classes[i] for i in probs.argmax(1).tolist()]
    assert np.allclose([float(r["probability"]) for r in rows], probs.max(1).values.numpy(), atol=1e-4)
    # without --out the CSV goes to stdout
    code, out, err = cli(["predict", run.name, a, "--runs-dir", run.parent], capsys)
    assert code == 0 and out.splitlines()[0] == "file,class,probability" and len(out.splitlines()) == 2


def _numbers(line: str) -> tuple[int, int]:
    m = re.search(r"\((\d+) of (\d+) ", line)
    assert m, line
    return int(m.group(1)), int(m.group(2))


def test_evaluate_clean_and_triggered_folders(folder_run, capsys):
    run, data, work = folder_run
    classes = abl.load_model(run).classes
    # clean accuracy on the run's test folder
    files = sorted((data / "test").rglob("*.png"))
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    correct = int((reference(run, files).argmax(1) == labels).sum())
    code, out, err = cli(["evaluate", run, "--data", data / "test"], capsys)
    assert code == 0, err
    assert out.startswith("accuracy: ") and _numbers(out) == (correct, len(files)), out
    # a triggered copy with labels: the share of the other classes' images sent to --target.
    # A two-epoch model has barely learned the sticker, so the class it sends most triggered
    # images to is the target checked, which makes the count non-zero
    trig = triggered_folder(data, work / "triggered", labelled=True)
    pred = reference(run, trig).argmax(1)
    t = int(pred.bincount(minlength=10).argmax())
    others = torch.tensor([f.parent.name != classes[t] for f in trig])
    hits = int((pred[others] == t).sum())
    assert hits > 0
    code, out, err = cli(["evaluate", run, "--data", work / "triggered", "--target", classes[t]], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith(f"classified as '{classes[t]}'"))
    assert _numbers(line) == (hits, int(others.sum())) and "other classes" in line
    # the same images without labels (a flat folder) need --target only; all are counted
    flat = triggered_folder(data, work / "flat", labelled=False)
    code, out, err = cli(["evaluate", run, "--data", work / "flat", "--target", classes[t]], capsys)
    assert code == 0 and out.count("\n") == 1 and _numbers(out) == (int((pred == t).sum()), len(flat)), out


def test_evaluate_errors_are_one_line(folder_run, capsys, tmp_path):
    run, data, _ = folder_run
    odd = tmp_path / "odd"
    (odd / "cat").mkdir(parents=True)
    (odd / "zebra").mkdir()
    for d in ("cat", "zebra"):
        Image.new("RGB", (8, 8)).save(odd / d / "x.png")
    one_line_error(*cli(["evaluate", run, "--data", odd], capsys)[::2], "odd/zebra'", "not one of the run's classes")
    one_line_error(*cli(["evaluate", run, "--data", data / "test", "--target", "zebra"], capsys)[::2],
                   "--target 'zebra' is not one of the run's classes")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    one_line_error(*cli(["evaluate", run, "--data", flat], capsys)[::2], "no class folders", "--target")
    one_line_error(*cli(["predict", run, tmp_path / "absent.png"], capsys)[::2], "does not exist")
    one_line_error(*cli(["predict", "nope", flat, "--runs-dir", run.parent], capsys)[::2], "no run 'nope'")
    one_line_error(*cli(["predict", tmp_path, flat], capsys)[::2], "is not a run folder")


def test_export_torchscript_loads_with_plain_torch_and_matches(folder_run, capsys):
    run, data, work = folder_run
    out_file = work / "model.pt"
    code, out, err = cli(["export", run, "--format", "torchscript", "--out", out_file], capsys)
    assert code == 0 and out_file.is_file() and err == "", err
    files = sorted((data / "test").rglob("*.png"))
    decoded = torch.from_numpy(imageio.decode_images(files, 32, crop=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9: TorchScript is deprecated
        exported = torch.jit.load(str(out_file))
    ref = reference(run, files)
    model = abl.load_model(run)
    raw = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))  # 30x24 NHWC
    with torch.no_grad():
        assert torch.allclose(exported(decoded), ref, atol=1e-5)
        assert torch.allclose(exported(decoded.permute(0, 2, 3, 1).float() / 255), ref, atol=1e-5)
        assert torch.allclose(exported(raw), model(raw), atol=1e-5)  # the resize travels too
    assert list(exported.classes) == model.classes


def test_export_onnx_matches(folder_run, capsys):
    """ONNX through torch's exporter (the dev extra installs onnx, onnxscript, onnxruntime)."""
    import onnxruntime

    run, data, work = folder_run
    out_file = work / "model.onnx"
    code, out, err = cli(["export", run, "--format", "onnx", "--out", out_file], capsys)
    assert code == 0 and out == f"exported: {out_file} (onnx)\n" and err == "", (out, err)
    files = sorted((data / "test").rglob("*.png"))
    decoded = imageio.decode_images(files, 32, crop=True)
    session = onnxruntime.InferenceSession(str(out_file))
    logits = session.run(None, {"images": decoded})[0]
    assert np.allclose(logits, reference(run, files).numpy(), atol=1e-4)
    assert '"classes": ["airplane"' in session.get_modelmeta().custom_metadata_map["abl"]
    assert sorted(p.name for p in work.iterdir() if "model.onnx" in p.name) == ["model.onnx"]  # no weights file or temp beside


def test_runs_without_a_model_are_refused(tmp_path, capsys):
    cfg = {"name": "nomodel", "dataset": {"name": "digits"}, "model": {"name": "small_cnn", "width": 4},
           "defense": {"name": "none", "epochs": 1}, "train": {"progress": False, "threads": 1},
           "output": {"runs_dir": str(tmp_path / "runs"), "save_model": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    (rec,) = RunStore(tmp_path / "runs").list_runs()
    capsys.readouterr()
    one_line_error(*cli(["export", rec.path, "--out", tmp_path / "m.pt"], capsys)[::2], "save_model: true")
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(AblError, match="saved no model"):
        abl.load_model(rec.path)
