"""Is run B's OOF score really above run A's, or noise? (``./run.sh compare``)

Both runs are scored in the task's metric. A paired bootstrap over the images both runs
predicted out of fold: each resample draws the same images for both, so what they share
(hard images, noisy labels) cancels out of the difference. It measures the noise of drawing
~600 images, not that of training seeds.
"""
from __future__ import annotations

from pathlib import Path

from kit.artifacts import read_metrics, read_oof
from kit.ensemble.blend import provenance
from kit.metrics import (
    BOOT_SEED,
    N_BOOT,
    bootstrap_ci,
    format_ci,
    get_metric,
    paired_bootstrap,
    to_indices,
)
from kit.task import Task, task_of
from kit.utils import KitError

# ----------------------------------------------------------------------------- inputs

def run_dir(spec: str, paths) -> Path:
    """The folder of a run: ``runs/<spec>/`` when it exists, else ``spec`` as a path."""
    named = paths.runs_dir / spec
    for folder in (named, Path(spec)):
        if (folder / "oof.csv").is_file():
            return folder.resolve()
    have = sorted(d.name for d in paths.runs_dir.iterdir() if (d / "oof.csv").is_file()) \
        if paths.runs_dir.is_dir() else []
    found = f"runs with an oof.csv: {', '.join(have)}" if have else "no run has an oof.csv yet"
    raise KitError(f"{spec}: neither {named}/oof.csv nor {Path(spec).resolve()}/oof.csv exists "
                   f"({found}); run ./run.sh cv {Path(spec).name} first, or give the folder "
                   "of a run")


def _metrics(folder: Path, task: Task) -> dict | None:
    """The run's ``metrics.json`` when it has one (a folder of OOF predictions may not),
    refused when made for other classes or scored by another metric than the task's."""
    path = folder / "metrics.json"
    return read_metrics(path, classes=task.classes, metric=task.metric) if path.is_file() \
        else None


def _examples(items) -> str:
    items = sorted(items)
    return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")


def _refuse_differing(a, b, column: str, what: str, path_a: Path, path_b: Path) -> None:
    """KitError when images (same index order) differ in ``column`` between the two runs."""
    differ = a.index[a[column].to_numpy() != b[column].to_numpy()]
    if len(differ):
        raise KitError(f"{path_b}: {len(differ)} images {what} than in {path_a} "
                       f"(e.g. {_examples(differ)}); rerun ./run.sh cv for both on the same "
                       "folds/folds.csv")


def check_same_rows(a, b, path_a: Path, path_b: Path, metrics_a, metrics_b) -> list[str]:
    """Raise unless both OOF files hold the same images, labels and folds; return notes.

    Folds are compared by the ``folds_sha256`` both ``metrics.json`` record, else by the
    ``fold`` column of the OOF files.
    """
    only_a, only_b = set(a.index) - set(b.index), set(b.index) - set(a.index)
    if only_a or only_b:
        raise KitError(
            f"{path_b}: covers other images than {path_a} ({len(only_a)} only in A"
            + (f", e.g. {_examples(only_a)}" if only_a else "") + f"; {len(only_b)} only in B"
            + (f", e.g. {_examples(only_b)}" if only_b else "") + "); a paired comparison "
            "needs the same images: rerun ./run.sh cv for both on the same folds/folds.csv")
    b = b.loc[a.index]
    _refuse_differing(a, b, "label", "have another label", path_a, path_b)
    sha_a = (metrics_a or {}).get("folds_sha256")
    sha_b = (metrics_b or {}).get("folds_sha256")
    if sha_a and sha_b:
        if sha_a != sha_b:
            raise KitError(f"{path_b.parent / 'metrics.json'}: trained on another folds file "
                           f"than {path_a.parent / 'metrics.json'} (folds_sha256 {sha_b[:12]}... "
                           f"vs {sha_a[:12]}...); rerun ./run.sh cv for both on the same "
                           "folds/folds.csv")
        return []
    _refuse_differing(a, b, "fold", "are in another fold", path_a, path_b)
    lacking = [str(p.parent / "metrics.json") for p, m in ((path_a, metrics_a),
                                                           (path_b, metrics_b))
               if not (m or {}).get("folds_sha256")]
    return [f"no folds_sha256 in {' and '.join(lacking)}: folds compared by the fold column "
            "of oof.csv instead"]


# ----------------------------------------------------------------------------- comparison

