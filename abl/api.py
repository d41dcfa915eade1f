"""The Python API: run an experiment, open a results store, load a run's model.

``import abl`` stays light; these functions (re-exported as ``abl.run``, ``abl.open_store``
and ``abl.load_model``) import torch and the registries on first use::

    record = abl.run("configs/my-run.yaml")        # or a dict, or an Experiment
    model = abl.load_model(record.path)             # an nn.Module with .classes
    store = abl.open_store("runs")                  # every run: store.list_runs()
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from abl.errors import StoreError
from abl.inference import load_model
from abl.store import RunRecord, RunStore


def run(
    config: str | os.PathLike | Mapping[str, Any] | Any,
    overrides: Sequence[str] = (),
    runs_dir: str | os.PathLike | None = None,
) -> RunRecord:
    """Run one experiment as ``abl run`` does and return its record (``.path``, ``.metrics``).

    ``config`` is a YAML file (relative input paths read against its folder), a mapping
    with the same keys (relative paths read against the current directory), or a built
    :class:`~abl.experiment.Experiment`. ``overrides`` are ``key=value`` strings as for
    ``--set``; ``runs_dir`` replaces ``output.runs_dir``. Bad input raises
    :class:`~abl.errors.AblError` (a one-line message) before any training.
    """
    from abl.experiment import Experiment, load_experiment, run_experiment

    if isinstance(config, Experiment):
        if overrides:
            raise TypeError("overrides apply to a config file or mapping, not to a built Experiment")
        exp = config
    elif isinstance(config, (str, os.PathLike)):
        exp = load_experiment(config, list(overrides))
    elif isinstance(config, Mapping):
        exp = load_experiment(None, list(overrides), base=dict(config))
    else:
        raise TypeError(f"config must be a YAML path, a mapping or an Experiment, not {type(config).__name__}")
    if runs_dir is not None:
        exp.output.runs_dir = str(runs_dir)
    return run_experiment(exp)


def open_store(runs_dir: str | os.PathLike = "runs") -> RunStore:
    """The results store at ``runs_dir``: ``list_runs()``, ``get(run_id)``, each record's
    ``metrics``, ``history()``, ``array(name)``. Raises StoreError if the folder is missing."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise StoreError(f"runs folder '{root}' does not exist; run an experiment first or give the right folder")
    return RunStore(root)


__all__ = ["load_model", "open_store", "run"]
