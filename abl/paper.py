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

#: Table 6 (appendix B.4): ABL (1% isolated) against four attacks at 10% poisoning, by the
#: turning epoch (the end of isolation): (ASR, CA) in percent.
TABLE6_SOURCE = "Li et al., NeurIPS 2021, appendix B.4, Table 6 (CIFAR-10, 10% poisoning, 1% isolated)"
TABLE6: dict[int, dict[str, tuple[float, float]]] = {
    10: {"badnets": (1.12, 85.30), "trojan": (5.04, 85.12), "blend": (16.34, 84.22), "dynamic": (25.33, 84.12)},
    20: {"badnets": (3.04, 86.11), "trojan": (3.66, 87.46), "blend": (16.23, 84.06), "dynamic": (18.46, 85.34)},
    30: {"badnets": (3.22, 85.60), "trojan": (3.81, 87.25), "blend": (19.87, 83.83), "dynamic": (20.56, 85.23)},
    40: {"badnets": (4.05, 84.28), "trojan": (4.96, 85.14), "blend": (18.78, 81.53), "dynamic": (19.15, 83.44)},
}

#: Table 10 (appendix B.9): 1% poisoning, 1% isolated; (ASR, CA) in percent without defense
#: ("Baseline") and with ABL.
TABLE10_SOURCE = "Li et al., NeurIPS 2021, appendix B.9, Table 10 (CIFAR-10, WRN-16-1, 1% poisoning, 1% isolated)"
TABLE10: dict[str, dict[str, tuple[float, float]]] = {
    "baseline": {"badnets": (99.52, 85.56), "trojan": (97.11, 83.46), "blend": (99.48, 83.32),
                 "dynamic": (99.87, 82.15), "sig": (62.13, 84.01), "cl": (54.39, 83.78)},
    "abl": {"badnets": (3.01, 88.13), "trojan": (3.16, 87.56), "blend": (8.58, 84.43),
            "dynamic": (13.36, 85.09), "sig": (0.01, 88.78), "cl": (0.0, 88.54)},
}

#: Table 11 (appendix B.10): ABL's unlearning on 500 clean images stamped with the trigger
#: Neural Cleanse reverse-engineered; (ASR, CA) in percent for the backdoored model
#: ("Baseline") and after NC + ABL unlearning.
TABLE11_SOURCE = "Li et al., NeurIPS 2021, appendix B.10, Table 11 (CIFAR-10, NC + ABL unlearning)"
TABLE11: dict[str, dict[str, tuple[float, float]]] = {
    "baseline": {"badnets": (100.0, 85.43), "trojan": (100.0, 82.14), "blend": (100.0, 84.51), "sig": (100.0, 84.16)},
    "nc_abl": {"badnets": (0.12, 85.38), "trojan": (5.33, 79.78), "blend": (1.17, 83.11), "sig": (3.21, 80.53)},
}
