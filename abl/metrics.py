"""Named evaluation metrics: every evaluator returns ``dict[str, float]``.

Definitions follow the ABL paper (Li et al., NeurIPS 2021): CA is accuracy on the clean
test set; ASR is, among triggered test images whose true label is not the attack label,
the fraction classified as the attack label; RA is the fraction of those classified as
their true label; ``clean_acc_nontarget`` is CA on the test images outside the target
class of an all-to-one attack (the authors' code, bboylyg/ABL at 3fd736c, reports this as
its clean accuracy); isolation precision/recall compare the isolated set with the true
poison mask.
"""

from __future__ import annotations

import torch

from abl.data.loader import to_float
from abl.data.types import ImageSplit, TriggeredTestSet


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Predicted labels for uint8 images, in eval mode, in large batches."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    preds = []
    for s in range(0, len(images), batch_size):
        x = to_float(images[s : s + batch_size].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            preds.append(model(x).argmax(1))
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)


def clean_accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds == labels.to(preds.device)).float().mean()) if len(labels) else float("nan")


def attack_metrics(preds: torch.Tensor, triggered: TriggeredTestSet) -> dict[str, float]:
    """ASR and robust accuracy on a triggered test set (already restricted to flippable images)."""
    if len(triggered) == 0:
        return {"asr": float("nan"), "robust_acc": float("nan")}
    attack = triggered.attack_labels.to(preds.device)
    true = triggered.true_labels.to(preds.device)
    return {
        "asr": float((preds == attack).float().mean()),
        "robust_acc": float((preds == true).float().mean()),
    }


def isolation_metrics(isolated: torch.Tensor, poison_mask: torch.Tensor) -> dict[str, float]:
    """Precision ``TP / (TP + FP)`` and recall ``TP / #poisoned`` of the isolated indices."""
    mask = poison_mask.cpu()
    iso = isolated.cpu().long()
    tp = int(mask[iso].sum()) if len(iso) else 0
    n_poison = int(mask.sum())
    if n_poison == 0:  # no ground truth (a clean or real-world dataset): nothing to score
        return {"iso_precision": float("nan"), "iso_recall": float("nan"), "iso_count": float(len(iso))}
    return {
        "iso_precision": tp / len(iso) if len(iso) else float("nan"),
        "iso_recall": tp / n_poison if n_poison else float("nan"),
        "iso_count": float(len(iso)),
    }


def evaluate(
    model: torch.nn.Module,
    clean: ImageSplit,
    triggered: TriggeredTestSet | None,
    **predict_kw,
) -> dict[str, float]:
    """CA, and ASR/RA when a triggered test set is given (plus CA without the target class
    when every triggered image has the same attack label, i.e. an all-to-one attack)."""
    preds = predict(model, clean.images, **predict_kw)
    out = {"clean_acc": clean_accuracy(preds, clean.labels)}
    if triggered is not None:
        out.update(attack_metrics(predict(model, triggered.images, **predict_kw), triggered))
        target = single_attack_label(triggered)
        if target is not None:
            keep = clean.labels.to(preds.device) != target
            out["clean_acc_nontarget"] = clean_accuracy(preds[keep], clean.labels.to(preds.device)[keep])
    return out


def single_attack_label(triggered: TriggeredTestSet) -> int | None:
    """The target of an all-to-one triggered set; ``None`` if it is empty or its attack labels differ."""
    labels = triggered.attack_labels
    if len(labels) == 0 or not bool((labels == labels[0]).all()):
        return None
    return int(labels[0])


#: the evaluation metrics a defense reports after each phase
METRIC_KEYS = ("clean_acc", "clean_acc_nontarget", "asr", "robust_acc")


def phase_metrics(engine) -> dict[str, float]:  # noqa: ANN001  (an Engine; no import cycle)
    """The full evaluation recorded at the last epoch of the phase just run."""
    last = engine.history[-1]
    return {k: float(last[k]) for k in METRIC_KEYS if k in last}
