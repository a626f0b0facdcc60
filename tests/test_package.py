"""Submission CSV validation/writing and the manifest (fields, git info, atomic updates)."""
from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

from blend_data import make_blend_workdir
from kit import CLASSES
from kit.artifacts import MANIFEST_FIELDS, missing_manifest_fields
from kit.config import load_config
from kit.submission.blend_output import run_blend
from kit.submission.package import (
    append_submission,
    command_line,
    expected_test_ids,
    git_info,
    load_manifest,
    test_files_sha256,
    update_manifest,
    validate_submission,
    write_submission,
)
from kit.utils import KitError, sha256_file

IDS = [f"img_{i:04d}.png" for i in range(6)]
LABELS = ["Luminal A", "Luminal B", "HER2(+)", "Triple negative", "Luminal B", "HER2(+)"]


def frame(ids=IDS, labels=LABELS, columns=("sample_index", "label")):
    return pd.DataFrame(dict(zip(columns, (list(ids), list(labels)))))


def write_text(path, text):
    path.write_text(text)
    return path


def test_valid_frame_and_file_pass(tmp_path):
    assert validate_submission(frame(), IDS, CLASSES) == []
    text = "sample_index,label\n" + "".join(f"{i},{lab}\n" for i, lab in zip(IDS, LABELS))
    assert validate_submission(write_text(tmp_path / "s.csv", text), IDS, CLASSES) == []


def test_test_ids_from_folder_or_dataset_root(tmp_path):
    (tmp_path / "test_data").mkdir()
    for name in IDS[::-1]:
        (tmp_path / "test_data" / name).write_bytes(b"")
        (tmp_path / "test_data" / name.replace("img", "mask")).write_bytes(b"")
    assert expected_test_ids(tmp_path) == IDS
    assert expected_test_ids(tmp_path / "test_data") == IDS
    assert validate_submission(frame(), tmp_path / "test_data", CLASSES) == []
    with pytest.raises(KitError, match="test image folder not found"):
        expected_test_ids(tmp_path / "nope")


def test_wrong_header(tmp_path):
    problems = validate_submission(frame(columns=("id", "label")), IDS, CLASSES)
    assert problems == ["header is 'id,label', expected exactly 'sample_index,label'"]
    body = "".join(f"{i},{lab}\n" for i, lab in zip(IDS, LABELS))
    for header in ("sample_index, label", "\ufeffsample_index,label", "sample_index,label,x"):
        problems = validate_submission(write_text(tmp_path / "s.csv", header + "\n" + body),
                                       IDS, CLASSES)
        assert problems[0].startswith("header is"), header


def test_missing_row_named():
    problems = validate_submission(frame(IDS[:4] + IDS[5:], LABELS[:4] + LABELS[5:]), IDS,
                                   CLASSES)
    assert problems == ["missing row for img_0004.png (in test_data/ but not in the CSV)"]


def test_extra_row_named():
    problems = validate_submission(frame(IDS + ["img_0099.png"], LABELS + ["HER2(+)"]), IDS,
                                   CLASSES)
    assert problems == ["line 8: extra row img_0099.png: no such image in test_data/"]


def test_duplicate_row_named():
    ids = IDS[:3] + ["img_0002.png"] + IDS[3:]
    problems = validate_submission(frame(ids, LABELS[:3] + ["HER2(+)"] + LABELS[3:]), IDS,
                                   CLASSES)
    assert problems == ["duplicate img_0002.png on lines 4, 5; keep one row per test image"]


def test_unknown_label_named():
    labels = list(LABELS)
    labels[3] = "Triple Negative"  # capital N: not the string in train_labels.csv
    problems = validate_submission(frame(labels=labels), IDS, CLASSES)
    assert len(problems) == 1
    assert problems[0].startswith("line 5: unknown label 'Triple Negative' for img_0003.png")


def test_empty_values(tmp_path):
    labels = list(LABELS)
    labels[1] = None
    assert validate_submission(frame(labels=labels), IDS, CLASSES) == [
        "line 3: empty label (sample_index img_0001.png)"]
    text = "sample_index,label\n" + "".join(f"{i},{lab}\n" for i, lab in zip(IDS, LABELS))
    text = text.replace("img_0002.png,HER2(+)", ",HER2(+)")
    problems = validate_submission(write_text(tmp_path / "s.csv", text), IDS, CLASSES)
    assert "line 4: empty sample_index" in problems
    assert "missing row for img_0002.png (in test_data/ but not in the CSV)" in problems


def test_wrong_field_count(tmp_path):
    text = "sample_index,label\nimg_0000.png\n"
    problems = validate_submission(write_text(tmp_path / "s.csv", text), ["img_0000.png"], CLASSES)
    assert problems[0] == "line 2: 1 fields, expected 2 (sample_index,label)"


def test_row_order():
    ids, labels = list(IDS), list(LABELS)
    ids[2], ids[3] = ids[3], ids[2]
    problems = validate_submission(frame(ids, labels), IDS, CLASSES)
    assert problems == ["rows not sorted by sample_index: line 5 (img_0002.png) comes after "
                        "line 4 (img_0003.png); sort the rows"]


def test_long_lists_are_capped():
    ids = [f"img_{i:04d}.png" for i in range(100)]
    problems = validate_submission(frame(ids[:10], ["HER2(+)"] * 10), ids, CLASSES)
    assert len(problems) == 21 and problems[-1] == "... and 70 more missing problems"


def test_write_submission_writes_exact_bytes(tmp_path):
    path = tmp_path / "sub" / "s.csv"
    digest = write_submission(frame(), path, IDS, CLASSES)
    expected = "sample_index,label\n" + "".join(f"{i},{lab}\n" for i, lab in zip(IDS, LABELS))
    assert path.read_text() == expected
    assert digest == sha256_file(path)


