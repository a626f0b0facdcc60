"""``runs/report.html``: one self-contained page on the data, the CV runs, the blend and the
submissions.

Every image is inlined (``data:`` URIs: PNG plots, JPEG thumbnails), so the file can be
mailed or opened offline. Each section reads only the files its stage wrote and, when they
do not exist yet, says which command makes them; a section whose files cannot be read shows
why instead of failing the whole page. The sections here gather plain values (text, numbers,
tables as lists of rows); the Jinja2 templates ``kit/templates/report.html`` and
``kit/templates/report/<section>.html`` lay them out and escape them.
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from kit import CLASSES, PROB_COLUMNS, __version__
from kit.config import given
from kit.paths import Paths
from kit.templates import data_uri, render
from kit.utils import KitError, atomic_write_text, write_config

NESTED_COLUMNS = [f"nested_p_{c}" for c in CLASSES]
# What a section may hit in files of an older or half-written run: shown, not raised.
_READ_ERRORS = (KitError, OSError, ValueError, KeyError, TypeError, IndexError)


def run_report(paths: Paths, data, cfg: dict) -> Path:
    """Write ``runs/report.html`` from whatever the stages have written so far; return its path.

    The scores come first (cross-validation, blend, tuning, submissions), then the data, the
    suspected label errors and the attention heads, whose thumbnails are folded away.

    Parameters
    ----------
    paths : Paths
        The work directory.
    data : path
        Dataset root (``train_labels.csv``, ``train_data/`` for the junk thumbnails).
    cfg : dict
        The resolved ``report`` config.
    """
    cfg = given(cfg, "report")
    sections = [
        ("cv", "Cross-validation", lambda: cv_section(paths)),
        ("blend", "Blend", lambda: blend_section(paths)),
        ("tune", "Tuning", lambda: tune_section(paths)),
        ("submissions", "Submissions", lambda: submissions_section(paths)),
        ("calibration", "Reliability of the blended OOF probabilities",
         lambda: reliability_section(paths, cfg)),
        ("data", "Data", lambda: data_section(paths, data, cfg)),
        ("label_issues", "Suspected label errors",
         lambda: label_issues_section(paths, data, cfg)),
        ("attention", "Attention over patches", lambda: attention_section(paths, cfg)),
    ]
    page = render("report.html", version=__version__,
                  stamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  workdir=str(paths.root), data=str(data),
                  sections=[_section(anchor, title, build) for anchor, title, build in sections])
    out = paths.runs_dir / "report.html"
    atomic_write_text(out, str(page))
    write_config(paths.runs_dir / "report_config.yaml", {**cfg, "data": str(data)})
    return out


@dataclass(frozen=True)
class Todo:
    """A section whose stage has not run: what is missing and the command that makes it."""
    what: str
    command: str


def _section(anchor: str, title: str, build) -> dict:
    """A section for the page: its template ``report/<anchor>.html`` filled with what
    ``build`` returns, or the read error that stopped it."""
    try:
        content = build()
        html = (render("report/todo.html", what=content.what, command=content.command)
                if isinstance(content, Todo) else render(f"report/{anchor}.html", **content))
    except _READ_ERRORS as exc:
        print(f"report: section {title!r} skipped: {exc}", file=sys.stderr)
        return {"anchor": anchor, "title": title, "error": str(exc), "html": ""}
    return {"anchor": anchor, "title": title, "error": None, "html": html}


# ----------------------------------------------------------------------------- small helpers

def _fmt(value, digits: int = 4) -> str:
    """A table cell or caption number as text: floats to ``digits`` places, none as a dash."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _score_ci(score, ci) -> str | None:
    """``0.499 [0.46, 0.54]`` (:func:`kit.metrics.format_ci`), the score alone when no
    interval is known, None (a dash) when there is no score."""
    from kit.metrics import format_ci

    if not isinstance(score, (int, float)) or isinstance(score, bool) or score != score:
        return score
    return format_ci(float(score), _interval(ci))


