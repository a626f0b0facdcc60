"""The report's submissions section: the ledger newest first, the two ``choose`` picks, the plot
of public against nested expected scores (its bars from the shake-up record), the hint when no
public score is known yet, and a broken ledger that leaves the rest of the page standing."""
from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from fake_kaggle import write_fake_submission
from kit import CLASSES
from kit.config import load_config
from kit.metrics import format_ci
from kit.paths import Paths
from kit.submission import ledger, package
from kit.submission.report import run_report
from kit.submission.report.leaderboard import Z95, plot_points
from kit.submission.shakeup import private_estimate
from kit.task import default_task

SPREAD = {"sd_public_minus_private": 0.05, "sd_public": 0.04, "sd_private": 0.025,
          "public_fraction": 0.3, "n_test": 477, "metric": "macro_f1"}
OLD_SPREAD = {k: v for k, v in SPREAD.items() if k != "sd_public"}  # a record without it


def _submit(w: Path, stem: str, day: int, k: int, nested: float, runs, **kw) -> Path:
    """A packaged submission as ``tests/test_ledger.py`` makes them: CSVs that differ per
    ``k``, the nested score's interval ± 0.04."""
    return write_fake_submission(w, stem=stem, labels=[CLASSES[(i * (k + 1) + k) % 4]
                                                       for i in range(5)],
                                 created_utc=f"2025-01-{day:02d}T00:00:00+00:00",
                                 nested=nested, ci=(nested - 0.04, nested + 0.04), runs=runs,
                                 latest=False, **kw)


def _scored(csv: Path, ref: int, **scores) -> None:
    """An upload record with the leaderboard's scores, as ``submissions --refresh`` stores
    them in the manifest."""
    package.append_submission(csv.with_suffix(".json"), {
        "id": f"rec-{csv.stem}", "time": "2025-01-09T00:00:00+00:00",
        "competition": "an2dl2526c2v2", "message": csv.stem, "csv": csv.name, "ref": ref,
        "status": "complete", **scores})


def _three(w: Path) -> tuple[Path, Path, Path]:
    """a (oldest): public 0.56; b: not scored; c (newest): public and private."""
    a = _submit(w, "20250101-000000_a", 1, 0, 0.50, ["phikon"], shakeup=SPREAD)
    b = _submit(w, "20250102-000000_b", 2, 1, 0.45, ["uni"], shakeup=SPREAD)
    c = _submit(w, "20250103-000000_c", 3, 2, 0.40, ["phikon", "uni"], shakeup=OLD_SPREAD)
    _scored(a, 1001, public_score=0.56)
    _scored(c, 1003, public_score=0.47, private_score=0.61)
    ledger.write_ledger(Paths.from_root(w))
    return a, b, c


def _section(w: Path, tmp_path: Path) -> tuple[str, str]:
    text = run_report(Paths.from_root(w), tmp_path / "no-data",
                      load_config("report")).read_text()
    return text, text.split("<section id='submissions'>")[1].split("</section>")[0]


def _rows(table_html: str) -> list[list[str]]:
    return [re.findall(r"<td>(.*?)</td>", r) for r in table_html.split("<tr>")[2:]]


def test_ledger_picks_and_plot(tmp_path):
    w = tmp_path / "w"
    a, b, c = _three(w)
    text, sec = _section(w, tmp_path)
    assert "could not be built" not in text and "--refresh" not in sec
    table = sec.split("<h3>Ledger</h3>")[1].split("</table>")[0]
    rows = _rows(table)
    assert [r[1] for r in rows] == [c.name, b.name, a.name]  # newest first
    assert rows[0][:2] == ["2025-01-03 00:00", c.name] and rows[0][2] == "phikon+uni"
    # c: its scores, no estimate shown (the private score is known)
    assert rows[0][3:] == ["0.400 [0.36, 0.44]", "0.4700", "–", "0.6100"]
    # b: nested only, nothing from the leaderboard
    assert rows[1][3:] == ["0.450 [0.41, 0.49]", "–", "–", "–"]
    # a: the public score moves the estimate, by the ledger's own precision weighting
    est = private_estimate(0.50, 0.08 / ledger.SE_PER_CI95, 0.56, SPREAD)
    assert rows[2][3:] == ["0.500 [0.46, 0.54]", "0.5600", format_ci(est["estimate"],
                                                                      est["ci"]), "–"]
    # choose: c first (its private score is the highest estimate), a second; with reasons
    picks = _rows(sec.split("To select for the private leaderboard")[1].split("</table>")[0])
    assert [(r[0], r[1]) for r in picks] == [("1", c.name), ("2", a.name)]
    assert picks[0][4] == "the highest estimated private score"
    assert picks[1][4].startswith("the best of the rest by estimated private score")
    assert picks[0][3] == "private score 0.6100"
    # the plot: one inlined PNG, a real image
    imgs = re.findall(r"<img [^>]*src='data:image/png;base64,([^']+)'", sec)
    assert len(imgs) == 1
    png = Image.open(io.BytesIO(base64.b64decode(imgs[0])))
    assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 300
    assert "diamond its private score" in sec
    # the files and uploads tables are still there
    assert "<h3>Submission files</h3>" in sec and "<td>1003</td>" in sec