def compare_runs(run_a: str, run_b: str, paths, n_boot: int | None = None,
                 seed: int | None = None, *, task: Task | None = None) -> dict:
    """Paired bootstrap of the OOF score of two cv runs on the same images, in the task's
    metric.

    Parameters
    ----------
    run_a, run_b : str
        Run names under ``runs/`` or folders holding ``oof.csv`` (and ``metrics.json``).
    paths : Paths
    n_boot, seed : int, optional
        Resamples and their seed (default: :data:`kit.metrics.N_BOOT`, ``BOOT_SEED``).
    task : Task, optional
        The runs' task: its classes read the files, its metric scores them (default: the
        built-in AN2DL task).

    Returns
    -------
    dict
        :func:`kit.metrics.paired_bootstrap`'s keys (``a``, ``b``, ``diff``, ``ci95``,
        ``p_b_better``, ``n``, ``n_boot``), plus ``metric`` (its name), ``run_a``/``run_b``
        (names), ``oof_a``/``oof_b`` (paths), ``a_ci95``/``b_ci95`` (each run's own
        interval), ``seed``, ``reading`` (one line) and ``notes``.

    Raises
    ------
    KitError
        A run without ``oof.csv``, the same run twice, two runs on other images, labels or
        folds, or a run made for other classes or scored by another metric than the task's.
    """
    task = task_of(None) if task is None else task
    n_boot = N_BOOT if n_boot is None else int(n_boot)
    seed = BOOT_SEED if seed is None else int(seed)
    if n_boot < 1:
        raise KitError(f"--n-boot must be >= 1 (got {n_boot}); the default is {N_BOOT}")
    dir_a, dir_b = run_dir(run_a, paths), run_dir(run_b, paths)
    if dir_a == dir_b:
        raise KitError(f"RUN_A and RUN_B are the same run ({dir_a}); name two different runs")
    path_a, path_b = dir_a / "oof.csv", dir_b / "oof.csv"
    a, b = read_oof(path_a, classes=task.classes), read_oof(path_b, classes=task.classes)
    metrics_a, metrics_b = _metrics(dir_a, task), _metrics(dir_b, task)
    notes = check_same_rows(a, b, path_a, path_b, metrics_a, metrics_b)
    b = b.loc[a.index]  # B's rows in A's order: row i is the same image in both
    y = to_indices(a.label.to_numpy(), task.classes)
    cols = task.prob_columns
    pa, pb = a[cols].to_numpy(), b[cols].to_numpy()
    scoring = {"n_boot": n_boot, "seed": seed, "metric": task.metric, "classes": task.classes}
    result = paired_bootstrap(y, pa, pb, **scoring)
    name_a, name_b = _names(run_a, run_b, dir_a, dir_b)
    result.update({
        "metric": task.metric, "run_a": name_a, "run_b": name_b, "oof_a": str(path_a),
        "oof_b": str(path_b), "a_ci95": list(bootstrap_ci(y, pa, **scoring)),
        "b_ci95": list(bootstrap_ci(y, pb, **scoring)), "seed": seed})
    for name, m in ((name_a, metrics_a), (name_b, metrics_b)):
        why = provenance(m)["why"] if m else []
        if m and why:  # a maximum over noisy choices: its side of the difference is inflated
            notes.append(f"{name}'s OOF score is optimistic ({'; '.join(why)})")
    result["reading"] = reading(result)
    result["notes"] = notes
    return result


def _names(run_a: str, run_b: str, dir_a: Path, dir_b: Path) -> tuple[str, str]:
    """The folder names, or what was typed when both folders share a name."""
    if dir_a.name != dir_b.name:
        return dir_a.name, dir_b.name
    return run_a, run_b


def summary_line(r: dict) -> str:
    """``OOF macro F1: A phikon 0.499 [0.46, 0.54], B uni ...; B - A = +0.022 [...], ...``
    (the metric's title: ``OOF balanced accuracy: ...`` for a task scored so)."""
    lo, hi = r["ci95"]
    title = get_metric(r.get("metric", "macro_f1")).title
    return (f"OOF {title}: A {r['run_a']} {format_ci(r['a'], r['a_ci95'])}, "
            f"B {r['run_b']} {format_ci(r['b'], r['b_ci95'])}; B - A = {r['diff']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}], P(B > A) = {r['p_b_better']:.2f} over {r['n']} images "
            f"(paired bootstrap, {r['n_boot']} resamples)")


def reading(r: dict) -> str:
    """What the interval says, in one line."""
    lo, hi = r["ci95"]
    if lo <= 0 <= hi:
        return (f"reading: not distinguishable from noise: the 95% interval of B - A contains "
                f"0, so another draw of {r['n']} images could reverse the order")
    better, worse = (r["run_b"], r["run_a"]) if lo > 0 else (r["run_a"], r["run_b"])
    return (f"reading: {better} scores above {worse} beyond the noise of drawing the images "
            "(the 95% interval of B - A excludes 0); training-seed noise is not in this "
            "interval")
