"""What the fold trainers and the assembly of one ``cv`` run share: :class:`CVRun`, and the
number format of every probability file it writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kit.paths import Paths
from kit.task import Task

FLOAT_FORMAT = "%.7g"


@dataclass
class CVRun:
    """Everything the fold trainers and the assembly share about one ``cv`` run."""

    paths: Paths
    backbone: str
    weights: object  # "auto" | "random" | a path
    seed: int
    cfg: dict  # resolved train.yaml (+ augment)
    views: tuple  # test-time views
    folds: pd.DataFrame  # folds.csv + row (patch cache row) + y (class index)
    folds_sha: str
    train: object  # kit.data.patches.PatchSet
    test: object
    out: Path  # runs/<name>/
    keys: dict  # patch cache keys
    n_folds: int
    device: object  # torch.device
    params_desc: str
    params_source: dict | None
    training_path: str  # pixels | feature_cache
    hash: str  # config_hash: what a fold's outputs depend on
    task: Task  # the classes (probability columns, the head's outputs) and the metric
    name: str = ""  # the run's folder under runs/ (the backbone unless cv --name)
    printed: bool = False  # the trainable-parameter line, once per run
    issue_source: object = None  # pixel path: the frozen embeddings label_issues trains on
    fused: object = None  # a run named a+b: its parts (kit.training.fusion.Fusion)
