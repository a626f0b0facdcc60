"""``./run.sh submissions [--refresh]``: the ledger built from the manifests, its estimate of
each private score, and the refresh against the fake Kaggle server of the submit tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from fake_kaggle import FakeKaggle, write_fake_submission
from kit import CLASSES
from kit.cli import main
from kit.paths import Paths
from kit.submission import ledger, package
from kit.submission.refresh import competitions, match
from kit.submission.shakeup import private_estimate
from kit.task import default_task
from kit.utils import KitError

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("fake_kaggle.py")
USER, KEY = "kit-user", "kit-dummy-key-5f3a9c"
SPREAD = {"sd_public_minus_private": 0.05, "sd_public": 0.04, "sd_private": 0.025,
          "public_fraction": 0.3, "n_test": 477, "metric": "macro_f1"}


def _labels(k: int, n: int = 5) -> list[str]:
    """Predicted labels that differ per submission (so do the CSVs' sha256 and sizes)."""
    return [CLASSES[(i * (k + 1) + k) % 4] for i in range(n)]


def _submit(workdir: Path, stem: str, day: int, k: int, **kw) -> Path:
    kw.setdefault("ci", (kw.get("nested", 0.41) - 0.04, kw.get("nested", 0.41) + 0.04))
    kw.setdefault("latest", False)
    return write_fake_submission(workdir, stem=stem, labels=_labels(k),
                                 created_utc=f"2025-01-{day:02d}T00:00:00+00:00", **kw)


def _record(csv: Path, **fields) -> None:
    rec = {"id": f"rec-{csv.stem}", "time": "2025-01-01T00:10:00+00:00",
           "competition": "an2dl2526c2v2", "message": csv.stem, "csv": csv.name,
           "status": "submitted", **fields}
    package.append_submission(csv.with_suffix(".json"), rec)


# ----------------------------------------------------------------------------- the ledger

def test_ledger_rows_sorted_by_estimated_private_score(tmp_path, capsys):
    w = tmp_path / "w"
    a = _submit(w, "20250101-000000_a", 1, 0, nested=0.50, runs={"phikon": "a" * 64},
                shakeup=SPREAD)
    b = _submit(w, "20250102-000000_b", 2, 1, nested=0.45, runs=["uni"])
    c = _submit(w, "20250103-000000_c", 3, 2, nested=0.40, runs=["phikon", "uni"])
    _record(a, ref=1001, status="complete", public_score=0.56)
    _record(c, ref=1003, status="complete", public_score=0.47, private_score=0.61)
    _record(b, status="failed", error="HTTP 401")
    (w / "submissions" / "latest.json").write_text(a.with_suffix(".json").read_text())
    (w / "submissions" / "broken.json").write_text("{not json")
    path, df = ledger.write_ledger(Paths.from_root(w))
    assert "skipped" in capsys.readouterr().out  # broken.json, named, and the rest still read
    assert path == w / "submissions" / "ledger.csv"
    read = pd.read_csv(path)
    assert tuple(read.columns) == ledger.COLUMNS
    # c: its private score; a: nested and public weighed; b: nested alone
    assert list(read.file) == [c.name, a.name, b.name]
    assert list(read.estimate_basis) == ["private", "nested+public", "nested"]
    se = 0.08 / ledger.SE_PER_CI95
    est = private_estimate(0.50, se, 0.56, SPREAD)
    row = read.iloc[1]
    assert row.estimate == pytest.approx(est["estimate"], abs=1e-5)
    assert [row.estimate_lo, row.estimate_hi] == pytest.approx(est["ci"], abs=1e-5)
    assert row.expected == 0.5 and [row.expected_lo, row.expected_hi] == [0.46, 0.54]
    assert row.ref == 1001 and row.status == "complete" and row.metric == "macro_f1"
    assert row.runs == "phikon" and row.run_hashes.startswith("phikon:")
    assert row.sha256 == package.load_manifest(a.with_suffix(".json"))["csv_sha256"]
    assert read.iloc[0].private_score == 0.61 and read.iloc[0].runs == "phikon+uni"
    assert read.iloc[2].status == "failed" and pd.isna(read.iloc[2].ref)
    # rebuilt from the manifests alone, byte for byte
    before = path.read_bytes()
    path.unlink()
    ledger.write_ledger(Paths.from_root(w))
    assert path.read_bytes() == before
    table = ledger.format_table(df).splitlines()
    assert table[1].split()[:2] == ["1", c.stem] and "not submitted" not in table[3]
    assert "failed" in table[3]


def test_a_manifest_of_other_classes_is_skipped(tmp_path, capsys):
    w = tmp_path / "w"
    _submit(w, "20250101-000000_a", 1, 0)
    other = default_task().model_copy(update={"classes": ("x", "y")})
    assert ledger.load_manifests(Paths.from_root(w), other) == []
    assert "not the task's; pass --task" in capsys.readouterr().out
    assert len(ledger.load_manifests(Paths.from_root(w))) == 1


def test_public_score_moves_the_estimate_by_its_precision():
    ci = [0.46, 0.54]
    se = (ci[1] - ci[0]) / ledger.SE_PER_CI95
    loose = ledger.estimate(0.50, ci, 0.60, None, {**SPREAD, "sd_public": 0.08})
    tight = ledger.estimate(0.50, ci, 0.60, None, {**SPREAD, "sd_public": 0.02})
    for got, sd in ((loose, 0.08), (tight, 0.02)):
        w = se ** 2 / (se ** 2 + sd ** 2)
        assert got["estimate"] == pytest.approx(0.50 + w * 0.10)
    assert tight["estimate"] > 0.55 > loose["estimate"] > 0.50
    # a standard error stored with the shake-up wins over the interval's width
    stored = ledger.estimate(0.50, ci, 0.60, None, {**SPREAD, "expected_se": 0.001})
    assert stored["estimate"] < 0.501
    assert ledger.estimate(0.50, ci, None, None, None) == {"estimate": 0.50, "lo": 0.46,
                                                           "hi": 0.54, "basis": "nested"}


def test_spread_computed_from_the_nested_oof_file_without_a_record(tmp_path):
    w = tmp_path / "w"
    ids = [f"img_{i:04d}.png" for i in range(60)]
    y = [CLASSES[i % 4] for i in range(60)]
    pred = [CLASSES[(i // 3) % 4] for i in range(60)]
    csv = _submit(w, "20250101-000000_a", 1, 0, oof=(ids, y, pred))
    _record(csv, ref=1, public_score=0.5)
    path, manifest = ledger.load_manifests(Paths.from_root(w))[0]
    spread = ledger.spread_of(path, manifest, default_task())
    assert spread["n_test"] == 5 and spread["n_rows"] == 60 and spread["sd_public"] > 0
    row = ledger.build_ledger(Paths.from_root(w)).iloc[0]
    assert row.estimate_basis == "nested+public" and row.oof == "20250101-000000_a.oof.csv"


def test_submissions_command_prints_the_table(tmp_path, capsys):
    w = tmp_path / "w"
    assert main(["submissions", "--workdir", str(w)]) == 0
    assert "no submissions in" in capsys.readouterr().out
    _submit(w, "20250101-000000_a", 1, 0, nested=0.30)
    _submit(w, "20250102-000000_b", 2, 1, nested=0.55)
    assert main(["submissions", "--workdir", str(w)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[1] == "20250102-000000_b" and out[2].split()[1] == "20250101-000000_a"
    assert out[-1] == f"ledger -> {w.resolve() / 'submissions' / 'ledger.csv'}"


# ----------------------------------------------------------------------------- matching

def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _listed(ref, file_name="x.csv", date="2025-01-05T00:00:00", description="", size=None):
    return {"ref": ref, "description": description, "file_name": file_name,
            "date": _utc(date), "status": "complete", "public_score": 0.5,
            "private_score": None, "error": None, "total_bytes": size}


def test_match_by_ref_message_and_file_name(tmp_path):
    w = tmp_path / "w"
    a = _submit(w, "20250101-000000_a", 1, 0)
    b = _submit(w, "20250102-000000_b", 2, 1)
    _record(a, ref=7)
    _record(b, message="by hand", time="2025-01-02T00:10:00+00:00")
    _record(b, id="failed-one", message="lost", time="2025-01-02T00:10:00+00:00",
            status="failed")
    manifests = ledger.load_manifests(Paths.from_root(w))
    pa, pb = (p for p, _ in manifests)
    size_b = b.stat().st_size
    listed = [
        _listed(7, "latest.csv"),
        _listed(8, description="by hand", date="2025-01-02T00:12:00"),
        _listed(9, description="by hand", date="2025-01-03T00:12:00"),  # outside the window
        _listed(10, description="lost", date="2025-01-02T00:11:00"),  # failed: never uploaded
        _listed(11, b.name, "2025-01-02T05:00:00", size=size_b),
        _listed(12, b.name, "2025-01-01T05:00:00"),  # before b was made
        _listed(13, b.name, "2025-01-02T06:00:00", size=size_b + 1),  # another file's size
        _listed(14, "latest.csv", "2025-01-01T12:00:00", size=a.stat().st_size),
    ]
    matches, unmatched = match(listed, manifests, "an2dl2526c2v2")
    got = {sub["ref"]: (path, rid, how) for path, items in matches.items()
           for rid, sub, how in items}
    assert got == {7: (pa, "rec-20250101-000000_a", "ref"),
                   8: (pb, "rec-20250102-000000_b", "message and time"),
                   11: (pb, None, "file name and date"),
                   14: (pa, None, "file name and date")}
    assert sorted(s["ref"] for s in unmatched) == [9, 10, 12, 13]


def test_competitions_to_list(tmp_path):
    w = tmp_path / "w"
    a = _submit(w, "20250101-000000_a", 1, 0)
    manifests = ledger.load_manifests(Paths.from_root(w))
    assert competitions("given", manifests, default_task()) == ["given"]
    assert competitions(None, manifests, default_task()) == ["an2dl2526c2v2"]  # the task's
    _record(a, competition="other-comp")
    manifests = ledger.load_manifests(Paths.from_root(w))
    assert competitions(None, manifests, default_task()) == ["other-comp"]
    with pytest.raises(KitError, match="pass -c SLUG"):
        competitions(None, [], default_task().model_copy(update={"kaggle": None}))


# ----------------------------------------------------------------------------- --refresh

def _run(server: FakeKaggle, workdir: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1",
               HOME=str(workdir.parent / "home"), KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    cmd = [sys.executable, str(LAUNCHER), server.url, "submissions", *args,
           "--workdir", str(workdir), "--data", str(workdir / "data")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          cwd=workdir)


def _kaggle(ref, file_name, date, public, private=None, description="", size=None):
    item = {"ref": ref, "description": description, "fileName": file_name,
            "date": date + ".000Z", "publicScore": public}
    if private is not None:
        item["privateScore"] = private
    if size is not None:
        item["totalBytes"] = size
    return item


def test_refresh_lists_every_page_and_stores_scores(tmp_path):
    w = tmp_path / "w"
    (tmp_path / "home").mkdir()
    a = _submit(w, "20250101-000000_a", 1, 0, nested=0.40)
    b = _submit(w, "20250102-000000_b", 2, 1, nested=0.42)
    c = _submit(w, "20250103-000000_c", 3, 2, nested=0.44)
    d = _submit(w, "20250104-000000_d", 4, 3, nested=0.46, latest=True)
    _record(a, ref=1001)
    _record(c, message="c by hand", time="2025-01-03T00:10:00+00:00")
    listed = [  # newest first, as Kaggle lists them; the competition has ended
        _kaggle(1005, "elsewhere.csv", "2025-01-05T00:00:00", "0.3", "0.31"),
        _kaggle(1004, "latest.csv", "2025-01-04T02:00:00", "0.47", "0.45",
                size=d.stat().st_size),
        _kaggle(1003, "submission.csv", "2025-01-03T00:11:00", "0.46", "0.44",
                description="c by hand"),
        _kaggle(1002, b.name, "2025-01-02T01:00:00", "0.43", "0.48", size=b.stat().st_size),
        _kaggle(1001, "latest.csv", "2025-01-01T00:11:00", "0.41", "0.39"),
    ]
    with FakeKaggle(username=USER, key=KEY, listed=listed, page_size=2) as server:
        proc = _run(server, w, "--refresh")
        again = _run(server, w, "--refresh", "-c", "an2dl2526c2v2")
    assert proc.returncode == 0, proc.stderr
    pages = [c["json"].get("pageToken", "") for c in server.calls("ListSubmissions")]
    assert pages == ["", "2", "4"] * 2  # three pages of two, both times
    out = proc.stdout
    assert "5 submissions listed, 4 matched to manifests" in out
    assert "1005 (elsewhere.csv)" in out
    for csv, ref, how, public, private in (
            (a, 1001, "ref", 0.41, 0.39), (b, 1002, "file name and date", 0.43, 0.48),
            (c, 1003, "message and time", 0.46, 0.44), (d, 1004, "file name and date", 0.47,
                                                           0.45)):
        rec, = package.load_manifest(csv.with_suffix(".json"))["submissions"]
        assert (rec["ref"], rec["matched_by"], rec["status"]) == (ref, how, "complete")
        assert (rec["public_score"], rec["private_score"]) == (public, private)
        assert rec["competition"] == "an2dl2526c2v2"
    latest = json.loads((w / "submissions" / "latest.json").read_text())
    assert latest["submissions"][0]["ref"] == 1004  # latest.json kept in step with d
    table = pd.read_csv(w / "submissions" / "ledger.csv")
    assert list(table.file) == [b.name, d.name, c.name, a.name]  # by private score
    assert set(table.estimate_basis) == {"private"}
    assert f"1  {b.stem}" in " ".join(out.split("\n"))
    # a second refresh finds every one by its ref and adds nothing
    assert again.returncode == 0, again.stderr
    assert "4 matched to manifests (4 by ref)" in again.stdout
    assert all(len(package.load_manifest(x.with_suffix(".json"))["submissions"]) == 1
               for x in (a, b, c, d))
    assert KEY not in proc.stdout + proc.stderr + again.stdout


def test_refresh_without_credentials_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in [v for v in os.environ if v.startswith("KAGGLE_")]:
        monkeypatch.delenv(var)
    _submit(tmp_path / "w", "20250101-000000_a", 1, 0)
    assert main(["submissions", "--refresh", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Kaggle credentials found" in err[0]


def test_a_blend_writes_its_shakeup_nested_oof_and_ledger_row(tmp_path):
    # The blend stage itself (not a hand-made manifest): one ledger row per packaged submission.
    from blend_data import make_blend_workdir
    from kit.config import load_config
    from kit.submission.blend_output import run_blend
    from kit.submission.shakeup import nested_oof_path

    paths, data = make_blend_workdir(tmp_path)
    first = run_blend(paths, data, load_config("blend"), name="one", seed=3)
    manifest = json.loads(first.manifest_path.read_text())
    shake = manifest["shakeup"]
    assert shake["n_test"] == 40 and shake["sd_public_minus_private"] > 0
    assert nested_oof_path(first.csv_path).is_file()
    run_blend(paths, data, load_config("blend"), name="two", seed=3)
    ledger = pd.read_csv(paths.submissions_dir / "ledger.csv")
    assert len(ledger) == 2 and first.csv_path.name in set(ledger.file)
    assert set(ledger.metric) == {"macro_f1"}
