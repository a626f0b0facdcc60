"""Junk detection: green-stained scans and cartoon ("Shrek") images.

Two rules, thresholds in ``kit/conf/clean.yaml``:

- **green**: share of pixels with (0-1 scale) G > 0.7, G - R > 0.2 and G - B > 0.2; flagged
  above 0.1 % of the image (the rule that caught all 50 green splats of v2).
- **cartoon**: every cartoon of v2 reuses a real image's mask file byte for byte, so duplicate
  masks are the strongest signal; a colour/texture score (share of yellow/green/brown hues,
  which H&E never has, plus share of flat pixels) decides which member of a duplicate group
  is the cartoon: the most H&E-like one is kept. Without a duplicate mask (or without masks
  at all) only a very high score flags an image.

Only the detectors the task lists in ``junk`` flag images (AN2DL: both; another task usually
none): the scores are still computed for ``scores.csv`` and the review page, and the
near-duplicate groups are still found (image hashes always, mask hashes when there are masks).

``run_clean`` writes ``folds/outliers.csv`` (``sample_index,reason,score``), a review page with
thumbnails of everything flagged, of the borderline cases and of the near-duplicate groups,
a report of suspicious test images (never dropped: every test image needs a prediction) and
``runs/clean/near_duplicates.csv`` (perceptual-hash groups, :mod:`kit.data.neardup`) for ``folds``.
``clean_train_samples`` applies
``outliers.csv`` and the user's ``folds/overrides.csv`` (``sample_index,action``, keep|drop),
which wins over the detector.
"""
from __future__ import annotations

import logging
import multiprocessing
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kit.config import given
from kit.data import neardup
from kit.data.dataset import (
    Dataset,
    Sample,
    jpeg_thumbnail,
    load_dataset,
    read_mask,
    to_rgb_array,
)
from kit.paths import Paths
from kit.task import JUNK_DETECTORS, as_data
from kit.templates import data_uri, render
from kit.utils import (
    KitError,
    atomic_write_csv,
    atomic_write_text,
    n_workers,
    progress,
    read_csv_columns,
    sha256_file,
    write_config,
)

REASONS = ("cartoon", "green")
OUTLIER_COLUMNS = ["sample_index", "reason", "score"]
OVERRIDE_COLUMNS = ["sample_index", "action"]
ACTIONS = ("keep", "drop")
FEATURES = ["green", "colour", "smooth", "cartoon"]

log = logging.getLogger(__name__)


def run_clean(paths: Paths, data, cfg: dict, *, skip_bad: bool = False) -> pd.DataFrame:
    """Scan every image, flag junk training images and write the clean stage's files.

    Parameters
    ----------
    paths : Paths
        Work directory layout; writes ``paths.outliers_csv`` and, in ``paths.clean_dir``,
        ``review.html``, ``test_suspicious.csv``, ``scores.csv``, ``near_duplicates.csv`` and
        ``config.yaml``.
    data : kit.task.Data, path or Dataset
        Dataset root with its task (:func:`kit.task.as_data`; validated with
        :func:`kit.data.dataset.load_dataset`) or a loaded dataset. The task's ``junk`` names
        the detectors that flag images.
    cfg : dict
        The resolved ``clean`` config (``kit.config.load_config("clean", overrides)``).
    skip_bad : bool
        Passed to ``load_dataset`` when ``data`` is a path.

    Returns
    -------
    DataFrame
        The flagged training images: ``sample_index,reason,score``, sorted.
    """
    cfg = given(cfg, "clean")
    dataset = data if isinstance(data, Dataset) else load_dataset(as_data(data),
                                                                  skip_bad=skip_bad)
    detectors = dataset.task.junk
    overrides = load_overrides(paths)  # a broken file should stop us before the long scan
    feats = scan(dataset, cfg)
    feats = decide(feats, cfg, detectors)
    is_train = feats["split"] == "train"
    outliers = _flagged(feats[is_train])
    suspicious = _flagged(feats[~is_train])
    near = neardup.find_groups(feats, cfg["near_duplicates"])

    paths.clean_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(paths.outliers_csv, outliers, float_format="%.6g")
    atomic_write_csv(paths.clean_dir / "test_suspicious.csv", suspicious, float_format="%.6g")
    atomic_write_csv(paths.clean_dir / "scores.csv", feats.drop(columns=["thumb"]),
                     float_format="%.6g")
    atomic_write_csv(neardup.near_duplicates_csv(paths), near)
    atomic_write_text(paths.clean_dir / "review.html",
                      review_html(feats, cfg, overrides, near, detectors))
    # The built-in task's record stays as it was; another task's names what ran.
    task = ({} if dataset.task.builtin else
            {"task": dataset.task.name, "junk": list(detectors)})
    write_config(paths.clean_dir / "config.yaml",
                 {**cfg, "data": str(dataset.root), **task, "n_train": len(dataset.train),
                  "n_test": len(dataset.test),
                  "flagged": outliers["reason"].value_counts().to_dict(),
                  "near_duplicate_groups": int(near["group"].nunique())})
    _warn_big_groups(near, cfg["near_duplicates"]["warn_group_size"], paths)
    if len(suspicious):
        log.warning(f"warning: {len(suspicious)} test image(s) look like junk (kept: every test "
                    f"image needs a prediction): {', '.join(suspicious['sample_index'])}; see "
                    f"{paths.clean_dir / 'test_suspicious.csv'}")
    return outliers