def _interval(ci) -> list[float] | None:
    """``[lo, hi]`` from a recorded interval, or None when absent or malformed."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


@dataclass(frozen=True)
class Bold:
    """A table cell shown in bold (``cls``: ok or warn colours it)."""
    text: str
    cls: str = ""


def _table(header: list, rows: list[list], cls: str = "") -> dict:
    """A table for ``report/macros.html``: every cell text (:func:`_fmt`) or :class:`Bold`."""
    return {"header": [str(h) for h in header], "cls": cls,
            "rows": [[v if isinstance(v, Bold) else _fmt(v) for v in row] for row in rows]}


def _img(data: bytes, mime: str = "image/png", alt: str = "", cls: str = "") -> dict:
    return {"src": data_uri(data, mime), "alt": str(alt), "cls": cls}


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KitError(f"{path}: not valid JSON ({exc})")


# ----------------------------------------------------------------------------- data

def data_section(paths: Paths, data, cfg: dict) -> dict:
    """Counts per class (all, flagged as junk, clean) and thumbnails of the junk found."""
    from kit.data.dataset import LABELS_CSV, find_root

    ctx = {"problem": None, "n_train": 0, "n_test": 0, "root": "", "clean_note": "",
           "counts": None}
    try:
        root = find_root(data)
    except KitError as exc:
        return {**ctx, "problem": str(exc), "junk": _junk_part(paths, None, cfg)}
    labels_path = root / LABELS_CSV
    if not labels_path.is_file():
        return {**ctx, "problem": f"{labels_path}: not found",
                "junk": _junk_part(paths, root, cfg)}
    labels = pd.read_csv(labels_path, dtype=str, keep_default_na=False)
    labels = dict(zip(labels["sample_index"], labels["label"]))
    dropped = _dropped(paths)
    clean = _clean_labels(paths, labels, dropped)
    classes = list(CLASSES) + sorted(set(labels.values()) - set(CLASSES))
    rows = []
    for c in classes:
        n_all = sum(v == c for v in labels.values())
        n_junk = sum(labels[i] == c for i in dropped if i in labels) if dropped is not None else None
        n_clean = sum(v == c for v in clean.values()) if clean is not None else None
        rows.append([c, n_all, n_junk, n_clean])
    total = [Bold("total"), len(labels),
             len([i for i in dropped if i in labels]) if dropped is not None else None,
             len(clean) if clean is not None else None]
    n_test = len(list((root / "test_data").glob("img_*.png"))) if (root / "test_data").is_dir() else 0
    clean_note = ("clean = the images in folds/folds.csv" if paths.folds_csv.is_file()
                  else "clean = labels minus dropped junk")
    return {**ctx, "n_train": len(labels), "n_test": n_test, "root": str(root),
            "clean_note": clean_note,
            "counts": _table(["class", "training images", "junk dropped", "clean"],
                             rows + [total]),
            "junk": _junk_part(paths, root, cfg)}


def _dropped(paths: Paths) -> set[str] | None:
    """Images left out as junk: flagged and not kept by an override, plus overrides ``drop``."""
    from kit.data.clean import load_outliers, load_overrides

    if not paths.outliers_csv.is_file():
        return None
    outliers, overrides = load_outliers(paths), load_overrides(paths)
    action = dict(zip(overrides["sample_index"], overrides["action"]))
    dropped = {i for i in outliers["sample_index"] if action.get(i) != "keep"}
    return dropped | {i for i, a in action.items() if a == "drop"}


def _clean_labels(paths: Paths, labels: dict, dropped: set | None) -> dict | None:
    if paths.folds_csv.is_file():
        folds = pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False)
        return dict(zip(folds["sample_index"], folds["label"]))
    if dropped is None:
        return None
    return {i: c for i, c in labels.items() if i not in dropped}


def _junk_part(paths: Paths, root: Path | None, cfg: dict) -> dict | None:
    """The junk found: counts by reason and thumbnails (highest score first per reason, at
    most ``report.max_thumbs``); None when clean has not run."""
    from kit.data.clean import load_outliers

    if not paths.outliers_csv.is_file():
        return None
    outliers = load_outliers(paths)
    counts = outliers["reason"].value_counts()
    shown = outliers.sort_values(["reason", "score"], ascending=[True, False])
    shown = shown.head(int(cfg["max_thumbs"]))
    return {"n": len(outliers), "reasons": ", ".join(f"{int(n)} {r}" for r, n in counts.items()),
            "cards": [_thumb_card(root, r, int(cfg["thumb_side"]))
                      for r in shown.itertuples(index=False)]}


def _thumb_card(root: Path | None, row, side: int, caption: str | None = None,
                cls: str = "junk") -> dict:
    """A training image's thumbnail (``root/train_data/<sample_index>``) with a caption (by
    default the junk reason and score); no image (shown as "image not found") when there is
    no such file."""
    if caption is None:
        caption = f"{row.sample_index} · {row.reason} {_fmt(row.score, 3)}"
    path = root / "train_data" / row.sample_index if root is not None else None
    image = None
    if path is not None and path.is_file():
        image = _img(thumbnail(path, side), "image/jpeg", row.sample_index)
    return {"cls": cls, "img": image, "caption": caption}


def thumbnail(path: Path, side: int) -> bytes:
    """A JPEG thumbnail (longest side ``side``) of an image file."""
    from PIL import Image

    from kit.data.dataset import jpeg_thumbnail

    with Image.open(path) as im:
        im.draft("RGB", (side, side))  # cheap downscale on decode where the format allows it
        return jpeg_thumbnail(im, side)


# ----------------------------------------------------------------------------- cv

def backbone_metrics(paths: Paths) -> dict[str, dict]:
    """``runs/<bb>/metrics.json`` of every backbone that has one, by name."""
    from kit.ensemble.blend import RESERVED_RUN_DIRS

    if not paths.runs_dir.is_dir():
        return {}
    return {d.name: _read_json(d / "metrics.json") for d in sorted(paths.runs_dir.iterdir())
            if d.is_dir() and d.name not in RESERVED_RUN_DIRS and (d / "metrics.json").is_file()}


def cv_section(paths: Paths) -> dict | Todo:
    """Per-backbone OOF scores (overall, per fold, per class) and confusion matrices."""
    metrics = backbone_metrics(paths)
    if not metrics:
        return Todo("no backbone cross-validated", "./run.sh cv <backbone>")
    n_folds = max(len(m.get("per_fold", [])) for m in metrics.values())
    cis = {name: oof_ci(paths, name, m) for name, m in metrics.items()}
    rows = []
    for name, m in metrics.items():
        folds = {int(f["fold"]): f.get("macro_f1") for f in m.get("per_fold", [])}
        rows.append([name, _score_ci(m.get("oof_macro_f1"), cis[name]), m.get("oof_weighted_f1"),
                     *[folds.get(k) for k in range(n_folds)],
                     _sources(m.get("weights_source")), m.get("n_oof")])
    scores = _table(["backbone", "OOF macro F1 [95% interval]", "OOF weighted F1",
                     *[f"fold {k}" for k in range(n_folds)], "weights", "OOF images"],
                    rows, "num")
    class_rows = []
    for name, m in metrics.items():
        per_class = m.get("per_class", {})
        class_rows.append([name, *[per_class.get(c, {}).get("f1") for c in CLASSES]])
    fusion, fusion_notes = fusion_table(paths)
    return {"scores": scores, "collapsed": collapse_notes(metrics),
            "fusion": fusion, "fusion_notes": fusion_notes,
            "provenance": provenance_table(metrics),
            "per_class": _table(["backbone", *[f"F1 {c}" for c in CLASSES]], class_rows, "num"),
            "figures": [_confusion_figure(paths, name, m, cis[name])
                        for name, m in metrics.items()]}


def _sources(value):
    """A run's weights source; a fused run's, one ``part: source`` per backbone."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    return value


