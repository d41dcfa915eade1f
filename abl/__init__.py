"""abl: Anti-Backdoor Learning (Li et al., NeurIPS 2021) and the attacks to test it."""

__version__ = "0.1.0"