def test_plot_points_and_the_public_scores_spread(tmp_path):
    w = tmp_path / "w"
    a, _, c = _three(w)
    paths, task = Paths.from_root(w), default_task()
    manifests = ledger.load_manifests(paths, task)
    df = ledger.build_ledger(paths, task, manifests)
    points = {p["name"]: p for p in plot_points(df, {str(p): m for p, m in manifests}, task)}
    assert sorted(points) == [a.stem, c.stem]  # b has no public score
    pa, pc = points[a.stem], points[c.stem]
    assert (pa["x"], pa["y"], pa["private"]) == (0.50, 0.56, None)
    assert [pa["x_lo"], pa["x_hi"]] == pytest.approx([0.46, 0.54])
    # the public part's own spread, not that of public - private
    assert pa["y_sd"] == SPREAD["sd_public"]
    # a record without sd_public: derived from the gap's spread, sqrt(1 - f) of it
    assert pc["y_sd"] == pytest.approx(0.05 * math.sqrt(0.7))
    assert pc["private"] == 0.61
    assert Z95 * pa["y_sd"] == pytest.approx(0.0784, abs=1e-4)


def test_no_public_score_names_the_refresh(tmp_path):
    w = tmp_path / "w"
    a = _submit(w, "20250101-000000_a", 1, 0, 0.50, ["phikon"], shakeup=SPREAD)
    package.append_submission(a.with_suffix(".json"), {
        "id": "r", "time": "2025-01-09T00:00:00+00:00", "competition": "an2dl2526c2v2",
        "message": "m", "csv": a.name, "ref": 7, "status": "pending"})
    _submit(w, "20250102-000000_b", 2, 1, 0.45, ["uni"])
    text, sec = _section(w, tmp_path)
    assert "could not be built" not in text
    assert "no submission has a public score yet: <code>./run.sh submissions --refresh</code>" \
        in sec
    assert "<img" not in sec
    rows = _rows(sec.split("<h3>Ledger</h3>")[1].split("</table>")[0])
    assert [r[1] for r in rows] == ["20250102-000000_b.csv", "20250101-000000_a.csv"]
    assert all(r[4:] == ["–", "–", "–"] for r in rows)
    assert "To select for the private leaderboard" in sec and "the highest estimated" in sec


def test_a_broken_ledger_keeps_the_section_and_the_page(tmp_path):
    w = tmp_path / "w"
    ids = [f"img_{i:04d}.png" for i in range(40)]
    y = [CLASSES[i % 4] for i in range(40)]
    csv = _submit(w, "20250101-000000_a", 1, 0, 0.50, ["phikon"], oof=(ids, y, y))
    _scored(csv, 1001, public_score=0.56)
    # no shake-up record: the ledger reads the nested OOF file, here damaged
    oof = csv.with_name(csv.stem + ".oof.csv")
    oof.write_text("sample_index,label\nimg_0000.png,nowhere\n")
    text, sec = _section(w, tmp_path)
    assert "<p class=err>could not be built" not in text  # the section itself stands
    assert "<p class=err>the ledger could not be built:" in sec and oof.name in sec
    assert "<h3>Submission files</h3>" in sec and "<td>0.5600</td>" in sec  # its upload
    assert "<section id='cv'>" in text and "<img" not in sec
