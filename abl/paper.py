"""Numbers from the ABL paper's appendix that our comparisons print beside ours.

Source: Li, Lyu, Koren, Lyu, Li & Ma, "Anti-Backdoor Learning: Training Clean Models on
Poisoned Data", NeurIPS 2021 (arXiv 2110.11571), appendix; the section and table of each
value are given with it. CIFAR-10, WideResNet-16-1, BadNets at 10% poisoning, 1% isolated.
"""

from __future__ import annotations

#: Table 8 (appendix B.7): unlearning methods on the same 1% isolation by ABL. Values in
#: percent: the backdoored model was ASR 100 / CA 85.43 for every row.
TABLE8_SOURCE = "Li et al., NeurIPS 2021, appendix B.7, Table 8 (CIFAR-10, BadNets, 1% isolated)"
TABLE8_BACKDOORED = {"asr": 100.0, "clean_acc": 85.43}
TABLE8: dict[str, dict[str, float | str | bool]] = {
    "pixel_noise": {"label": "Pixel Noise", "type": "image-based", "discard": False, "asr": 100.0, "clean_acc": 84.72},
    "grad_noise": {"label": "Grad Noise", "type": "image-based", "discard": False, "asr": 100.0, "clean_acc": 84.63},
    "label_shuffling": {"label": "Label Shuffling", "type": "label-based", "discard": False, "asr": 99.98, "clean_acc": 82.76},
    "label_uniform": {"label": "Label Uniform", "type": "label-based", "discard": False, "asr": 99.92, "clean_acc": 83.47},
    "label_smoothing": {"label": "Label Smoothing", "type": "label-based", "discard": False, "asr": 100.0, "clean_acc": 84.71},
    "self_learning": {"label": "Self-Learning", "type": "label-based", "discard": False, "asr": 100.0, "clean_acc": 83.91},
    "finetune_all": {"label": "Finetuning All Layers", "type": "model-based", "discard": True, "asr": 100.0, "clean_acc": 85.02},
    "finetune_last": {"label": "Finetuning Last Layers", "type": "model-based", "discard": True, "asr": 100.0, "clean_acc": 67.32},
    "finetune_imagenet": {"label": "Finetuning ImageNet Model", "type": "model-based", "discard": True, "asr": 100.0,
                          "clean_acc": 73.43},
    "retrain": {"label": "Re-training from Scratch", "type": "model-based", "discard": True, "asr": 100.0, "clean_acc": 85.24},
    "gga": {"label": "ABL (GGA)", "type": "model-based", "discard": False, "asr": 3.04, "clean_acc": 86.11},
}

#: Table 7 (appendix B.5): precision (%) of the 1% isolated examples at the 20th epoch, by
#: the LGA threshold gamma; gamma = 0 is plain cross-entropy training.
TABLE7_SOURCE = "Li et al., NeurIPS 2021, appendix B.5, Table 7 (BadNets, 1% isolated, epoch 20)"
TABLE7: dict[str, dict[float, float]] = {
    "cifar10": {0.0: 26.0, 0.5: 100.0, 1.0: 100.0, 1.5: 100.0},
    "gtsrb": {0.0: 89.0, 0.5: 100.0, 1.0: 100.0, 1.5: 100.0},
    "imagenet_subset": {0.0: 21.0, 0.5: 100.0, 1.0: 100.0, 1.5: 100.0},
}