@pytest.mark.parametrize("bad", ["missing", "extra", "label", "order", "header"])
def test_failed_check_writes_nothing(tmp_path, bad):
    df = {"missing": frame(IDS[1:], LABELS[1:]),
          "extra": frame(IDS + ["img_0100.png"], LABELS + ["HER2(+)"]),
          "label": frame(labels=["Luminal C"] + LABELS[1:]),
          "order": frame(IDS[::-1], LABELS[::-1]),
          "header": frame(columns=("sample_index", "Label"))}[bad]
    path = tmp_path / "s.csv"
    with pytest.raises(KitError, match="submission not written") as exc:
        write_submission(df, path, IDS, CLASSES)
    assert exc.value.problems
    assert list(tmp_path.iterdir()) == []
    path.write_text("old\n")  # an existing file is left as it was
    with pytest.raises(KitError, match="submission not written"):
        write_submission(df, path, IDS, CLASSES)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["s.csv"]


def test_git_info_here_and_outside_a_repo(tmp_path):
    here = git_info()
    assert len(here["commit"]) == 40 and isinstance(here["dirty"], bool)
    outside = git_info(tmp_path)
    assert outside["commit"] is None and outside["dirty"] is None
    assert outside["note"].startswith("not a git repository")


def test_git_info_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    assert git_info(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("b")
    assert git_info(tmp_path)["dirty"] is True


def test_command_line_shows_run_sh():
    assert command_line(["/x/kit/__main__.py", "blend", "--name", "a b"]) == \
        "./run.sh blend --name 'a b'"


@pytest.fixture
def blended(tmp_path):
    paths, data = make_blend_workdir(tmp_path)
    result = run_blend(paths, data, load_config("blend"), name="man", weight_views=True, seed=11,
                       command="./run.sh blend --weight-views")
    return paths, data, result


def test_manifest_is_complete(blended):
    paths, data, res = blended
    m = json.loads(res.manifest_path.read_text())
    assert missing_manifest_fields(m) == []
    assert set(MANIFEST_FIELDS) <= set(m)
    assert m["kit"]["version"] and "commit" in m["kit"]["git"] and "dirty" in m["kit"]["git"]
    assert m["command"] == "./run.sh blend --weight-views"
    assert m["csv_sha256"] == sha256_file(res.csv_path) and m["csv_rows"] == 40
    assert m["files"] == {"csv": res.csv_path.name, "manifest": res.manifest_path.name}
    assert m["data"]["train_labels_sha256"] == sha256_file(data / "train_labels.csv")
    assert m["data"]["test_files_sha256"] == test_files_sha256(expected_test_ids(data))
    assert m["folds_sha256"] == sha256_file(paths.folds_csv)
    assert m["outliers_sha256"] == sha256_file(paths.outliers_csv)
    for bb in ("bb_a", "bb_b", "bb_c"):
        b = m["backbones"][bb]
        assert b["config"]["backbone"] == bb and b["weights_source"] == f"random ({bb})"
        assert 0 < b["oof_macro_f1"] < 1
        for view in ("hflip", "orig"):
            for split in ("oof", "test"):
                rel = f"runs/{bb}/tta/{split}_{view}.csv"
                assert m["inputs"][rel] == sha256_file(paths.root / rel)
        assert m["inputs"][f"runs/{bb}/metrics.json"]
        # How its epochs and params were chosen: not recorded by this (older-style) input.
        assert b["honest"] is False and "not recorded" in b["why"][0]
        assert b["selection"] is None and b["params_source"] is None
    assert m["expected_score"]["label"] == "optimistic"
    assert m["expected_score"]["macro_f1"] == m["scores"]["nested"]["macro_f1"]
    blend = m["blend"]
    assert blend["backbones"] == ["bb_a", "bb_b", "bb_c"] and blend["weight_views"] is True
    assert blend["objective"] == "f1" and blend["seed"] == 11 and blend["params"]["iterations"]
    assert len(blend["weights"]) == 6 and sum(blend["weights"].values()) == pytest.approx(1)
    assert set(blend["biases"]) == set(CLASSES) and blend["biases"]["Luminal A"] == 0
    for where in ("nested", "in_sample"):
        assert 0 < m["scores"][where]["macro_f1"] <= 1
        assert set(m["scores"][where]["per_class_f1"]) == set(CLASSES)
    assert m["scores"]["baselines"]["equal_weights"]["macro_f1"] > 0
    assert m["seeds"] == {"blend": 11}
    assert "numpy" in m["versions"] and m["submissions"] == []
    assert m["workdir"] == str(paths.root)


def test_load_manifest_refuses_bad_files(tmp_path):
    with pytest.raises(KitError, match="x.json: not found; pass submissions/<name>.json"):
        load_manifest(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(KitError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "part.json").write_text('{"name": "x"}')
    with pytest.raises(KitError, match="lacks .*csv_sha256"):
        load_manifest(tmp_path / "part.json")


def test_update_and_append_keep_latest_in_step(blended):
    paths, _, res = blended
    latest = paths.submissions_dir / "latest.json"
    append_submission(latest, {"ref": 1, "status": "pending"})  # via the copy...
    update_manifest(res.manifest_path, competition="an2dl2526c2v2")  # ...or the original
    append_submission(res.manifest_path, {"ref": 2, "status": "complete", "public_score": 0.4})
    original = json.loads(res.manifest_path.read_text())
    assert [s["ref"] for s in original["submissions"]] == [1, 2]
    assert original["competition"] == "an2dl2526c2v2"
    assert json.loads(latest.read_text()) == original
    assert not [p for p in paths.submissions_dir.iterdir() if p.name.endswith(".tmp")]