def fusion_table(paths: Paths) -> tuple[dict | None, list[str]]:
    """Each fused run (``cv a+b``) against the blend of its parts' separate runs, paired on
    the same OOF images (:mod:`kit.ensemble.fusion_vs_blend`), and notes on those it cannot compare."""
    from kit.ensemble.fusion_vs_blend import compare_all

    found, notes = compare_all(paths)
    if not found:
        return None, notes
    rows = [[c.fused, _score_ci(c.fused_f1, c.fused_ci), _score_ci(c.blend_f1, c.blend_ci),
             c.blend_source, _score_ci(c.diff, c.diff_ci), c.p_fused_better, c.n,
             Bold(", ".join(c.optimistic), "warn") if c.optimistic else "none"] for c in found]
    return _table(["fused run", "fused OOF macro F1 [95%]", "blend of the parts [95%]",
                   "blend from", "fused - blend [95%, paired]", "P(fused > blend)",
                   "images", "optimistic inputs"], rows, "num"), notes


def oof_ci(paths: Paths, name: str, m: dict) -> list[float] | None:
    """A backbone's OOF macro F1 interval: ``oof_macro_f1_ci95`` of its metrics.json, else
    bootstrapped from its ``oof.csv`` (an older cv); None when neither can be read."""
    from kit.metrics import bootstrap_ci, to_indices

    recorded = _interval(m.get("oof_macro_f1_ci95"))
    if recorded is not None:
        return recorded
    try:
        oof = pd.read_csv(paths.backbone_dir(name) / "oof.csv",
                          dtype={"sample_index": str, "label": str})
        ci = bootstrap_ci(to_indices(oof["label"].to_numpy()),
                          oof[PROB_COLUMNS].to_numpy(np.float64))
    except _READ_ERRORS:  # no or a damaged oof.csv: the score is shown without an interval
        return None
    return _interval(ci) if ci[0] == ci[0] else None