# ---------------------------------------------------------------------------------------------
# Per-image features


def scan(dataset: Dataset, cfg: dict) -> pd.DataFrame:
    """Features of every train and test image, one row each (decoding in parallel)."""
    samples = [("train", s) for s in dataset.train] + [("test", s) for s in dataset.test]
    tasks = [(str(s.image), None if s.mask is None else str(s.mask)) for _, s in samples]
    work = partial(image_features, cfg=cfg)
    workers = n_workers(cfg["workers"])
    bar = dict(total=len(tasks), desc="clean", unit="img")
    if workers <= 1 or len(tasks) < cfg["parallel_min"]:
        rows = [work(t) for t in progress(tasks, **bar)]
    else:
        # forkserver: safe even when the parent has threads (torch, BLAS) running
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            rows = list(progress(pool.imap(work, tasks, chunksize=4), **bar))
    feats = pd.DataFrame(rows)
    feats.insert(0, "split", [split for split, _ in samples])
    feats.insert(1, "sample_index", [s.sample_index for _, s in samples])
    feats.insert(2, "label", [s.label or "" for _, s in samples])
    return feats


def image_features(task: tuple[str, str | None], cfg: dict) -> dict:
    """Green share, cartoon score parts, mask hashes, perceptual hashes and a JPEG thumbnail.

    ``task`` is ``(image path, mask path or None)``; without a mask its hashes are ``""``
    (compared with nothing) and its share NaN.
    """
    image, mask = task
    im = _load_small(image, cfg["work_side"])
    rgb = np.asarray(im)
    green = green_pixels(rgb, cfg["green"])
    colour, smooth = cartoon_parts(rgb, np.asarray(im.convert("HSV")), ~green, cfg["cartoon"])
    w = cfg["cartoon"]["colour_weight"]
    nd = cfg["near_duplicates"]
    mask_phash, mask_share, mask_sha = "", float("nan"), ""
    if mask is not None:
        mask_phash, mask_share = neardup.mask_hash(read_mask(mask), cfg["work_side"],
                                                   nd["hash_size"], nd["mask_min_share"])
        mask_sha = sha256_file(mask)  # same definition as kit.data.dataset.mask_groups
    return {"green": float(green.mean()), "colour": colour, "smooth": smooth,
            "cartoon": w * colour + (1 - w) * smooth,
            "mask_sha256": mask_sha,
            "image_phash": neardup.image_hash(im, nd["hash_size"]),  # the shrunk copy: cheap
            "mask_phash": mask_phash, "mask_share": mask_share,
            "thumb": jpeg_thumbnail(im, cfg["thumb_side"])}


