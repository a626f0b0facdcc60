"""The readers of the files the stages exchange (kit/artifacts.py): a well-formed file reads
back as written, a malformed one of each kind gives one line naming the file and the fix."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kit import CLASSES, PROB_COLUMNS
from kit.artifacts import (
    MANIFEST_FIELDS,
    prob_columns,
    read_folds,
    read_manifest,
    read_metrics,
    read_oof,
    read_test,
)
from kit.utils import KitError, sha256_file

IDS = [f"img_{i:04d}.png" for i in range(8)]


def _probs(n=8):
    p = np.random.default_rng(0).random((n, len(CLASSES))) + 0.01
    return p / p.sum(axis=1, keepdims=True)


def _oof(folder, **change):
    folder.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"sample_index": IDS, "fold": [i % 2 for i in range(len(IDS))],
                       "label": [CLASSES[i % 4] for i in range(len(IDS))]})
    df[PROB_COLUMNS] = _probs()
    for key, value in change.items():
        df[key] = value
    df.to_csv(folder / "oof.csv", index=False)
    return folder / "oof.csv"


def _test(folder):
    folder.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"sample_index": IDS})
    df[PROB_COLUMNS] = _probs()
    df.to_csv(folder / "test.csv", index=False)
    return folder / "test.csv"


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and not exc.value.problems
    return text


def test_oof_and_test_read_back_as_written(tmp_path):
    oof = read_oof(_oof(tmp_path / "runs" / "bb"))
    assert list(oof.index) == IDS and list(oof.columns) == ["fold", "label", *PROB_COLUMNS]
    assert oof.fold.dtype == np.int64 and oof[PROB_COLUMNS].to_numpy().dtype == np.float64
    test = read_test(_test(tmp_path / "runs" / "bb"))
    assert list(test.index) == IDS and list(test.columns) == PROB_COLUMNS
    np.testing.assert_allclose(test.to_numpy(), _probs(), rtol=1e-12)


@pytest.mark.parametrize("change, match", [
    ({"label": "Luminal C"}, r"oof.csv: unknown label 'Luminal C'.*; rerun ./run.sh cv bb$"),
    ({"fold": "x"}, r"oof.csv: fold values are not all non-negative integers; rerun"),
    ({"sample_index": "img_0000.png"}, r"oof.csv: 7 duplicate sample_index values"),
    ({"p_Luminal A": ""}, r"oof.csv: column p_Luminal A holds empty cells or text"),
    ({"p_HER2(+)": -1.0}, r"oof.csv: 8 rows with missing, infinite, negative or all-zero"),
])
def test_malformed_oof_gives_one_line(tmp_path, change, match):
    path = _oof(tmp_path / "runs" / "bb", **change)
    with pytest.raises(KitError, match=match) as exc:
        read_oof(path)
    assert _one_line(exc).startswith(str(path))


def test_missing_columns_empty_files_and_fold_files(tmp_path):
    path = _oof(tmp_path / "runs" / "bb")
    pd.read_csv(path).drop(columns=["fold"]).to_csv(path, index=False)
    with pytest.raises(KitError, match=r"oof.csv: missing column\(s\) fold \(expected header "
                       r"sample_index,fold,label,p_Luminal A"):
        read_oof(path)
    path.write_text("")
    with pytest.raises(KitError, match="oof.csv: cannot be read as CSV"):
        read_oof(path)
    with pytest.raises(KitError, match="runs/other/oof.csv: not found; rerun ./run.sh cv other"):
        read_oof(tmp_path / "runs" / "other" / "oof.csv")
    view = tmp_path / "runs" / "bb" / "fold_2" / "tta" / "test_id.csv"
    view.parent.mkdir(parents=True)
    pd.DataFrame(columns=["sample_index", *PROB_COLUMNS]).to_csv(view, index=False)
    with pytest.raises(KitError, match=r"test_id.csv: no rows; rerun ./run.sh cv bb$") as exc:
        read_test(view)  # the run a fold's file belongs to, not "tta"
    _one_line(exc)


def test_the_classes_are_an_argument(tmp_path):
    classes = ("a", "b")
    folder = tmp_path / "runs" / "bb"
    folder.mkdir(parents=True)
    df = pd.DataFrame({"sample_index": IDS[:2], "fold": [0, 1], "label": ["a", "b"],
                       "p_a": [0.9, 0.2], "p_b": [0.1, 0.8]})
    df.to_csv(folder / "oof.csv", index=False)
    assert list(read_oof(folder / "oof.csv", classes=classes).columns) == \
        ["fold", "label", *prob_columns(classes)]
    with pytest.raises(KitError, match=r"missing column\(s\) p_Luminal A"):
        read_oof(folder / "oof.csv")
    (folder / "metrics.json").write_text(json.dumps({"classes": list(classes)}))
    assert read_metrics(folder / "metrics.json", classes=classes)["classes"] == ["a", "b"]
    with pytest.raises(KitError, match=r"metrics.json: made for classes a, b, not Luminal A"):
        read_metrics(folder / "metrics.json")


@pytest.mark.parametrize("text, match", [
    (None, r"metrics.json: not found; rerun ./run.sh cv bb$"),
    ("{oops", r"metrics.json: not valid JSON \(.*\); rerun ./run.sh cv bb$"),
    ("[1, 2]", r"metrics.json: not a cv metrics file \(expected a JSON object\); rerun"),
])
def test_malformed_metrics_gives_one_line(tmp_path, text, match):
    path = tmp_path / "runs" / "bb" / "metrics.json"
    path.parent.mkdir(parents=True)
    if text is not None:
        path.write_text(text)
    with pytest.raises(KitError, match=match) as exc:
        read_metrics(path)
    _one_line(exc)


def _folds(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sample_index,label,fold,group\n" + "".join(f"{r}\n" for r in rows))
    return path


def test_folds_read_back_with_their_hash(tmp_path):
    path = _folds(tmp_path / "folds.csv", ["img_0.png,Luminal A,0,img_0.png",
                                           "img_1.png,HER2(+),1,img_1.png"])
    df, sha = read_folds(path)
    assert sha == sha256_file(path) and df.fold.dtype == np.int64
    assert list(df.columns) == ["sample_index", "label", "fold", "group"]
    old = tmp_path / "old.csv"
    old.write_text("sample_index,label,fold\nimg_0.png,Luminal A,0\n")
    assert list(read_folds(old)[0].columns) == ["sample_index", "label", "fold"]


@pytest.mark.parametrize("rows, match", [
    (["img_0.png,Luminal C,0,g"], r"line 2: unknown label 'Luminal C'; rerun ./run.sh folds"),
    (["img_0.png,Luminal A,-1,g"], r"line 2: fold '-1' is not a non-negative integer"),
    (["img_0.png,Luminal A,0,g", "img_0.png,Luminal A,0,g"], r"line 3: img_0.png listed again"),
    (["img_0.png,Luminal A,1,g"], r"fold\(s\) 0 have no images; rerun ./run.sh folds --force"),
    ([], r"folds.csv: no rows"),
    ([f"img_{i}.png,x,0,g" for i in range(5)], r"line 4: unknown label 'x'; \.\.\. \(5 in all\)"),
])
def test_malformed_folds_gives_one_line(tmp_path, rows, match):
    path = _folds(tmp_path / "folds" / "folds.csv", rows)
    with pytest.raises(KitError, match=match) as exc:
        read_folds(path)
    assert _one_line(exc).startswith(f"{path}: ")


def test_folds_with_other_columns_or_none(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("sample_index,fold\nimg_0.png,0\n")
    with pytest.raises(KitError, match=r"columns are sample_index,fold, expected "
                       r"sample_index,label,fold,group; rerun ./run.sh folds --force") as exc:
        read_folds(path)
    _one_line(exc)
    with pytest.raises(KitError, match=r"folds.csv: not found; run ./run.sh folds first"):
        read_folds(tmp_path / "folds" / "folds.csv")


def _manifest():
    return {key: ({s: "x" for s in sub} if sub else "x") for key, sub in MANIFEST_FIELDS.items()}


def test_manifest_reads_and_refuses_incomplete_ones(tmp_path):
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(_manifest()))
    assert read_manifest(path)["name"] == "x"
    part = _manifest()
    del part["csv_sha256"], part["blend"]["weights"]
    path.write_text(json.dumps(part))
    with pytest.raises(KitError, match=r"sub.json: manifest lacks csv_sha256, blend.weights; "
                       r"it was not written by ./run.sh blend") as exc:
        read_manifest(path)
    _one_line(exc)
    other = _manifest()
    other["blend"]["biases"] = {"a": 0.0, "b": 0.1}
    path.write_text(json.dumps(other))
    with pytest.raises(KitError, match=r"a blend for classes a, b, not Luminal A"):
        read_manifest(path)
    assert read_manifest(path, classes=("a", "b"))["blend"]["biases"] == {"a": 0.0, "b": 0.1}


@pytest.mark.parametrize("text, match", [
    (None, r"x.json: not found; pass submissions/<name>.json \(written by ./run.sh blend\)"),
    ("{", r"x.json: not valid JSON"),
    ('"a"', r"x.json: not a manifest \(expected a JSON object\)"),
])
def test_malformed_manifest_gives_one_line(tmp_path, text, match):
    path = tmp_path / "x.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(KitError, match=match) as exc:
        read_manifest(path)
    _one_line(exc)