def collapse_notes(metrics: dict[str, dict]) -> list[tuple[str, str]]:
    """The collapse guard's flags, ``(backbone, note)``: backbones whose fold models predict
    (nearly) one class or do no better than the majority class."""
    from kit.ensemble.blend import collapse_note

    return [(name, note) for name, m in metrics.items() if (note := collapse_note(m))]


# ----------------------------------------------------------------------------- label issues

_ISSUE_COLUMNS = ["sample_index", "label", "suggested_label", "quality", "flagged", "flagged_by"]
def label_issues_section(paths: Paths, data, cfg: dict) -> dict:
    """Per backbone run with a ``label_issues.csv``: how many images its inner
    cross-validations flagged, and thumbnails of the most confident suspects."""
    from kit.data.dataset import find_root

    metrics = backbone_metrics(paths)
    found = {name: f for name in metrics
             if (f := paths.backbone_dir(name) / "label_issues.csv").is_file()}
    lost = [(name, m["label_issues"]["mode"]) for name, m in metrics.items()
            if name not in found and (m.get("label_issues") or {}).get("mode", "off") != "off"]
    try:
        root = find_root(data)
    except KitError:
        root = None
    runs = []
    for name, path in found.items():
        try:
            runs.append(_issues_part(name, path, metrics[name], root, cfg))
        except _READ_ERRORS as exc:
            print(f"report: label issues of {name} skipped: {exc}", file=sys.stderr)
            runs.append({"name": name, "error": str(exc)})
    return {"runs": runs, "lost": lost, "no_data": str(data) if root is None else None}


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


def _issues_part(name: str, path: Path, m: dict, root: Path | None, cfg: dict) -> dict:
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
            "cards": [_thumb_card(root, r, side, _issue_caption(r), cls="suspect")
                      for r in shown.itertuples(index=False)]}


def _issue_caption(row) -> str:
    folds = str(row.flagged_by).replace(";", ", ") or "–"
    return (f"{row.sample_index} · {row.label} → {row.suggested_label} · quality "
            f"{_fmt(row.quality, 3)} · flagged by fold(s) {folds}")


def attention_section(paths: Paths, cfg: dict) -> dict:
    """For backbones with an attention head: a few OOF images' patches, each captioned with
    its attention weight (highest first)."""
    from kit.data.patches import find_patches, load_patches

    metrics = backbone_metrics(paths)
    found = {name: d / "attention.csv" for name in metrics
             if (d := paths.backbone_dir(name)) and (d / "attention.csv").is_file()}
    if not found:
        return {"runs": None, "no_patches": None}
    runs = []
    for name, path in found.items():
        # the cache the run trained on (its key), else the only one there is
        key = (metrics[name].get("patch_keys") or {}).get("train")
        try:
            patches = (key and find_patches(paths, "train", key)) or load_patches(paths, "train")
        except KitError as exc:
            return {"runs": [], "no_patches": str(exc)}
        rows = {s: i for i, s in enumerate(patches.samples.sample_index)}
        att = pd.read_csv(path, dtype={"sample_index": str})
        peak = att.groupby("sample_index").weight.max().sort_values(ascending=False, kind="stable")
        shown = [s for s in peak.index if s in rows][:int(cfg["attention_images"])]
        strips = [_img(attention_png(patches.array[rows[s]],
                                     att[att.sample_index == s].sort_values("patch")
                                     .weight.to_numpy(), s), alt=s)
                  for s in shown]
        runs.append({"name": name, "strips": strips, "n_images": att.sample_index.nunique(),
                     "uniform": 1 / max(1, att.groupby("sample_index").size().max())})
    return {"runs": runs, "no_patches": None}