def _load_small(path: str, work_side: int) -> Image.Image:
    """Decode and shrink by an integer factor so the short side is about ``work_side``."""
    with Image.open(path) as im:
        im = im.convert("RGB") if im.mode in ("RGB", "RGBA", "P", "L", "LA") else \
            Image.fromarray(to_rgb_array(im))
    factor = max(1, min(im.size) // max(1, work_side))
    return im.reduce(factor) if factor > 1 else im


def green_pixels(rgb: np.ndarray, cfg: dict) -> np.ndarray:
    """Boolean map of saturated-green pixels (normalised G > min_g, G-R and G-B > margin)."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    margin = cfg["margin"] * 255
    return (g > cfg["min_g"] * 255) & (g - r > margin) & (g - b > margin)


def cartoon_parts(rgb: np.ndarray, hsv: np.ndarray, usable: np.ndarray, cfg: dict):
    """(colour, smooth) shares over the coloured pixels: non-H&E hue and flat texture.

    Grey background, dark bands and black pen have no reliable hue and are left out, and so
    are ``usable == False`` pixels (green stain: that rule's business, not a cartoon sign).
    """
    sat, val = hsv[..., 1], hsv[..., 2]
    coloured = (sat > cfg["min_saturation"] * 255) & (val > 40) & usable
    n = int(coloured.sum())
    if n == 0:
        return 0.0, 0.0
    hue = hsv[..., 0].astype(np.float32) * (360 / 255)
    odd_hue = (hue >= cfg["hue_min"]) & (hue <= cfg["hue_max"])
    grey = rgb.astype(np.float32).mean(axis=2)
    grad = np.zeros_like(grey)
    grad[:-1, :-1] = np.abs(np.diff(grey, axis=1))[:-1] + np.abs(np.diff(grey, axis=0))[:, :-1]
    flat = grad < cfg["smooth_gradient"]
    return float(odd_hue[coloured].mean()), float(flat[coloured].mean())


# ---------------------------------------------------------------------------------------------
# Decisions


def decide(feats: pd.DataFrame, cfg: dict, detectors=JUNK_DETECTORS) -> pd.DataFrame:
    """Add ``reason``/``score`` (empty/NaN when clean) and duplicate-mask group columns.

    Groups are taken over train and test together, so a test image reusing a training mask
    is caught too; an image without a mask (``mask_sha256`` empty) is a group of its own.
    Only ``detectors`` (the task's ``junk``: ``green``, ``cartoon``) flag images.
    """
    feats = feats.copy()
    cc, gc = cfg["cartoon"], cfg["green"]
    own = "\0" + feats["split"] + "/" + feats["sample_index"]  # never a sha256
    key = feats["mask_sha256"].where(feats["mask_sha256"] != "", own).rename("_mask")
    feats["group_size"] = feats.groupby(key)["sample_index"].transform("size")
    # Within a duplicate group, rank 0 = the most H&E-like member (ties: train first, by name).
    order = feats.assign(_mask=key).sort_values(["_mask", "cartoon", "split", "sample_index"],
                                                ascending=[True, True, False, True])
    feats["group_rank"] = order.groupby("_mask").cumcount().reindex(feats.index)
    paired = ((feats["group_size"] > 1) & (feats["group_rank"] > 0)
              & (feats["cartoon"] >= cc["paired"]))
    off = pd.Series(False, index=feats.index)
    cartoon = ((feats["cartoon"] >= cc["strict"]) | paired) if "cartoon" in detectors else off
    green = (~cartoon & (feats["green"] > gc["min_share"])) if "green" in detectors else off
    feats["reason"] = np.select([cartoon, green], ["cartoon", "green"], default="")
    feats["score"] = np.select([cartoon, green], [feats["cartoon"], feats["green"]], default=np.nan)
    return feats


def _flagged(feats: pd.DataFrame) -> pd.DataFrame:
    out = feats.loc[feats["reason"] != "", OUTLIER_COLUMNS]
    return out.sort_values("sample_index").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Reading the files back


def load_outliers(paths: Paths) -> pd.DataFrame:
    """``folds/outliers.csv`` as written by :func:`run_clean`."""
    path = paths.outliers_csv
    if not path.exists():
        raise KitError(f"{path}: not found; run ./run.sh clean first")
    df = _read_csv(path, OUTLIER_COLUMNS, "sample_index,reason,score")
    bad = sorted(set(df["reason"]) - set(REASONS))
    if bad:
        raise KitError(f"{path}: unknown reason(s) {', '.join(bad)}; expected "
                       f"{' or '.join(REASONS)}; rerun ./run.sh clean")
    df["score"] = pd.to_numeric(df["score"], errors="coerce")
    return df


def load_overrides(paths: Paths) -> pd.DataFrame:
    """The user's ``folds/overrides.csv`` (``sample_index,action``); empty when absent."""
    path = paths.overrides_csv
    if not path.exists():
        return pd.DataFrame(columns=OVERRIDE_COLUMNS)
    df = _read_csv(path, OVERRIDE_COLUMNS, "sample_index,action (action keep or drop)")
    df["action"] = df["action"].str.strip().str.lower()
    bad = df[~df["action"].isin(ACTIONS)]
    if len(bad):
        rows = ", ".join(f"line {i + 2}: {a!r}" for i, a in bad["action"].items())
        raise KitError(f"{path}: action must be keep or drop ({rows}); expected header "
                       "sample_index,action")
    dup = df[df.duplicated("sample_index", keep=False)]
    if len(dup):
        raise KitError(f"{path}: {', '.join(sorted(set(dup['sample_index'])))} listed more than "
                       "once; keep one row per image")
    return df


def _read_csv(path: Path, columns: list[str], expected: str) -> pd.DataFrame:
    df = read_csv_columns(path, columns, expected)
    df["sample_index"] = df["sample_index"].str.strip()
    return df


def clean_train_samples(dataset: Dataset, paths: Paths) -> list[Sample]:
    """The training samples left after ``outliers.csv`` and ``overrides.csv`` (which wins)."""
    outliers = load_outliers(paths)
    overrides = load_overrides(paths)
    names = {s.sample_index for s in dataset.train}
    stale = sorted(set(outliers["sample_index"]) - names)
    if stale:
        raise KitError(f"{paths.outliers_csv}: lists {len(stale)} image(s) not in the dataset "
                       f"({', '.join(stale[:5])}); rerun ./run.sh clean on this dataset")
    unknown = sorted(set(overrides["sample_index"]) - names)
    if unknown:
        raise KitError(f"{paths.overrides_csv}: {', '.join(unknown[:5])} not in the training set; "
                       "fix the sample_index (e.g. img_0000.png) or remove the row")
    action = dict(zip(overrides["sample_index"], overrides["action"]))
    drop = {n for n in outliers["sample_index"] if action.get(n) != "keep"}
    drop |= {n for n, a in action.items() if a == "drop"}
    return [s for s in dataset.train if s.sample_index not in drop]


# ---------------------------------------------------------------------------------------------
# Review page


def review_html(feats: pd.DataFrame, cfg: dict, overrides: pd.DataFrame | None = None,
                near: pd.DataFrame | None = None, detectors=JUNK_DETECTORS) -> str:
    """A self-contained page (thumbnails inlined) to check the detector by eye, rendered from
    ``kit/templates/review.html`` (which escapes every name and label).

    ``near`` (:func:`kit.data.neardup.find_groups`) adds the near-duplicate groups, except those
    that are exactly a group of byte-identical masks (shown in their own section). Only the
    task's ``detectors`` get their flagged and borderline sections.
    """
    action = {} if overrides is None else dict(zip(overrides["sample_index"], overrides["action"]))
    train, test = feats[feats["split"] == "train"], feats[feats["split"] == "test"]
    sections = []
    for reason in (r for r in REASONS if r in detectors):
        hit = train[train["reason"] == reason].sort_values("score", ascending=False)
        sections.append((f"Flagged {reason}: {len(hit)}", hit, action))
    clean = train[train["reason"] == ""]
    n = cfg["borderline"]
    if "green" in detectors:
        near_green = clean[clean["green"] > 0].nlargest(n, "green")
        sections.append((f"Borderline green (top {n} unflagged, threshold "
                         f"{cfg['green']['min_share']:g})", near_green, action))
    if "cartoon" in detectors:
        sections.append((f"Borderline cartoon (top {n} unflagged, thresholds paired "
                         f"{cfg['cartoon']['paired']:g} / strict {cfg['cartoon']['strict']:g})",
                         clean.nlargest(n, "cartoon"), action))
    dup = feats[feats["group_size"] > 1].sort_values(["mask_sha256", "group_rank"])
    sections.append((f"Images sharing a mask file ({dup['mask_sha256'].nunique()} groups; "
                     "rank 0 of each group is kept)", dup, action))
    sections.append((f"Test images reported (kept): {int((test['reason'] != '').sum())}",
                     test[test["reason"] != ""], {}))
    counts = train["reason"].value_counts()
    flagged = (", ".join(f"{int(counts.get(r, 0))} {r}" for r in REASONS if r in detectors)
               + " flagged" if detectors else "no junk detector for this task (junk: [])")
    example = train["sample_index"].iloc[0] if len(train) else "img_0000.png"
    page = render("review.html", n_train=len(train), flagged=flagged, example=example,
                  n_test=len(test), n_overrides=len(action),
                  sections=[{"title": title, "cards": [_card(r, act.get(r.sample_index))
                                                       for r in rows.itertuples(index=False)]}
                            for title, rows, act in sections],
                  near=None if near is None else _near_section(feats, near,
                                                               cfg["near_duplicates"], action))
    return str(page)


def _near_section(feats: pd.DataFrame, near: pd.DataFrame, cfg: dict, action: dict) -> dict:
    """Near-duplicate groups, one row of thumbnails each, with how each member matched; the
    groups that are exactly images sharing one mask file are counted, not shown again."""
    limits = (f"image hash within {cfg['image_distance']}, mask hash within "
              f"{cfg['mask_distance']} of {cfg['hash_size'] ** 2} bits")
    title = f"Near-duplicate groups ({near['group'].nunique()}; {limits}; kept in one fold)"
    if near.empty:
        return {"title": title, "n_hidden": 0, "groups": None}
    rows = near.merge(feats, on=["split", "sample_index"], how="left", sort=False)
    # a group whose members share one mask file (none: images without masks share nothing)
    same_mask = ((rows.groupby("group")["mask_sha256"].transform("nunique") == 1)
                 & (rows["mask_sha256"] != ""))
    groups = [{"number": number,
               "cards": [_card(r, action.get(r.sample_index) if r.split == "train" else None,
                               note=f"near-duplicate group {number}: {r.kind} hash "
                                    f"{r.distance} bits from {r.nearest}")
                         for r in group.itertuples(index=False)]}
              for number, group in rows[~same_mask].groupby("group", sort=True)]
    return {"title": title, "n_hidden": int(rows.loc[same_mask, "group"].nunique()),
            "groups": groups}


def _warn_big_groups(near: pd.DataFrame, limit: int, paths: Paths) -> None:
    """Warn about groups larger than ``limit``: a loose threshold chains unrelated images."""
    if near.empty or not limit:
        return
    sizes = near.groupby("group").size()
    big = sizes[sizes > limit]
    if len(big):
        log.warning(f"warning: {len(big)} near-duplicate group(s) with more than {limit} "
                    f"images (largest: {int(big.max())}); check them in "
                    f"{paths.clean_dir / 'review.html'}, and lower near_duplicates."
                    "image_distance / mask_distance in kit/conf/clean.yaml if they are not "
                    "copies of one another")


def _card(r, override: str | None, note: str = "") -> dict:
    """One image of the review page: thumbnail, flag, override, mask group and scores."""
    tag = f"{r.reason} {r.score:.4g}" if r.reason else "not flagged"
    if override:
        tag += f" · override: {override}"
    if r.group_size > 1:
        tag += f" · mask shared by {r.group_size} (rank {r.group_rank})"
    return {"cls": r.reason or "ok", "src": data_uri(r.thumb, "image/jpeg"),
            "name": f"{r.split}/{r.sample_index}", "label": r.label, "tag": tag, "note": note,
            "stats": f"green {r.green:.4f} · cartoon {r.cartoon:.3f} (colour {r.colour:.2f}, "
                     f"flat {r.smooth:.2f})"}
