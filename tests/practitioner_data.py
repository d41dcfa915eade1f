"""A practitioner's poisoned image folder, built from real CIFAR-10 images.

What a user who scraped a dataset may hold without knowing it: ``train/<class>/*.png``
where ``rate`` of the images carry a sticker pasted by an attacker and were moved into
one class's folder. The sticker is our own design (not one of the registered attacks):
a 5x5 yellow square with a dark-blue diagonal cross, pasted at a random spot inside the
top-left quarter of the image, so its position varies from image to image. ABL runs on
the folder with ``attack: null``; the returned list of poisoned files is the ground truth
the isolated files are scored against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

STICKER = 5


def sticker() -> np.ndarray:
    """The 5x5x3 uint8 sticker: yellow with a dark-blue X."""
    s = np.zeros((STICKER, STICKER, 3), dtype=np.uint8)
    s[:] = (250, 215, 20)
    for i in range(STICKER):
        s[i, i] = s[i, STICKER - 1 - i] = (20, 30, 120)
    return s


def paste(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``img`` (H, W, 3) with the sticker at a random spot of its top-left quarter."""
    h, w = img.shape[:2]
    y = int(rng.integers(1, max(2, h // 2 - STICKER)))
    x = int(rng.integers(1, max(2, w // 2 - STICKER)))
    out = img.copy()
    out[y : y + STICKER, x : x + STICKER] = sticker()
    return out


def make_poisoned_folder(
    cifar_root: Path,
    out: Path,
    *,
    per_class: int = 400,
    test_per_class: int = 100,
    rate: float = 0.1,
    target: str = "airplane",
    seed: int = 0,
) -> list[str]:
    """Write ``out/train/<class>/*.png`` and ``out/test/<class>/*.png`` from the CIFAR-10
    image folders at ``cifar_root``; return the poisoned files (relative to ``out``).

    ``rate`` of all training images, drawn from the non-target classes, get the sticker and
    are written into the ``target`` folder under an innocuous name.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (cifar_root / "train").iterdir() if p.is_dir())
    n_total = per_class * len(classes)
    n_poison = int(round(rate * n_total))
    chosen: dict[str, list[Path]] = {}
    for c in classes:
        files = sorted((cifar_root / "train" / c).iterdir())
        chosen[c] = [files[i] for i in rng.permutation(len(files))[:per_class]]
    candidates = [(c, f) for c in classes if c != target for f in chosen[c]]
    poison_pick = {candidates[i] for i in rng.permutation(len(candidates))[:n_poison].tolist()}
    poisoned: list[str] = []
    for c in classes:
        (out / "train" / c).mkdir(parents=True, exist_ok=True)
    for c in classes:
        for f in chosen[c]:
            img = np.asarray(Image.open(f).convert("RGB"))
            if (c, f) in poison_pick:
                rel = Path("train") / target / f"{c}_{f.stem}.png"
                Image.fromarray(paste(img, rng)).save(out / rel)
                poisoned.append(rel.as_posix())
            else:
                Image.fromarray(img).save(out / "train" / c / f"{f.stem}.png")
    for c in classes:
        (out / "test" / c).mkdir(parents=True, exist_ok=True)
        files = sorted((cifar_root / "test" / c).iterdir())[:test_per_class]
        for f in files:
            Image.open(f).convert("RGB").save(out / "test" / c / f"{f.stem}.png")
    return sorted(poisoned)
