"""``runs/report.html``: every section from a synthetic work directory, graceful when inputs
are missing, self-contained, scores first and thumbnails folded, names from files escaped
(Jinja2 templates), and rendered by a real headless browser."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fake_kaggle import write_fake_submission
from kit import CLASSES
from kit.config import load_config, train_settings
from kit.ensemble.blend import expected_score, provenance
from kit.metrics import bootstrap_ci, macro_f1, plot_confusion
from kit.paths import Paths
from kit.submission import package
from kit.submission.report import run_report
from kit.submission.report.calibration import reliability
from kit.utils import atomic_write_csv, atomic_write_json, write_config

PROB = [f"p_{c}" for c in CLASSES]


def _probs(rng, y, n_classes=4, sharp=2.0):
    logits = rng.normal(size=(len(y), n_classes))
    logits[np.arange(len(y)), y] += sharp
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


HONEST = {"selection": {"early_stopping": "inner", "epochs_honest": True},
          "params_source": {"spec": "none", "description": "defaults (no params file)",
                            "honest": True, "why": "no tuned parameters"},
          "training_path": "pixels"}
OOF_STOPPED = {**HONEST, "selection": {"early_stopping": "oof", "epochs_honest": False}}


def _backbone(paths: Paths, name, ids, y, folds, rng, with_png, how=HONEST, ci=None):
    out = paths.backbone_dir(name)
    probs = _probs(rng, y)
    oof = pd.DataFrame({"sample_index": ids, "fold": folds, "label": [CLASSES[i] for i in y]})
    oof[PROB] = probs
    atomic_write_csv(out / "oof.csv", oof)
    pred = probs.argmax(axis=1)
    cm = np.zeros((4, 4), int)
    np.add.at(cm, (y, pred), 1)
    metrics = {"backbone": name, "oof_macro_f1": 0.5123 if with_png else 0.4012,
               "oof_weighted_f1": 0.55, "n_oof": len(ids), "weights_source": "random init",
               "per_fold": [{"fold": k, "macro_f1": 0.4 + 0.01 * k} for k in range(3)],
               "per_class": {c: {"f1": 0.3 + 0.1 * i} for i, c in enumerate(CLASSES)},
               "confusion": cm.tolist(), "classes": list(CLASSES), "folds_sha256": "1" * 64,
               **how, **({"oof_macro_f1_ci95": ci} if ci else {})}
    atomic_write_json(out / "metrics.json", metrics)
    if with_png:
        plot_confusion(cm, CLASSES, out / "confusion.png", title=f"{name} OOF")
    return probs


def build_workdir(root: Path, blend_oof: bool = True,
                  convnext_how: dict = HONEST) -> tuple[Paths, Path]:
    """Data, outliers, folds, two backbones, a tuning, a blend and an uploaded submission."""
    rng = np.random.default_rng(0)
    paths = Paths.from_root(root / "work")
    data = root / "data"
    (data / "train_data").mkdir(parents=True)
    n = 40
    ids = [f"img_{i:04d}.png" for i in range(n)]
    labels = [CLASSES[i % 4] for i in range(n)]
    pd.DataFrame({"sample_index": ids, "label": labels}).to_csv(data / "train_labels.csv",
                                                                index=False)
    junk = {"img_0001.png": ("cartoon", 0.91), "img_0002.png": ("green", 0.034),
            "img_0007.png": ("green", 0.012)}
    for i, (name, (reason, _)) in enumerate(junk.items()):
        if name == "img_0007.png":
            continue  # one flagged image has no file: the report says so
        colour = (230, 200, 40) if reason == "cartoon" else (40, 220, 60)
        arr = np.full((120, 300, 3), 215, np.uint8)
        arr[30:90, 40 + 60 * i:200] = colour
        Image.fromarray(arr).save(data / "train_data" / name)
    paths.folds_dir.mkdir(parents=True)
    outliers = [{"sample_index": k, "reason": r, "score": v} for k, (r, v) in junk.items()]
    pd.DataFrame(outliers).to_csv(paths.outliers_csv, index=False)
    clean = [i for i in range(n) if ids[i] not in junk]
    folds = np.arange(len(clean)) % 3
    pd.DataFrame({"sample_index": [ids[i] for i in clean], "label": [labels[i] for i in clean],
                  "fold": folds}).to_csv(paths.folds_csv, index=False)
    y = np.array([i % 4 for i in clean])
    cids = [ids[i] for i in clean]
    pa = _backbone(paths, "effnet_b0", cids, y, folds, rng, with_png=True)
    # convnext_t records its interval (cv); effnet_b0's is bootstrapped from its oof.csv
    pb = _backbone(paths, "convnext_t", cids, y, folds, rng, with_png=False, how=convnext_how,
                   ci=[0.3456, 0.4567])
    weights = {"effnet_b0": 0.7, "convnext_t": 0.3}
    scores = {"nested": {"macro_f1": 0.4567, "macro_f1_no_bias": 0.4401,
                         "per_class_f1": {c: 0.4 for c in CLASSES},
                         "per_fold": {"0": 0.44, "1": 0.46, "2": 0.47}},
              "in_sample": {"macro_f1": 0.5234, "macro_f1_no_bias": 0.5011,
                            "per_class_f1": {c: 0.5 for c in CLASSES}},
              "baselines": {"equal_weights": {"macro_f1": 0.49},
                            "best_single": {"model": "effnet_b0", "macro_f1": 0.5123}}}
    prov = {"effnet_b0": {**provenance(HONEST), "training_path": "pixels"},
            "convnext_t": {**provenance(convnext_how), "training_path": "pixels"}}
    atomic_write_json(paths.runs_dir / "blend" / "blend.json", {
        "backbones": list(weights), "objective": "f1", "weight_views": False,
        "models": list(weights), "weights": weights,
        "biases": {"Luminal A": 0.0, "Luminal B": -0.25, "HER2(+)": 0.1,
                   "Triple negative": 0.65}, "scores": scores,
        "expected_score": expected_score(0.4567, prov), "inputs_provenance": prov})
    tune = paths.tune_dir("effnet_b0")
    write_config(tune / "best.yaml", {
        "params": {"lr": 0.001}, "objective": "features", "training_path": "feature_cache",
        "early_stopping": "inner", "trials": 30, "search_score": 0.6789,
        "search_score_kind": "search: best of 30 trials on all 3 folds: optimistic",
        "score": 0.6789})
    atomic_write_json(tune / "estimate.json", {
        "macro_f1": 0.5432, "estimate_ci95": [0.4876, 0.6012], "honest": True,
        "trials_per_outer_fold": 10,
        "outer": [{"fold": k, "macro_f1": 0.51 + 0.01 * k} for k in range(3)]})
    if blend_oof:
        blended = 0.7 * pa + 0.3 * pb
        oof = pd.DataFrame({"sample_index": cids, "fold": folds, "label": [CLASSES[i] for i in y]})
        oof[PROB] = blended
        oof[[f"nested_{c}" for c in PROB]] = 0.5 * pa + 0.5 * pb
        atomic_write_csv(paths.runs_dir / "blend" / "oof_blend.csv", oof)
    csv = write_fake_submission(paths.root, nested=0.4567, in_sample=0.5234)
    package.append_submission(csv.with_suffix(".json"), {
        "time": "2025-01-01T10:00:00+00:00", "competition": "an2dl2526c2v2",
        "message": "first <script>alert(1)</script> try", "status": "complete", "ref": 1001,
        "public_score": 0.4321})
    return paths, data


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "poster")]


def _parse(text):
    p = _Refs()
    p.feed(text)
    return p


def test_full_report_has_every_section(tmp_path):
    paths, data = build_workdir(tmp_path)
    out = run_report(paths, data, load_config("report"))
    assert out == paths.runs_dir / "report.html"
    text = out.read_text()
    for anchor in ("data", "cv", "tune", "blend", "calibration", "submissions"):
        assert f"<section id='{anchor}'>" in text
    assert "not run yet" not in text and "could not be built" not in text
    # data: counts per class, junk and clean, thumbnails (two found, one missing)
    assert "40 training images" in text
    assert "<td>Luminal B</td><td>10</td><td>1</td><td>9</td>" in text  # img_0001 is Luminal B
    assert "Junk found: 3 images" in text and "image not found" in text
    assert text.count("data:image/jpeg;base64,") == 2
    # cv: both backbones, per-fold and per-class, a stored and a rendered confusion matrix
    cv = text.split("<section id='cv'>")[1].split("</section>")[0]
    assert "effnet_b0" in cv and "convnext_t" in cv
    assert "fold 2" in text and "F1 Triple negative" in text
    assert text.count("confusion matrix") == 2
    # cv: every OOF macro F1 with its interval, recorded or bootstrapped from oof.csv
    assert "OOF macro F1 [95% interval]" in cv and "bootstrap interval over images" in cv
    assert "<td>convnext_t</td><td>0.401 [0.35, 0.46]</td>" in cv
    oof = pd.read_csv(paths.backbone_dir("effnet_b0") / "oof.csv")
    lo, hi = bootstrap_ci(oof.label.map(CLASSES.index).to_numpy(), oof[PROB].to_numpy())
    assert f"<td>effnet_b0</td><td>0.512 [{lo:.2f}, {hi:.2f}]</td>" in cv
    # blend: weights, biases, nested beside in-sample, baselines
    assert "0.457" in text and "0.5234" in text and "nested (expected)" in text
    assert "0.6500" in text and "0.7000" in text and "best single: effnet_b0" in text
    # where each estimate comes from: per backbone, the tuning, the blend's inputs
    cv = text.split("<section id='cv'>")[1].split("</section>")[0]
    assert "Where each OOF score comes from" in cv and cv.count("<b class=ok>honest</b>") == 2
    assert "inner: early stopping on an inner split" in cv and "defaults (no params file)" in cv
    tune = text.split("<section id='tune'>")[1].split("</section>")[0]
    assert "effnet_b0" in tune and "0.6789" in tune and "<td>0.543 [0.49, 0.60]</td>" in tune
    assert "best of 30 trials" in tune and "0.5300" in tune  # outer fold 2
    blend = text.split("<section id='blend'>")[1].split("</section>")[0]
    assert "without its own OOF rows" in blend and "nested (optimistic)" not in blend
    # reliability diagram from oof_blend.csv, with nested curve
    assert "runs/blend/oof_blend.csv" in text and "nested weights" in text
    # submissions: the manifest, the upload with its public score beside the estimate
    assert "20250101T000000Z_blend.csv ← latest" in text
    assert "0.4321" in text and "an2dl2526c2v2" in text
    # written config beside it
    assert (paths.runs_dir / "report_config.yaml").is_file()


def test_an_optimistic_input_is_named_in_cv_and_blend(tmp_path):
    paths, data = build_workdir(tmp_path, convnext_how=OOF_STOPPED)
    text = run_report(paths, data, load_config("report")).read_text()
    cv = text.split("<section id='cv'>")[1].split("</section>")[0]
    where = cv.split("Where each OOF score comes from")[1].split("</table>")[0]
    row = [r for r in where.split("<tr>") if "<td>convnext_t</td>" in r][0]
    assert "<b class=warn>optimistic</b>" in row and "early_stopping oof" in row
    blend = text.split("<section id='blend'>")[1].split("</section>")[0]
    assert "nested (optimistic)" in blend and "nested (expected)" not in blend
    assert "<b>convnext_t</b>: epochs chosen on its own OOF rows" in blend
    assert "<b>effnet_b0</b>" not in blend  # the honest input is not blamed


def test_old_files_without_records_are_unknown_hence_optimistic(tmp_path):
    paths, data = build_workdir(tmp_path)
    for name in ("effnet_b0", "convnext_t"):
        f = paths.backbone_dir(name) / "metrics.json"
        m = json.loads(f.read_text())
        for key in ("selection", "params_source"):
            m.pop(key)
        f.write_text(json.dumps(m))
    blend = paths.runs_dir / "blend" / "blend.json"
    b = json.loads(blend.read_text())
    b.pop("expected_score")
    b.pop("inputs_provenance")
    blend.write_text(json.dumps(b))
    text = run_report(paths, data, load_config("report")).read_text()
    cv = text.split("<section id='cv'>")[1].split("</section>")[0]
    assert cv.count("<b class=warn>optimistic</b>") == 2 and "an older cv" in cv
    assert "does not record how its inputs chose" in text


def _section(text, anchor):
    return text.split(f"<section id='{anchor}'>")[1].split("</section>")[0]


def test_the_blends_expected_score_carries_its_interval(tmp_path):
    paths, data = build_workdir(tmp_path)
    blend_json = paths.runs_dir / "blend" / "blend.json"
    oof_path = paths.runs_dir / "blend" / "oof_blend.csv"
    nested_row = "<td>blend + class biases</td><td>0.5234</td><td>0.457"
    # neither recorded nor derivable (oof_blend.csv has no pred_nested): the score alone
    blend = _section(run_report(paths, data, load_config("report")).read_text(), "blend")
    assert f"{nested_row}</td>" in blend and "nested (expected) [95% interval]" in blend
    # bootstrapped from oof_blend.csv's nested predictions when they give the nested score
    oof = pd.read_csv(oof_path)
    y = oof.label.map(CLASSES.index).to_numpy()
    pred = oof[[f"nested_{c}" for c in PROB]].to_numpy().argmax(1)
    oof["pred_nested"] = [CLASSES[i] for i in pred]
    atomic_write_csv(oof_path, oof)
    b = json.loads(blend_json.read_text())
    b["scores"]["nested"]["macro_f1"] = macro_f1(y, pred)
    atomic_write_json(blend_json, b)
    lo, hi = bootstrap_ci(y, pred)
    blend = _section(run_report(paths, data, load_config("report")).read_text(), "blend")
    assert (f"<td>blend + class biases</td><td>0.5234</td><td>{macro_f1(y, pred):.3f} "
            f"[{lo:.2f}, {hi:.2f}]</td>") in blend
    # ... but not from predictions of another blend
    b["scores"]["nested"]["macro_f1"] = 0.4567
    atomic_write_json(blend_json, b)
    text = run_report(paths, data, load_config("report")).read_text()
    assert f"{nested_row}</td>" in _section(text, "blend")
    # the interval the blend records wins, in the blend and the submissions sections
    b["expected_score"]["ci95"] = [0.4012, 0.5123]
    atomic_write_json(blend_json, b)
    manifest = paths.submissions_dir / "20250101T000000Z_blend.json"
    m = json.loads(manifest.read_text())
    m["expected_score"] = {**expected_score(0.4567, {}), "ci95": [0.4111, 0.5022]}
    atomic_write_json(manifest, m)
    text = run_report(paths, data, load_config("report")).read_text()
    assert f"{nested_row} [0.40, 0.51]</td>" in _section(text, "blend")
    subs = _section(text, "submissions")
    assert subs.count("<td>0.457 [0.41, 0.50]</td>") == 2  # the file and its upload
    # without runs/blend/, the report reads latest.json, expected score and interval included
    shutil.copy(manifest, paths.submissions_dir / "latest.json")
    shutil.rmtree(paths.runs_dir / "blend")
    blend = _section(run_report(paths, data, load_config("report")).read_text(), "blend")
    assert "nested (expected) [95% interval]" in blend and "0.457 [0.41, 0.50]" in blend


def test_self_contained_and_escaped(tmp_path):
    paths, data = build_workdir(tmp_path)
    text = run_report(paths, data, load_config("report")).read_text()
    parsed = _parse(text)
    assert parsed.refs, "expected inlined images and in-page links"
    for tag, attr, value in parsed.refs:
        assert value.startswith("data:") or value.startswith("#"), (tag, attr, value[:80])
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>" not in text
    imgs = [v for t, a, v in parsed.refs if t == "img"]
    # 2 confusion matrices, the reliability diagram, the ledger's public against expected plot
    assert sum(v.startswith("data:image/png;base64,") for v in imgs) == 4


SCORE_SECTIONS = ["cv", "blend", "tune", "submissions", "calibration"]


def test_scores_come_first_and_thumbnails_are_folded(tmp_path):
    paths, data = build_workdir(tmp_path)
    _label_issues(paths, data, "effnet_b0", ISSUES)
    text = run_report(paths, data, load_config("report")).read_text()
    anchors = re.findall(r"<section id='(\w+)'>", text)
    assert anchors == SCORE_SECTIONS + ["data", "label_issues", "attention"]
    nav = re.findall(r"<a href='#(\w+)'>", text.split("<nav>")[1].split("</nav>")[0])
    assert nav == anchors
    # the first section is the cross-validation scores: its table before any image
    first = text[:text.index("</section>")]
    assert first.index("<section id='cv'>") < first.index("OOF macro F1 [95% interval]") \
        < first.index("<img")
    # every thumbnail grid is folded: none left once the <details> blocks are cut out
    unfolded = re.sub(r"<details>.*?</details>", "", text, flags=re.S)
    assert text.count("<details>") == 2  # junk, suspects
    assert "data:image/jpeg" not in unfolded and "<figure class=junk>" not in unfolded
    assert "<figure class=suspect>" not in unfolded and "image not found" not in unfolded
    assert "<summary>3 thumbnails, by reason, highest score first</summary>" in text


def test_scores_come_first_with_nothing_run(tmp_path):
    text = run_report(Paths.from_root(tmp_path / "empty"), tmp_path / "no-data",
                      load_config("report")).read_text()
    assert re.findall(r"<section id='(\w+)'>", text)[:5] == SCORE_SECTIONS
    assert "<details>" not in text


EVIL_LABEL = "<script>alert('label')</script> & co"
EVIL_NAME = "img_<script>&x.png"


def _unescaped_markup(text: str) -> list[str]:
    """``&`` not starting an entity, and ``<`` not starting a tag the templates write."""
    amp = re.findall(r"&(?!amp;|lt;|gt;|#39;|#34;|quot;)\S{0,12}", text)
    return amp + [m for m in re.findall(r"<script[^>]*>", text)]


def test_names_and_labels_from_files_are_escaped(tmp_path):
    paths, data = build_workdir(tmp_path)
    labels = pd.read_csv(data / "train_labels.csv", dtype=str)
    labels.loc[len(labels)] = [EVIL_NAME, EVIL_LABEL]
    labels.to_csv(data / "train_labels.csv", index=False)
    outliers = pd.read_csv(paths.outliers_csv, dtype=str)
    outliers.loc[len(outliers)] = [EVIL_NAME, "green", "0.5"]
    outliers.to_csv(paths.outliers_csv, index=False)
    _label_issues(paths, data, "effnet_b0",
                  ISSUES + [(EVIL_NAME, EVIL_LABEL, "Luminal A", 0.01, 1, 2, "0")])
    text = run_report(paths, data, load_config("report")).read_text()
    assert "could not be built" not in text
    assert not _unescaped_markup(text), _unescaped_markup(text)
    assert "script" not in _parse(text).tags
    label = "&lt;script&gt;alert(&#39;label&#39;)&lt;/script&gt; &amp; co"
    name = "img_&lt;script&gt;&amp;x.png"
    assert f"<td>{label}</td><td>1</td><td>1</td><td>0</td>" in _section(text, "data")
    assert f"<figcaption>{name} · green 0.500</figcaption>" in _section(text, "data")
    assert f"alt='{name}'" in _section(text, "data")  # attributes too
    assert f"<figcaption>{name} · {label} → Luminal A · quality 0.010" in \
        _section(text, "label_issues")


def test_missing_inputs_degrade_to_hints(tmp_path):
    paths = Paths.from_root(tmp_path / "empty")
    text = run_report(paths, tmp_path / "no-data", load_config("report")).read_text()
    for hint in ("./run.sh clean", "./run.sh cv &lt;backbone&gt;", "./run.sh blend",
                 "./run.sh submit -m MSG"):
        assert hint in text
    assert text.count("not run yet") >= 4
    assert "dataset folder not found" in text
    assert "could not be built" not in text


def test_reliability_recomputed_from_backbones_and_bad_file_isolated(tmp_path):
    paths, data = build_workdir(tmp_path, blend_oof=False)
    (paths.backbone_dir("convnext_t") / "metrics.json").write_text("{ not json")
    text = run_report(paths, data, load_config("report")).read_text()
    assert "backbone oof.csv files weighted as in runs/blend/blend.json" in text
    assert "nested weights" not in text
    cv = text.split("<section id='cv'>")[1].split("</section>")[0]
    assert "could not be built" in cv and "not valid JSON" in cv
    assert "0.457" in text  # the other sections still there


def test_reliability_statistics():
    rng = np.random.default_rng(1)
    n = 20000
    conf = rng.uniform(0.25, 1.0, n)
    probs = np.column_stack([conf, *(np.repeat(((1 - conf) / 3)[:, None], 3, axis=1).T)])
    calibrated_y = np.where(rng.uniform(size=n) < conf, 0, 1)
    s = reliability(probs, calibrated_y, bins=10)
    assert s["ece"] < 0.02 and s["count"].sum() == n
    always_wrong = np.ones(n, int)
    assert reliability(probs, always_wrong, bins=10)["ece"] == pytest.approx(conf.mean(), abs=1e-9)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.browser
def test_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium not found in CI: .ci/install-chromium.sh should install it")
        pytest.skip("chromium not installed (apt-get install -y chromium, or bash "
                    ".ci/install-chromium.sh); the render check needs a real browser")
    paths, data = build_workdir(tmp_path)
    report = run_report(paths, data, load_config("report"))
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", report.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (2000, 1200)
    assert img.std() > 20, "screenshot is (nearly) blank"
    dark = (img < 128).mean()
    assert 0.01 < dark < 0.6, dark  # text, tables and plots, on a light page
    # images drawn: the lower part (plots, thumbnails) is not empty either
    assert img[1000:].std() > 10
    if os.environ.get("KIT_KEEP_SCREENSHOT"):  # to look at it by eye
        shutil.copy(shot, os.environ["KIT_KEEP_SCREENSHOT"])


def test_attention_patches_and_collapsed_models_are_shown(tmp_path):
    from cv_data import make_workdir
    from kit.training.cv import run_cv

    paths = make_workdir(tmp_path / "w", n_folds=3)
    run_cv(paths, None, train_settings({"epochs": 2, "batch_size": 32, "train_norm": [],
                                        "unfreeze_last": 0, "head": {"pool": "attention"}}),
           backbone="tiny_cnn", weights="random", seed=0)
    metrics_path = paths.backbone_dir("tiny_cnn") / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["collapsed_folds"] = [1]
    metrics_path.write_text(json.dumps(metrics))
    html_text = run_report(paths, tmp_path / "nodata",
                           load_config("report", {"attention_images": 3})).read_text()
    section = _section(html_text, "attention")
    assert section.count("<img") == 3 and "most concentrated attention first" in section
    # the strips are folded away, in a container that scrolls rather than widen the page
    strips = section.split("<details>")[1].split("</details>")[0]
    assert "<div class=strips>" in strips and strips.count("<img") == 3
    assert ".strips { max-width: 100%; overflow-x: auto; }" in html_text
    assert "collapsed</b> tiny_cnn: fold(s) 1 collapsed" in html_text


def _label_issues(paths: Paths, data: Path, name: str, rows: list[tuple], mode="drop"):
    """A hand-made runs/<name>/label_issues.csv (sample_index, label, suggested_label,
    quality, flagged, n_folds, flagged_by, p_*), deliberately out of order, and the summary
    cv records in metrics.json; a thumbnail file for every flagged image but img_0013.png."""
    df = pd.DataFrame(rows, columns=["sample_index", "label", "suggested_label", "quality",
                                     "flagged", "n_folds", "flagged_by"])
    for c in PROB:
        df[c] = 0.25
    atomic_write_csv(paths.backbone_dir(name) / "label_issues.csv", df)
    f = paths.backbone_dir(name) / "metrics.json"
    m = json.loads(f.read_text())
    m["label_issues"] = {"mode": mode, "model": "logreg", "inner_folds": 4,
                         "n_images": len(df), "n_flagged": int(df.flagged.sum()),
                         "file": str(paths.backbone_dir(name) / "label_issues.csv")}
    f.write_text(json.dumps(m))
    for r in df[df.flagged == 1].itertuples():
        if r.sample_index != "img_0013.png" and not (data / "train_data" / r.sample_index).exists():
            Image.fromarray(np.full((60, 90, 3), 120, np.uint8)).save(
                data / "train_data" / r.sample_index)


ISSUES = [  # sample_index, label, suggested, quality, flagged, n_folds, flagged_by
    ("img_0020.png", "Luminal A", "Luminal A", 0.91, 0, 2, ""),
    ("img_0013.png", "Luminal B", "HER2(+)", 0.05, 1, 2, "0;2"),
    ("img_0021.png", "Luminal B", "Luminal B", 0.80, 0, 2, ""),
    ("img_0010.png", "HER2(+)", "Triple negative", 0.02, 1, 2, "1"),
    ("img_0011.png", "Triple negative", "Luminal A", 0.12, 1, 2, "0;1"),
    ("img_0022.png", "HER2(+)", "HER2(+)", 0.70, 0, 1, ""),
]


def test_suspected_label_errors_section(tmp_path):
    paths, data = build_workdir(tmp_path)
    _label_issues(paths, data, "effnet_b0", ISSUES)
    text = run_report(paths, data, load_config("report", {"label_issues_top": 2})).read_text()
    assert "<a href='#label_issues'>Suspected label errors</a>" in text
    # after the scores: the cv section comes first
    assert text.index("<section id='cv'>") < text.index("<section id='label_issues'>")
    sec = _section(text, "label_issues")
    # how the flags were made, and what overrides.csv can and cannot do
    assert "training</b> images only" in sec and "still computed on every image" in sec
    assert "img_XXXX.png,drop" in sec and "folds/overrides.csv" in sec
    assert "cannot be corrected" in sec and "./run.sh folds --force" in sec
    # the summary line: mode, flagged of all, by how many folds
    assert ("<b>effnet_b0</b> (mode drop, model logreg, 4 inner folds): <b>3</b> of 6 "
            "training images flagged (by 1 fold: 1, by 2 folds: 2); each image assessed by up "
            "to 2 folds.") in sec
    # convnext_t has no label_issues.csv and metrics saying off: not listed
    assert "convnext_t" not in sec
    # thumbnails folded away, the top 2 flagged by quality (lowest first), captioned
    details = sec.split("<details>")[1].split("</details>")[0]
    assert "<summary>2 of 3 (report.label_issues_top) most confident suspects" in details
    cap_10 = ("img_0010.png · HER2(+) → Triple negative · quality 0.020 · "
              "flagged by fold(s) 1")
    cap_13 = ("img_0013.png · Luminal B → HER2(+) · quality 0.050 · "
              "flagged by fold(s) 0, 2")
    assert details.index(cap_10) < details.index(cap_13)
    assert "img_0011.png" not in details and "img_0020.png" not in details
    assert details.count("<figure class=suspect>") == 2
    assert details.count("data:image/jpeg;base64,") == 1  # img_0013.png has no file
    assert "image not found" in details
    assert "not run yet" not in text and "could not be built" not in text


def test_suspected_label_errors_missing_nothing_flagged_and_broken(tmp_path):
    paths, data = build_workdir(tmp_path)
    sec = _section(run_report(paths, data, load_config("report")).read_text(), "label_issues")
    assert "no run with label_issues" in sec
    assert "./run.sh cv &lt;backbone&gt; --set label_issues.mode=drop" in sec
    assert "<details>" not in sec
    # a run that flagged nothing: the summary line, no thumbnails
    clean = [r[:4] + (0,) + r[5:6] + ("",) for r in ISSUES]
    _label_issues(paths, data, "convnext_t", clean, mode="weight")
    sec = _section(run_report(paths, data, load_config("report")).read_text(), "label_issues")
    assert "(mode weight, model logreg, 4 inner folds): <b>0</b> of 6 training" in sec
    assert "<details>" not in sec and "no run with label_issues" not in sec
    # a broken file is named; the other run still shows; no dataset -> no thumbnails
    _label_issues(paths, data, "effnet_b0", ISSUES)
    atomic_write_csv(paths.backbone_dir("convnext_t") / "label_issues.csv",
                     pd.DataFrame({"sample_index": ["img_0001.png"], "quality": [0.5]}))
    text = run_report(paths, tmp_path / "nowhere", load_config("report")).read_text()
    sec = _section(text, "label_issues")
    assert "could not be read" in sec and "no column(s) label, suggested_label" in sec
    assert "<b>effnet_b0</b>" in sec and sec.count("image not found") == 3
    assert "not found: no thumbnails" in sec and "data:image/jpeg" not in sec
    # metrics.json says a mode but the file is gone
    (paths.backbone_dir("effnet_b0") / "label_issues.csv").unlink()
    sec = _section(run_report(paths, data, load_config("report")).read_text(), "label_issues")
    assert "records label_issues mode drop but" in sec


def test_fusion_is_compared_with_the_blend_of_its_parts(tmp_path):
    from kit.metrics import paired_bootstrap

    paths, data = build_workdir(tmp_path)
    text = run_report(paths, data, load_config("report")).read_text()
    assert "Fusion vs blend" not in text  # no fused run: no table
    folds = pd.read_csv(paths.folds_csv, dtype=str)
    y = folds.label.map(CLASSES.index).to_numpy()
    fused = "effnet_b0+convnext_t"
    _backbone(paths, fused, folds.sample_index.tolist(), y, folds.fold.astype(int).to_numpy(),
              np.random.default_rng(1), with_png=False)
    cv = _section(run_report(paths, data, load_config("report")).read_text(), "cv")
    table = cv.split("Fusion vs blend")[1].split("</table>")[0]
    assert f"<td>{fused}</td>" in table and "mean of the parts" in table  # blend: not these
    read = {n: pd.read_csv(paths.backbone_dir(n) / "oof.csv")[PROB].to_numpy()
            for n in ("effnet_b0", "convnext_t", fused)}
    pair = paired_bootstrap(y, (read["effnet_b0"] + read["convnext_t"]) / 2, read[fused])
    lo, hi = pair["ci95"]
    assert f"{pair['diff']:.3f} [{lo:.2f}, {hi:.2f}]" in table
    assert f"{macro_f1(y, read[fused]):.3f} [" in table
    assert table.endswith("<td>none</td></tr></tbody>")  # every input honest
    # A blend of exactly these parts on the same folds: its nested predictions instead.
    blend = json.loads((paths.runs_dir / "blend" / "blend.json").read_text())
    atomic_write_json(paths.runs_dir / "blend" / "blend.json", {**blend, "folds_sha256": "1" * 64})
    oof = pd.read_csv(paths.runs_dir / "blend" / "oof_blend.csv")
    oof["pred_nested"] = [CLASSES[i] for i in (y + 1) % 4]  # every image wrong: F1 0
    atomic_write_csv(paths.runs_dir / "blend" / "oof_blend.csv", oof)
    text = run_report(paths, data, load_config("report")).read_text()
    table = _section(text, "cv").split("Fusion vs blend")[1]
    assert "runs/blend/oof_blend.csv (nested" in table and "<td>0.000 [0.00, 0.00]</td>" in table
    # A part whose epochs were chosen on its OOF rows is named.
    f = paths.backbone_dir("convnext_t") / "metrics.json"
    atomic_write_json(f, {**json.loads(f.read_text()), **OOF_STOPPED})
    text = run_report(paths, data, load_config("report")).read_text()
    table = _section(text, "cv").split("Fusion vs blend")[1]
    assert "<td><b class=warn>convnext_t</b></td></tr>" in table.split("</table>")[0]
    # A part without its own run: a note, not a failure.
    shutil.rmtree(paths.backbone_dir("convnext_t"))
    cv = _section(run_report(paths, data, load_config("report")).read_text(), "cv")
    assert f"{fused}: no separate run of convnext_t to blend" in cv