def attention_png(patches: np.ndarray, weights: np.ndarray, title: str) -> bytes:
    """One image's K patches in a row, highest attention first, each titled with its weight."""
    plt = _pyplot()
    order = np.argsort(-weights, kind="stable")
    k = len(order)
    fig, axes = plt.subplots(1, k, figsize=(1.1 * k, 1.5), squeeze=False)
    for ax, j in zip(axes[0], order):
        ax.imshow(patches[j])
        ax.set_title(f"{weights[j]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return _fig_png(fig)


def _verdict(honest: bool) -> Bold:
    return Bold("honest", "ok") if honest else Bold("optimistic", "warn")


def provenance_table(metrics: dict[str, dict]) -> dict:
    """Per backbone: training path, how the epochs and the params were chosen, and whether
    its OOF score is honest (nothing chosen on the OOF rows) or optimistic, and why."""
    from kit.ensemble.blend import provenance

    rows = []
    for name, m in metrics.items():
        p = provenance(m)
        rows.append([name, m.get("training_path") or "unknown", p["epochs"], p["params"],
                     _verdict(p["honest"]), "; ".join(p["why"]) or None])
    return _table(["backbone", "training path", "epochs chosen by", "params", "OOF score",
                   "why"], rows)


# ----------------------------------------------------------------------------- tune

def tune_records(paths: Paths) -> dict[str, dict]:
    """``{backbone: {"best": best.yaml or None, "estimate": estimate.json or None}}``."""
    from kit.utils import read_yaml

    root = paths.runs_dir / "tune"
    if not root.is_dir():
        return {}
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        best, est = d / "best.yaml", d / "estimate.json"
        if best.is_file() or est.is_file():
            out[d.name] = {"best": read_yaml(best) if best.is_file() else None,
                           "estimate": _read_json(est) if est.is_file() else None}
    return out


def tune_section(paths: Paths) -> dict | Todo:
    """Per tuned backbone: the search score (best of N, optimistic), the winner on the folds
    the search did not use, and the nested estimate of the tuned pipeline."""
    found = tune_records(paths)
    if not found:
        return Todo("no tuning", "./run.sh tune <backbone>")
    rows, outer = [], []
    for name, r in found.items():
        b, e = r["best"] or {}, r["estimate"] or {}
        rows.append([name, b.get("objective", "features (assumed: not recorded)" if b else None),
                     b.get("training_path"), b.get("early_stopping"), b.get("trials"),
                     b.get("search_score"), b.get("search_score_kind"),
                     b.get("holdout_score"),
                     _score_ci(e.get("macro_f1"), e.get("estimate_ci95")),
                     (f"{e.get('trials_per_outer_fold')} trials per outer fold"
                      + ("" if e.get("honest", True) else "; " + str(e.get("why"))))
                     if e else None])
        if e.get("outer"):
            outer.append([name, *[o.get("macro_f1") for o in e["outer"]]])
    table = _table(["backbone", "objective", "training path", "early stopping", "trials",
                    "search score", "what it is", "holdout score", "nested estimate [95% interval]",
                    "estimate settings"], rows)
    if not outer:
        return {"runs": table, "outer": None}
    width = max(len(r) for r in outer) - 1
    return {"runs": table, "outer": _table(["nested estimate by outer fold",
                                            *[f"fold {k}" for k in range(width)]], outer, "num")}


def _confusion_figure(paths: Paths, name: str, m: dict, ci=None) -> dict:
    """``runs/<bb>/confusion.png``, else drawn from metrics.json; no image when neither."""
    png = paths.backbone_dir(name) / "confusion.png"
    if png.is_file():
        data = png.read_bytes()
    elif m.get("confusion"):
        data = confusion_png(m["confusion"], m.get("classes", CLASSES),
                             f"{name} OOF, macro F1 "
                             f"{_score_ci(m.get('oof_macro_f1'), ci) or '–'}")
    else:
        return {"name": name, "img": None}
    return {"name": name, "img": _img(data, alt=f"{name} confusion matrix")}


def confusion_png(cm, classes, title: str) -> bytes:
    """PNG bytes of a confusion matrix, drawn as ``runs/<bb>/confusion.png`` is."""
    from kit.metrics import confusion_figure

    return _fig_png(confusion_figure(cm, classes, title))


# ----------------------------------------------------------------------------- blend

def blend_record(paths: Paths) -> tuple[dict | None, str]:
    """The newest blend: ``runs/blend/blend.json``, else ``submissions/latest.json``."""
    blend_json = paths.runs_dir / "blend" / "blend.json"
    if blend_json.is_file():
        return _read_json(blend_json), "runs/blend/blend.json"
    latest = paths.submissions_dir / "latest.json"
    if latest.is_file():
        manifest = _read_json(latest)
        return ({**manifest["blend"], "scores": manifest["scores"],
                 **{k: manifest[k] for k in ("expected_score", "expected_ci95") if k in manifest}},
                "submissions/latest.json")
    return None, ""


def blend_section(paths: Paths) -> dict | Todo:
    """Weights, class biases and the nested (expected) vs in-sample (optimistic) scores."""
    blend, source = blend_record(paths)
    if blend is None:
        return Todo("no blend", "./run.sh blend")
    scores = blend.get("scores", {})
    nested, in_sample = scores.get("nested", {}), scores.get("in_sample", {})
    expected = blend.get("expected_score")
    why_optimistic = []
    if expected is None:
        nested_head, verdict = "nested (inputs not recorded: rerun ./run.sh blend)", "unrecorded"
    elif expected.get("honest"):
        nested_head, verdict = "nested (expected)", "honest"
    else:
        nested_head, verdict = "nested (optimistic)", "optimistic"
        why_optimistic = [(bb, "; ".join(why)) for bb, why in (expected.get("why") or {}).items()]
    score_rows = [
        ["blend + class biases", in_sample.get("macro_f1"),
         _score_ci(nested.get("macro_f1"), blend_ci(paths, blend, source))],
        ["blend, plain argmax", in_sample.get("macro_f1_no_bias"), nested.get("macro_f1_no_bias")],
    ]
    base = scores.get("baselines", {})
    if "equal_weights" in base:
        score_rows.append(["equal weights (baseline)", base["equal_weights"].get("macro_f1"), None])
    if "best_single" in base:
        best = base["best_single"]
        score_rows.append([f"best single: {best.get('model')}", best.get("macro_f1"), None])
    ctx = {"source": source, "n_backbones": len(blend.get("backbones", [])),
           "objective": blend.get("objective", "?"), "verdict": verdict,
           "why_optimistic": why_optimistic,
           "scores": _table(["OOF macro F1", "in-sample (optimistic)",
                             f"{nested_head} [95% interval]"], score_rows, "num"),
           "provenance": None, "per_fold": None, "per_class": None}
    prov = blend.get("inputs_provenance") or {}
    if prov:
        ctx["provenance"] = _table(
            ["input", "training path", "epochs chosen by", "params", "OOF score", "why"],
            [[bb, p.get("training_path"), p.get("epochs"), p.get("params"),
              _verdict(bool(p.get("honest"))), "; ".join(p.get("why") or []) or None]
             for bb, p in prov.items()])
    per_fold = sorted((int(k), v) for k, v in (nested.get("per_fold") or {}).items())
    if per_fold:
        ctx["per_fold"] = _table(["nested macro F1 by fold", *[f"fold {k}" for k, _ in per_fold]],
                                 [["", *[v for _, v in per_fold]]], "num")
    pc_in, pc_nested = in_sample.get("per_class_f1", {}), nested.get("per_class_f1", {})
    if pc_in or pc_nested:
        ctx["per_class"] = _table(["class", "F1 in-sample", "F1 nested"],
                                  [[c, pc_in.get(c), pc_nested.get(c)] for c in CLASSES], "num")
    weights = sorted(blend.get("weights", {}).items(), key=lambda kv: -kv[1])
    biases = blend.get("biases", {})
    order = [c for c in CLASSES if c in biases] + sorted(set(biases) - set(CLASSES))
    return {**ctx, "weights": _table(["model", "weight"], [[m, w] for m, w in weights], "num"),
            "biases": _table(["class", "bias on log p"], [[c, biases[c]] for c in order], "num")}


def recorded_ci(record: dict) -> list[float] | None:
    """The interval a blend record or manifest stores beside its nested (expected) score."""
    expected = record.get("expected_score") or {}
    nested = (record.get("scores") or {}).get("nested") or {}
    for ci in (expected.get("ci95"), expected.get("macro_f1_ci95"), record.get("expected_ci95"),
               nested.get("ci95"), nested.get("macro_f1_ci95")):
        if _interval(ci) is not None:
            return _interval(ci)
    return None


def blend_ci(paths: Paths, blend: dict, source: str) -> list[float] | None:
    """The blend's expected-score interval: as recorded, else bootstrapped from the nested
    predictions of ``runs/blend/oof_blend.csv`` when they give the recorded nested score (the
    same blend); None otherwise."""
    from kit.metrics import bootstrap_ci, macro_f1, to_indices

    recorded = recorded_ci(blend)
    if recorded is not None or source != "runs/blend/blend.json":
        return recorded
    nested = ((blend.get("scores") or {}).get("nested") or {}).get("macro_f1")
    try:
        oof = pd.read_csv(paths.runs_dir / "blend" / "oof_blend.csv", dtype=str,
                          keep_default_na=False)
        y, pred = to_indices(oof["label"].to_numpy()), to_indices(oof["pred_nested"].to_numpy())
    except _READ_ERRORS:  # an older blend without pred_nested: no interval, not an error
        return None
    if nested is None or abs(macro_f1(y, pred) - float(nested)) > 1e-6:
        return None  # oof_blend.csv is not the recorded blend's: its interval would mislead
    return _interval(bootstrap_ci(y, pred))


# ----------------------------------------------------------------------------- reliability

def blended_oof(paths: Paths) -> tuple[pd.DataFrame | None, str]:
    """Blended OOF probabilities: ``runs/blend/oof_blend.csv``, else recomputed.

    The fallback weights each library model's ``oof.csv`` (``bb/view`` models read
    ``runs/bb/tta/oof_view.csv``) by the newest blend's weights.
    """
    path = paths.runs_dir / "blend" / "oof_blend.csv"
    if path.is_file():
        return pd.read_csv(path), "runs/blend/oof_blend.csv"
    blend, source = blend_record(paths)
    if blend is None or not blend.get("weights"):
        return None, ""
    total, frame = None, None
    for model, weight in blend["weights"].items():
        if not weight:
            continue
        bb, _, view = model.partition("/")
        file = (paths.backbone_dir(bb) / "tta" / f"oof_{view}.csv" if view
                else paths.backbone_dir(bb) / "oof.csv")
        df = pd.read_csv(file).sort_values("sample_index").reset_index(drop=True)
        probs = weight * df[PROB_COLUMNS].to_numpy(np.float64)
        if total is None:
            total, frame = probs, df[["sample_index", "label"]].copy()
        elif not df["sample_index"].equals(frame["sample_index"]):
            raise KitError(f"{file}: covers other images than the blend's other models; "
                           "rerun ./run.sh blend")
        else:
            total = total + probs
    if total is None:
        return None, ""
    frame[PROB_COLUMNS] = total / total.sum(axis=1, keepdims=True)
    return frame, f"backbone oof.csv files weighted as in {source}"


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> dict:
    """Top-label reliability: per confidence bin, mean confidence, accuracy and count; ECE."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, bins) / count
        acc = np.bincount(idx, correct, bins) / count
    ece = float(np.nansum(count * np.abs(acc - mean_conf)) / max(len(y), 1))
    return {"edges": edges, "confidence": mean_conf, "accuracy": acc, "count": count, "ece": ece}


def reliability_section(paths: Paths, cfg: dict) -> dict | Todo:
    """Top-label reliability diagram of the blended OOF probabilities, with their ECE."""
    oof, source = blended_oof(paths)
    if oof is None:
        return Todo("no blended OOF probabilities", "./run.sh blend")
    lookup = {c: i for i, c in enumerate(CLASSES)}
    y = oof["label"].map(lookup).to_numpy()
    curves = {"in-sample weights": oof[PROB_COLUMNS].to_numpy(np.float64)}
    if all(c in oof.columns for c in NESTED_COLUMNS):
        curves["nested weights"] = oof[NESTED_COLUMNS].to_numpy(np.float64)
    stats = {name: reliability(p, y, int(cfg["reliability_bins"])) for name, p in curves.items()}
    png = reliability_png(stats)
    return {"source": source, "n": len(oof),
            "eces": ", ".join(f"{n} {s['ece']:.3f}" for n, s in stats.items()),
            "plot": _img(png, alt="reliability diagram")}


def reliability_png(stats: dict) -> bytes:
    plt = _pyplot()
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(6, 6.4), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="#888", lw=1, label="perfect calibration")
    for (name, s), marker in zip(stats.items(), "os^"):
        ok = s["count"] > 0
        ax.plot(s["confidence"][ok], s["accuracy"][ok], marker=marker,
                label=f"{name} (ECE {s['ece']:.3f})")
    ax.set_ylabel("accuracy of the top class")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title("Blended OOF probabilities: reliability")
    first = next(iter(stats.values()))
    width = np.diff(first["edges"])
    hx.bar(first["edges"][:-1], first["count"], width=width, align="edge", color="#9bc",
           edgecolor="white")
    hx.set_xlabel("confidence (top-class probability)")
    hx.set_ylabel("images")
    fig.tight_layout()
    return _fig_png(fig)


# ----------------------------------------------------------------------------- submissions

def submission_manifests(paths: Paths) -> list[tuple[Path, dict]]:
    """Every manifest and manifest-less upload log under ``submissions/``, newest first."""
    folder = paths.submissions_dir
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json"), reverse=True):
        if path.name == "latest.json":
            continue
        found.append((path, _read_json(path)))
    return found


def submissions_section(paths: Paths) -> dict | Todo:
    """Every submission file with its scores, and every upload with its public score."""
    found = submission_manifests(paths)
    if not found:
        return Todo("no submission files", "./run.sh blend, then ./run.sh submit -m MSG")
    latest = paths.submissions_dir / "latest.json"
    latest_name = None
    if latest.is_file():
        latest_name = _read_json(latest).get("files", {}).get("manifest")
    rows, uploads = [], []
    for path, m in found:
        scores = m.get("scores", {})
        git = m.get("kit", {}).get("git", {})
        commit = (git.get("commit") or "")[:10] + (" (dirty)" if git.get("dirty") else "")
        csv = m.get("files", {}).get("csv") or m.get("csv", path.stem)
        tag = " ← latest" if path.name == latest_name else ""
        label = (m.get("expected_score") or {}).get("label", "not recorded")
        expected = _score_ci(scores.get("nested", {}).get("macro_f1"), recorded_ci(m))
        rows.append([csv + tag, m.get("created_utc"), m.get("csv_rows"), expected, label,
                     scores.get("in_sample", {}).get("macro_f1"),
                     ", ".join(m.get("backbones", {}) or []), commit or None])
        for rec in m.get("submissions", []):
            uploads.append([rec.get("time"), csv, rec.get("competition"), rec.get("message"),
                            rec.get("status"), rec.get("ref"), rec.get("public_score"),
                            expected, rec.get("error")])
    files = _table(["file", "created (UTC)", "rows", "nested macro F1", "nested is",
                    "in-sample macro F1", "backbones", "git commit"], rows, "num")
    if not uploads:
        return {"files": files, "uploads": None}
    uploads.sort(key=lambda r: str(r[0]), reverse=True)
    return {"files": files,
            "uploads": _table(["time (UTC)", "file", "competition", "message", "status", "ref",
                               "public score", "nested CV estimate", "error"], uploads, "num")}
