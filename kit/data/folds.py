"""Stratified, image-grouped K-fold split of the clean training images -> ``folds/folds.csv``.

Every image is its own group unless it shares a group with others:

- images whose mask files are byte-identical (:func:`kit.data.dataset.mask_groups`; on the real data
  each cartoon reuses a real image's mask, so a pair must never straddle two folds);
- near-duplicate images or masks found by ``clean`` with perceptual hashes
  (``runs/clean/near_duplicates.csv``, :mod:`kit.data.neardup`);
- images of one patient: the task's ``labels.group`` column (:func:`kit.data.dataset.label_groups`),
  so that one patient never spans two folds;
- images given the same ``group`` in the optional, user-edited ``folds/groups.csv``
  (``sample_index,group``), the hook for any other near-duplicates found by hand.

Groups are merged transitively and written as folds.csv's ``group`` column, which the inner
splits of every fold (early stopping, label issues, the probe) keep together too.
``runs/folds/config.yaml`` records which of these sources were used (with the files' sha256),
and a refused overwrite names the source that changed.

The split is scikit-learn's ``StratifiedGroupKFold``; the file it produces is sorted by
``sample_index`` and byte-identical for the same inputs and seed. Later stages record
:func:`folds_hash` so that predictions made with one split are never mixed with another;
hence :func:`run_folds` refuses to overwrite a different split unless ``force=True``.
"""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kit import CLASSES
from kit.artifacts import read_folds
from kit.config import given
from kit.data.clean import clean_train_samples
from kit.data.dataset import Dataset, Sample, label_groups, load_dataset, mask_groups
from kit.data.neardup import near_duplicates_csv, read_near_duplicates
from kit.paths import Paths
from kit.task import as_data
from kit.utils import (
    KitError,
    atomic_write_bytes,
    check_random_state,
    connected_components,
    read_csv_columns,
    sha256_bytes,
    sha256_file,
    write_config,
)

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("sample_index", "group")


class StratifiedGroupFolds:
    """K-fold with stratified classes and whole groups per fold (scikit-learn interface).

    Parameters
    ----------
    n_splits : int
        Number of folds, at least 2.
    shuffle : bool
        Shuffle the order in which groups are placed (breaks ties between groups with the
        same class profile); without it the split depends only on the input order.
    random_state : int, numpy Generator or None
        Turned into a Generator by :func:`kit.utils.check_random_state`, from which one
        integer in ``[0, 2**31 - 1)`` is drawn per :meth:`split` call and handed to
        scikit-learn's ``StratifiedGroupKFold``. An int therefore gives the same split on
        every call, a Generator advances (each call differs), None draws fresh entropy.
        Ignored when ``shuffle`` is False.
    """

    def __init__(self, n_splits: int = 5, shuffle: bool = True, random_state=None):
        self.n_splits = n_splits
        self.shuffle = shuffle
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits

    def split(self, X, y, groups):
        """Yield ``(train_idx, test_idx)`` index arrays, one pair per fold.

        Parameters
        ----------
        X : array-like, length n
            Only its length is used.
        y : array-like of class labels, length n
        groups : array-like of group ids, length n
            Samples with the same id always land in the same fold.
        """
        # Here, not at the top: scikit-learn takes seconds to import, and the stages that only
        # read the split (load_folds, folds_hash) never need it.
        from sklearn.model_selection import StratifiedGroupKFold

        if groups is None:
            raise ValueError("StratifiedGroupFolds.split needs groups (one id per sample)")
        seed = None
        if self.shuffle:
            seed = int(check_random_state(self.random_state).integers(2**31 - 1))
        kfold = StratifiedGroupKFold(n_splits=self.n_splits, shuffle=self.shuffle,
                                     random_state=seed)
        yield from kfold.split(X, y, groups)

    def __repr__(self) -> str:
        return (f"StratifiedGroupFolds(n_splits={self.n_splits}, shuffle={self.shuffle}, "
                f"random_state={self.random_state!r})")


