"""The report's label-issues section: per cv run with a ``label_issues.csv``, how many images
its inner cross-validations flagged, and thumbnails of the most confident suspects."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from kit.paths import Paths
from kit.submission.report.cv import backbone_metrics
from kit.submission.report.data import Training, thumb_card, training
from kit.submission.report.layout import READ_ERRORS, fmt
from kit.utils import KitError

log = logging.getLogger(__name__)

_ISSUE_COLUMNS = ["sample_index", "label", "suggested_label", "quality", "flagged", "flagged_by"]


def label_issues_section(paths: Paths, data, cfg: dict) -> dict:
    """Per backbone run with a ``label_issues.csv``: how many images its inner
    cross-validations flagged, and thumbnails of the most confident suspects."""
    metrics = backbone_metrics(paths)
    found = {name: f for name in metrics
             if (f := paths.backbone_dir(name) / "label_issues.csv").is_file()}
    lost = [(name, m["label_issues"]["mode"]) for name, m in metrics.items()
            if name not in found and (m.get("label_issues") or {}).get("mode", "off") != "off"]
    train, _ = training(data)
    runs = []
    for name, path in found.items():
        try:
            runs.append(_issues_part(name, path, metrics[name], train, cfg))
        except READ_ERRORS as exc:
            log.warning(f"report: label issues of {name} skipped: {exc}")
            runs.append({"name": name, "error": str(exc)})
    return {"runs": runs, "lost": lost, "no_data": str(data) if train.root is None else None}


def read_label_issues(path: Path) -> pd.DataFrame:
    """A cv run's ``label_issues.csv``: flagged as int, quality as float, flagged_by as text
    (``0;2``), sorted by quality (then sample_index), the most confident suspects first."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in _ISSUE_COLUMNS if c not in df.columns]
    if missing:
        raise KitError(f"{path}: no column(s) {', '.join(missing)}; expected "
                       f"{','.join(_ISSUE_COLUMNS)},...; rerun ./run.sh cv")
    df["quality"] = pd.to_numeric(df["quality"], errors="coerce")
    df["flagged"] = pd.to_numeric(df["flagged"], errors="coerce").fillna(0).astype(int)
    if "n_folds" in df.columns:
        df["n_folds"] = pd.to_numeric(df["n_folds"], errors="coerce")
    return df.sort_values(["quality", "sample_index"], kind="mergesort",
                          na_position="last").reset_index(drop=True)


def _issues_part(name: str, path: Path, m: dict, train: Training, cfg: dict) -> dict:
    df = read_label_issues(path)
    info = m.get("label_issues") or {}
    how = [f"mode {info.get('mode', 'not recorded')}"]
    if info.get("model"):
        how.append(f"model {info['model']}")
    if info.get("inner_folds"):
        how.append(f"{info['inner_folds']} inner folds")
    flagged = df[df["flagged"] == 1]
    n_by = flagged["flagged_by"].map(lambda s: len([f for f in str(s).split(";") if f.strip()]))
    by = ", ".join(f"by {k} fold{'s' if k != 1 else ''}: {int(n)}"
                   for k, n in sorted(n_by.value_counts().items()))
    assessed = ""
    if "n_folds" in df.columns and df["n_folds"].notna().any():
        assessed = f"; each image assessed by up to {int(df['n_folds'].max())} folds"
    shown = flagged.head(max(0, int(cfg["label_issues_top"])))
    side = int(cfg["thumb_side"])
    return {"name": name, "error": None, "how": ", ".join(how), "n_flagged": len(flagged),
            "n": len(df), "by": by, "assessed": assessed,
            "cards": [thumb_card(train, r, side, _issue_caption(r), cls="suspect")
                     for r in shown.itertuples(index=False)]}


def _issue_caption(row) -> str:
    folds = str(row.flagged_by).replace(";", ", ") or "–"
    return (f"{row.sample_index} · {row.label} → {row.suggested_label} · quality "
            f"{fmt(row.quality, 3)} · flagged by fold(s) {folds}")