def assign_folds(sample_ids, labels, groups, n_splits: int = 5, seed=42) -> np.ndarray:
    """Fold number (0..n_splits-1) of each sample, aligned with ``sample_ids``.

    The samples are sorted by id first, so the result does not depend on input order.

    Raises
    ------
    KitError
        When there are fewer groups than folds.
    """
    ids = np.asarray(list(sample_ids), dtype=object)
    labels = np.asarray(list(labels), dtype=object)
    groups = np.asarray(list(groups), dtype=object)
    if not len(ids) == len(labels) == len(groups):
        raise ValueError(f"sample_ids, labels and groups differ in length "
                         f"({len(ids)}, {len(labels)}, {len(groups)})")
    if len(set(ids)) != len(ids):
        raise ValueError("sample_ids must be unique")
    if n_splits < 2:
        raise KitError(f"n_splits={n_splits}: need at least 2 folds")
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise KitError(f"only {n_groups} independent image groups for {n_splits} folds; "
                       "lower --n-splits or add training images")
    counts = pd.Series(labels).value_counts()
    if counts.min() < n_splits:
        log.warning(f"warning: class {counts.idxmin()!r} has only {counts.min()} images for "
                    f"{n_splits} folds: some folds will have none of it")

    order = np.argsort(ids.astype(str), kind="stable")
    folds = np.full(len(ids), -1, dtype=np.int64)
    splitter = StratifiedGroupFolds(n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")  # warned above
        for fold, (_, test) in enumerate(splitter.split(ids[order], labels[order], groups[order])):
            folds[order[test]] = fold
    return folds


def build_groups(samples: list[Sample], extra: dict[str, str] | None = None,
                 near: dict[str, str] | None = None,
                 patients: dict[str, str] | None = None) -> dict[str, str]:
    """Group id of each sample: shared mask files, ``near``, ``patients`` and ``extra``
    groups, merged transitively.

    Parameters
    ----------
    samples : list of Sample
    extra : dict, optional
        ``sample_index -> group label`` from ``folds/groups.csv``; names not among
        ``samples`` (e.g. dropped as outliers) are ignored.
    near : dict, optional
        ``sample_index -> group label`` of the near-duplicate groups
        (:func:`kit.data.neardup.read_near_duplicates`); same rules as ``extra``, and the two
        sources' labels never mix (group "3" of one is not group "3" of the other).
    patients : dict, optional
        ``sample_index -> group label`` of the task's ``labels.group`` column
        (:func:`kit.data.dataset.label_groups`); same rules.

    Returns
    -------
    dict
        ``sample_index -> group id``, the id being the smallest sample_index in the group.
    """
    names = {s.sample_index for s in samples}
    pairs = list(mask_groups(samples).items())
    for source in (near, patients, extra):  # each source's labels are its own
        by_label: dict[str, str] = {}
        pairs += [(name, by_label.setdefault(label, name))
                  for name, label in sorted((source or {}).items()) if name in names]
    return connected_components([s.sample_index for s in samples], pairs)


def read_group_overrides(path: str | Path, known: set[str] | None = None) -> dict[str, str]:
    """Read the optional ``sample_index,group`` file; an absent file means no extra groups.

    Raises
    ------
    KitError
        Missing columns, duplicate rows, or names that are not training images (``known``).
    """
    path = Path(path)
    if not path.exists():
        return {}
    df = read_csv_columns(path, GROUP_COLUMNS, "sample_index,group")
    problems = [f"{name}: listed more than once" for name in
                sorted(df.loc[df.sample_index.duplicated(), "sample_index"].unique())]
    if known is not None:
        problems += [f"{name}: not a training image" for name in
                     sorted(set(df.sample_index) - known)]
    problems += [f"{name}: empty group"
                 for name in df.loc[df.group.str.strip() == "", "sample_index"]]
    if problems:
        raise KitError(f"{path}: {len(problems)} problems; fix or delete the file", problems)
    return dict(zip(df.sample_index, df.group.str.strip()))


def run_folds(paths: Paths, data, cfg: dict, *, seed: int = 42, force: bool = False,
              skip_bad: bool = False) -> pd.DataFrame:
    """Split the clean training images into folds and write ``folds/folds.csv``.

    Parameters
    ----------
    paths : Paths
    data : kit.task.Data, path or Dataset
        Dataset root with its task (:func:`kit.task.as_data`), or an already loaded
        :class:`kit.data.dataset.Dataset`. The task gives the classes and, with
        ``labels.group``, the patient groups.
    cfg : dict
        The resolved ``folds`` config (``n_splits``).
    seed : int
    force : bool
        Overwrite an existing ``folds/folds.csv`` that holds a different split.
    skip_bad : bool
        Passed to :func:`kit.data.dataset.load_dataset`.

    Returns
    -------
    DataFrame
        ``sample_index, label, fold`` as written.

    Raises
    ------
    KitError
        Clean stage not run, too few images, a bad ``folds/groups.csv``, a
        ``near_duplicates.csv`` from another dataset, or a different split already on disk
        without ``force`` (the message names a grouping source that changed since).
    """
    cfg = given(cfg, "folds")
    dataset = data if isinstance(data, Dataset) else load_dataset(as_data(data),
                                                                  skip_bad=skip_bad)
    task = dataset.task
    samples = sorted(clean_train_samples(dataset, paths), key=lambda s: s.sample_index)
    if not samples:
        raise KitError(f"{paths.outliers_csv}: no clean training images left to split; "
                       "check the clean stage's output and folds/overrides.csv")
    known = {s.sample_index for s in dataset.train}
    extra = read_group_overrides(paths.groups_csv, known=known)
    near_csv = near_duplicates_csv(paths)
    near = read_near_duplicates(near_csv, known=known)
    if near is None:
        log.warning(f"warning: {near_csv} not found: near-duplicate images are not kept in one "
                    "fold (only byte-identical masks and folds/groups.csv are); rerun "
                    "./run.sh clean to find them")
    patients = label_groups(samples) if task.has_groups else None
    groups = build_groups(samples, extra, near, patients)
    ids = [s.sample_index for s in samples]
    folds = assign_folds(ids, [s.label for s in samples], [groups[i] for i in ids],
                         int(cfg["n_splits"]), seed)
    # The group travels with the split: cv's inner early-stopping split keeps groups together.
    df = pd.DataFrame({"sample_index": ids, "label": [s.label for s in samples], "fold": folds,
                       "group": [groups[i] for i in ids]})
    df = df.sort_values("sample_index", kind="stable").reset_index(drop=True)

    content = df.to_csv(index=False, lineterminator="\n").encode()
    config_path = paths.runs_dir / "folds" / "config.yaml"
    grouping = grouping_sources(paths, extra, near, patients=patients, task=task,
                                data_root=dataset.root)
    _guard_overwrite(paths.folds_csv, content, force, _grouping_change(config_path, grouping))
    if not (paths.folds_csv.exists() and paths.folds_csv.read_bytes() == content):
        atomic_write_bytes(paths.folds_csv, content)
    n_groups = len(set(groups.values()))
    # The built-in task's record stays as it was; another task's names it.
    named = {} if task.builtin else {"task": task.name, "task_sha256": task.fingerprint}
    write_config(config_path, {
        **cfg, "seed": seed, "data": str(dataset.root), **named, "n_images": len(df),
        "n_groups": n_groups,
        "groups_csv": str(paths.groups_csv) if extra else None, "grouping": grouping,
        "outliers_csv_sha256": (sha256_file(paths.outliers_csv) if paths.outliers_csv.exists()
                                else None),
        "folds_csv": str(paths.folds_csv), "folds_sha256": sha256_bytes(content)})
    log.info(f"{len(df)} clean training images in {n_groups} groups "
             f"({len(df) - n_groups} images share a group with another; grouped by "
             f"{', '.join(grouping['sources'])})")
    log.info(fold_table(df, int(cfg["n_splits"]), task.classes))
    return df


def grouping_sources(paths: Paths, extra: dict | None, near: dict | None, *,
                     patients: dict | None = None, task=None, data_root=None) -> dict:
    """What grouped the images, as recorded in ``runs/folds/config.yaml``.

    ``sources`` lists the sources used (``shared_masks`` when the task has masks;
    ``near_duplicates`` when ``clean`` wrote its file; ``labels_group`` when the task names a
    patient column, ``patients`` its groups; ``groups_csv`` when the user's file has rows),
    with each file's path and sha256, so that a changed grouping can be told apart from a
    changed seed. ``task`` None: the built-in task.
    """
    near_csv = near_duplicates_csv(paths)
    sources = ["shared_masks"] if task is None or task.has_masks else []
    out: dict = {"near_duplicates": None, "groups_csv": None}
    # labels_group only when the task has one: the built-in task's record keeps its keys
    labels_csv = Path(data_root) / task.labels.file if patients is not None else None
    for key, path, mapping in (("near_duplicates", near_csv, near),
                               ("labels_group", labels_csv, patients),
                               ("groups_csv", paths.groups_csv, extra)):
        if mapping is None or (key == "groups_csv" and not mapping):
            continue
        sources.append(key)
        column = {"column": task.labels.group} if key == "labels_group" else {}
        out[key] = {"file": str(path), **column, "sha256": sha256_file(path),
                    "groups": len(set(mapping.values())), "partition": _partition_hash(mapping)}
    return {"sources": sources, **out}


def _partition_hash(mapping: dict[str, str]) -> str:
    """sha256 of the grouping itself (which names go together), whatever the group labels."""
    members: dict[str, list[str]] = {}
    for name, label in mapping.items():
        members.setdefault(label, []).append(name)
    parts = sorted(sorted(names) for names in members.values())
    return sha256_bytes(repr(parts).encode())


def _grouping_change(config_path: Path, grouping: dict) -> str:
    """Which grouping sources differ from the last run's config (``""`` when none or unknown)."""
    try:
        old = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    if not isinstance(old, dict) or "grouping" not in old:
        return ""
    before = old["grouping"] or {}
    changed = []
    for key, name in (("near_duplicates", "runs/clean/near_duplicates.csv"),
                      ("labels_group", "the labels file's group column"),
                      ("groups_csv", "folds/groups.csv")):
        a, b = before.get(key), grouping.get(key)
        if (a or {}).get("partition") != (b or {}).get("partition"):
            state = "added" if a is None else "removed" if b is None else "changed"
            changed.append(f"{name} {state}")
    return ", ".join(changed)


def fold_table(df: pd.DataFrame, n_splits: int | None = None, classes=CLASSES) -> str:
    """Per-fold class counts (columns: ``classes``, the task's) as a small text table (rows:
    folds, then ``all``)."""
    n_splits = n_splits or int(df.fold.max()) + 1
    table = pd.crosstab(df.fold, df.label).reindex(index=range(n_splits), columns=list(classes),
                                                   fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["all"] = table.sum(axis=0)
    table.index.name = "fold"
    table.columns.name = None
    return table.reset_index().to_string(index=False)


def _guard_overwrite(path: Path, content: bytes, force: bool, grouping_change: str = "") -> None:
    if not path.exists():
        return
    old = path.read_bytes()
    if old == content:
        return
    change = _describe_change(old, content)
    if grouping_change:
        change += f"; grouping since the last split: {grouping_change}"
    if not force:
        raise KitError(f"{path} already holds a different split ({change}); out-of-fold "
                       "predictions and tuning results made with it (runs/<backbone>/oof.csv) "
                       "would silently become invalid. Pass --force to overwrite it, then rerun "
                       "cv for every backbone")
    log.warning(f"warning: overwriting {path} ({change}); rerun cv for every backbone")


def _describe_change(old: bytes, new: bytes) -> str:
    try:
        a = pd.read_csv(io.BytesIO(old), dtype=str, keep_default_na=False).set_index("sample_index")
        b = pd.read_csv(io.BytesIO(new), dtype=str, keep_default_na=False).set_index("sample_index")
        common = a.index.intersection(b.index)
        moved = int((a.loc[common, "fold"] != b.loc[common, "fold"]).sum())
    except Exception:  # an unreadable old file is simply "different"
        return "contents differ"
    return (f"{moved} images change fold, {len(b.index.difference(a.index))} added, "
            f"{len(a.index.difference(b.index))} removed")


def load_folds(paths: Paths, classes=CLASSES) -> tuple[pd.DataFrame, str]:
    """Read and check ``folds/folds.csv`` (labels among ``classes``: the task's).

    Returns
    -------
    (DataFrame, str)
        ``sample_index, label, fold`` (fold as int) and the file's sha256, which every stage
        that uses the folds records.

    Raises
    ------
    KitError
        File missing, or its columns or values are not what :func:`run_folds` writes.
    """
    path = paths.folds_csv
    if not path.exists():
        raise KitError(f"no folds file at {path}; run ./run.sh folds first")
    return read_folds(path, classes=classes, listed=True)  # the one reader (kit.artifacts)


def folds_hash(paths: Paths) -> str:
    """sha256 of ``folds/folds.csv``: later stages record it beside their outputs."""
    if not paths.folds_csv.exists():
        raise KitError(f"no folds file at {paths.folds_csv}; run ./run.sh folds first")
    return sha256_file(paths.folds_csv)
