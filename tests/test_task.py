"""kit.task: the task model, its find order, its one-line errors and the built-in tasks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kit
from kit.task import (
    TASKS_DIR,
    builtin_tasks,
    default_task,
    load_task,
    parse_task,
    pattern_fields,
    pattern_folder,
    pattern_glob,
    pattern_regex,
    read_task,
)
from kit.utils import KitError

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "name": "bach-like",
    "classes": ["Normal", "Benign", "InSitu", "Invasive"],
    "labels": {"file": "train.csv", "id": "case", "label": "tissue", "group": "patient_id"},
    "images": {"train": "train/{id}.png", "test": "test/{id}.png"},
    "masks": None,
    "id_pattern": None,
    "metric": "balanced_accuracy",
    "submission": {"id": "case", "label": "tissue"},
    "junk": [],
    "kaggle": None,
}


def _with(**changes) -> dict:
    out = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        node, *rest = key.split("__")
        if rest:
            out[node][rest[0]] = value
        elif value is _DROP:
            del out[node]
        else:
            out[node] = value
    return out


_DROP = object()


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- the built-in tasks --------------------------------------------------------------------

def test_builtin_an2dl_task_is_todays_behaviour():
    t = load_task()
    assert t is default_task() and t.builtin and t.name == "an2dl2526c2v2"
    assert t.source == TASKS_DIR / "an2dl2526c2v2.yaml"
    assert t.classes == kit.CLASSES and t.prob_columns == kit.PROB_COLUMNS
    assert t.metric == "macro_f1" and t.kaggle == "an2dl2526c2v2"
    assert t.junk == ("green", "cartoon") and t.has_masks and not t.has_groups
    assert t.layout == "csv" and t.labels.file == "train_labels.csv"
    assert (t.labels.id, t.labels.label) == ("sample_index", "label")
    assert t.submission_columns == ("sample_index", "label")
    assert t.path("images", "train", "img_0042.png") == "train_data/img_0042.png"
    assert t.path("images", "test", "img_0042.png") == "test_data/img_0042.png"
    assert t.path("masks", "train", "img_0042.png") == "train_data/mask_0042.png"
    assert t.path("masks", "test", "img_0042.png") == "test_data/mask_0042.png"
    assert t.path("masks", "train", "notes.txt") is None  # not an id of this task
    assert t.id_fields("img_0042.png") == {"n": "0042"} and t.id_fields("mask_0042.png") is None
    assert t.id_from_fields({"n": "0042"}) == "img_0042.png"
    assert load_task("an2dl2526c2v2") is t and load_task("auto") is t


def test_builtin_imagefolder_task_is_the_folders_layout():
    t = load_task("imagefolder")
    assert t.builtin and t.layout == "folders" and not t.has_masks and not t.has_groups
    assert len(t.classes) == 3 and t.metric == "balanced_accuracy" and t.junk == ()
    assert t.path("images", "train", "a_01", label="stroma") == "train/stroma/a_01.png"
    assert t.path("images", "train", "a_01") is None  # the class folder is needed
    assert t.to_dict()["labels"] == {"from": "folders"}
    assert builtin_tasks() == ["an2dl2526c2v2", "imagefolder"]


def test_builtin_files_are_commented_for_a_reader_who_copies_them():
    for name in builtin_tasks():
        text = (TASKS_DIR / f"{name}.yaml").read_text()
        comments = [line for line in text.splitlines() if "#" in line]
        assert len(comments) >= 8, name
        assert "docs/tasks.md" in text


def test_task_files_are_packaged():
    toml = (REPO / "pyproject.toml").read_text()
    assert '"conf/tasks/*.yaml"' in toml


# --- the find order ------------------------------------------------------------------------

def test_find_order_spec_then_data_task_yaml_then_builtin(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert load_task(None, data) is default_task()  # nothing here: the built-in one
    own = _write(data / "task.yaml", GOOD)
    found = load_task(None, data)
    assert found.name == "bach-like" and found.source == own and not found.builtin
    assert load_task("auto", data) == found
    # a spec wins over the data folder's file: a built-in name, or a file
    assert load_task("imagefolder", data).name == "imagefolder"
    other = _write(tmp_path / "elsewhere.yaml", _with(name="other"))
    assert load_task(str(other), data).name == "other"
    assert load_task(other).source == other
    assert load_task(found) is found  # a Task passes through


def test_task_yaml_one_level_down_as_kaggle_mounts_it(tmp_path):
    _write(tmp_path / "input" / "comp" / "task.yaml", GOOD)
    (tmp_path / "input" / "other").mkdir()
    assert load_task(None, tmp_path / "input").name == "bach-like"
    _write(tmp_path / "input" / "other" / "task.yaml", _with(name="second"))
    assert load_task(None, tmp_path / "input") is default_task()  # ambiguous: not guessed


def test_unknown_task_spec_is_one_line(tmp_path):
    with pytest.raises(KitError) as exc:
        load_task("bach", tmp_path)
    assert str(exc.value) == ("--task bach: no such task file and no built-in task of that "
                              "name; give a task file's path or one of an2dl2526c2v2, "
                              "imagefolder (docs/tasks.md)")
    assert exc.value.problems == []


# --- the model: what it accepts --------------------------------------------------------------

def test_a_good_task_and_its_accessors():
    t = parse_task(GOOD, "t.yaml")
    assert t.classes == ("Normal", "Benign", "InSitu", "Invasive")
    assert t.has_groups and not t.has_masks and t.layout == "csv"
    assert t.prob_columns == ["p_Normal", "p_Benign", "p_InSitu", "p_Invasive"]
    assert t.submission_columns == ("case", "tissue")
    assert t.path("images", "test", "c9") == "test/c9.png"
    assert t.sort_key("c2") < t.sort_key("c3")
    assert t.cite("classes") == " (classes in t.yaml)"
    assert default_task().cite("classes") == ""  # built-in: the data is what to fix


def test_optional_keys_default_and_numbers_are_class_names():
    t = parse_task(_with(masks=_DROP, id_pattern=_DROP, junk=_DROP, kaggle=_DROP,
                         classes=[0, 1, 2, 3, 4], metric="quadratic_kappa"))
    assert t.masks is None and t.id_pattern is None and t.junk == () and t.kaggle is None
    assert t.classes == ("0", "1", "2", "3", "4")  # ordinal grades, compared as the CSV's text


def test_to_dict_round_trips_and_the_fingerprint_is_the_content(tmp_path):
    t = parse_task(GOOD, "a.yaml")
    d = t.to_dict()
    assert json.loads(json.dumps(d)) == d and d["classes"] == GOOD["classes"]
    again = parse_task(d, "b.yaml")
    assert again == t and again.fingerprint == t.fingerprint and len(t.fingerprint) == 64
    assert len({t, again, default_task()}) == 2  # hashable, by content
    reordered = parse_task(_with(classes=["Benign", "Normal", "InSitu", "Invasive"]))
    assert reordered.fingerprint != t.fingerprint  # the class order is the column order
    # the built-in file copied elsewhere is the same task
    copy = shutil.copy(TASKS_DIR / "an2dl2526c2v2.yaml", tmp_path / "task.yaml")
    assert read_task(copy) == default_task() and not read_task(copy).builtin


def test_id_from_fields_only_for_literal_patterns():
    t = parse_task(_with(id_pattern=r"case_(?P<num>\d+)",
                         masks={"train": "m/{num}.png", "test": "mt/{num}.png"}))
    assert t.id_groups == ("num",) and t.id_from_fields({"num": "0007"}) == "case_0007"
    assert t.id_from_fields({"num": "x"}) is None  # \d+ refuses it
    alt = parse_task(_with(id_pattern=r"(a|b)_(?P<num>\d+)",
                           masks={"train": "m/{num}.png", "test": "mt/{num}.png"}))
    assert alt.id_from_fields({"num": "1"}) is None  # the text around the group is not fixed


def test_pattern_helpers():
    assert pattern_fields("train/{label}/{id}_{id}.png") == ("label", "id")
    rx = pattern_regex("train/{label}/{id}.png")
    assert rx.fullmatch("train/tumour/a.b.png").groupdict() == {"label": "tumour", "id": "a.b"}
    assert rx.fullmatch("train/x/y/z.png") is None  # a field is one path component
    assert pattern_regex("{id}/{id}.png").fullmatch("a/b.png") is None
    assert pattern_glob("data [v2]/{id}.png") == "data [[]v2]/*.png"
    assert pattern_folder("train/{label}/{id}.png") == "train"
    assert pattern_folder("a/b/img_{id}") == "a/b" and pattern_folder("{id}.png") == ""


# --- the model: what it refuses, one line each ---------------------------------------------

BAD = [
    (_with(clases=["A", "B"]), ("clases: unknown key (did you mean 'classes'?); the keys here are "
                               "name, classes, labels")),
    (_with(classes=["A"]), "classes: 1 class(es) given; list at least 2 class names"),
    (_with(classes="A,B"), "classes: expected a list (got 'A,B'); write it as [a, b, ...]"),
    (_with(classes=["A", "B", "A"]), "classes: class 'A' is listed twice; list each class once"),
    (_with(classes=["Luminal A", "luminal  a"]),
     ("classes: class 'luminal  a' and 'Luminal A' differ only in case or spacing; list each "
     "class once")),
    (_with(classes=["A", " B"]), "classes: class ' B' is empty or has leading/trailing spaces"),
    (_with(metric="f1_macro"), ("metric: 'f1_macro' is not a known metric (did you mean "
                               "'macro_f1'?); use one of macro_f1, balanced_accuracy, accuracy, "
                               "weighted_f1, quadratic_kappa")),
    (_with(metric=_DROP), "metric: missing; add it, one of macro_f1, "),
    (_with(id_pattern="img_(?P<n>"), ("id_pattern: 'img_(?P<n>' is not a valid regular "
                                     "expression (missing ), unterminated subpattern")),
    (_with(id_pattern="(?P<id>.+)"), "id_pattern: named group 'id' is reserved"),
    (_with(images__train="train/{case}.png"),
     ("images.train: 'train/{case}.png' uses {case}; use {id} (named groups of id_pattern are "
     "fields too)")),
    (_with(images__test="test/{label}/{id}.png"), ("images.test: 'test/{label}/{id}.png' uses "
                                                  "{label} ({label} is the class folder")),
    (_with(images__train="train/all.png"), "images.train: 'train/all.png' has no {id}"),
    (_with(images__train="train/{id:04d}.png"), ("images.train: 'train/{id:04d}.png' has field "
                                                "{id:04d}; fields are plain names")),
    (_with(images__train="/data/train/{id}.png"), ("images.train: '/data/train/{id}.png' is not "
                                                  "a path under the data folder")),
    (_with(images__test="../test/{id}.png"), "images.test: '../test/{id}.png' is not a path"),
    (_with(masks={"train": "m/{id}.png"}), "masks.test: missing; add it"),
    (_with(masks={"train": "m/x.png", "test": "m/{id}.png"}), ("masks.train: 'm/x.png' has no "
                                                              "field")),
    (_with(labels="train.csv"), ("labels: expected a mapping: {file, id, label} (group "
                                "optional) or {from: folders} (got 'train.csv')")),
    (_with(labels={"from": "csv"}), "labels.from: 'csv' is not allowed; use 'folders'"),
    (_with(labels={"from": "folders", "file": "x.csv"}),
     "labels.file: not a key of labels: {from: folders}"),
    (_with(labels={"from": "folders"}), ("images.train: 'train/{id}.png' has no {label} while "
                                        "labels is {from: folders}")),
    (_with(labels={"file": "t.csv", "id": "case"}), "labels.label: missing; add it"),
    (_with(labels={"file": "t.csv", "id": "a", "label": "b", "patient": "p"}),
     "labels.patient: unknown key; the keys here are file, id, label, group"),
    (_with(labels={"file": "t.csv", "id": "a", "label": "a"}),
     "labels: the id, label and group columns must differ (got a, a)"),
    (_with(submission={"id": "a", "label": "a"}), "submission: id and label are both 'a'"),
    (_with(junk=["greenish"]), ("junk: 'greenish' is not a junk detector (did you mean "
                               "'green'?); use [] or some of green, cartoon")),
    (_with(kaggle="a b"), "kaggle: 'a b' is not a competition slug"),
    (_with(name=""), "name: is empty; give the task's name"),
]


@pytest.mark.parametrize("data, expected", BAD, ids=[e.split(":")[0] + str(i)
                                                     for i, (_, e) in enumerate(BAD)])
def test_each_bad_key_is_one_line_naming_file_and_key(data, expected):
    with pytest.raises(KitError) as exc:
        parse_task(data, "/data/task.yaml")
    line = str(exc.value)
    assert exc.value.problems == [] and "\n" not in line
    assert line.startswith("/data/task.yaml: " + expected), line
    assert "; " in line  # what is wrong; the fix
    assert "pydantic" not in line and "Input should" not in line


def test_several_problems_are_reported_at_once():
    with pytest.raises(KitError) as exc:
        parse_task(_with(metric="f1", classes=["A"], extra=1), "t.yaml")
    assert str(exc.value) == "t.yaml: 3 problems in the task file"
    assert [p.split(":")[1].strip() for p in exc.value.problems] == ["classes", "metric", "extra"]
    assert all(p.startswith("t.yaml: ") and "\n" not in p for p in exc.value.problems)


def test_file_level_problems(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(KitError, match="bad.yaml: not valid YAML"):
        load_task(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(KitError, match="list.yaml: expected a mapping at the top level"):
        load_task(tmp_path / "list.yaml")
    with pytest.raises(KitError, match="task file not found"):
        read_task(tmp_path / "none.yaml")


def test_the_module_is_shared_and_light():
    """kit.task imports no pipeline layer (the .importlinter contract) and nothing heavy."""
    contracts = (REPO / ".importlinter").read_text()
    assert "kit.task" in contracts.split("[importlinter:contract:shared]")[1]
    code = ("import sys, kit.task; print(sorted(m for m in ('torch', 'sklearn', 'pandas', "
            "'kit.data', 'kit.training') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_validate_with_a_bad_task_file_exits_2_with_one_line(tmp_path):
    data = tmp_path / "data"
    _write(data / "task.yaml", _with(metric="f2"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    r = subprocess.run([sys.executable, "-m", "kit", "validate", "--data", str(data)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                       check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        (f"error: {data / 'task.yaml'}: metric: 'f2' is not a known metric; use one of macro_f1, "
        "balanced_accuracy, accuracy, weighted_f1, quadratic_kappa")]


def test_data_is_the_root_with_its_task_from_a_path_a_string_or_a_dataset(tmp_path):
    from kit.data.dataset import load_dataset
    from kit.data.task_synth import write_task_dataset
    from kit.task import Data, as_data, task_of

    root = write_task_dataset(tmp_path / "data", "csv", seed=0, n_train=6, n_test=2)
    for given in (root, str(root)):  # a Path's own .root attribute ("/") is not the root
        data = as_data(given)
        assert data.root == root and Path(data) == root and data.task.name == "synthetic-csv"
    assert as_data(data) is data and as_data(None) is None
    assert as_data(root, "imagefolder").task.name == "imagefolder"  # --task wins
    ds = load_dataset(data)
    assert ds.task is data.task  # load_dataset takes a Data's task
    assert as_data(ds) == data  # a loaded dataset: its root and task
    assert task_of(None) is default_task() and task_of(root) == data.task
    (tmp_path / "empty").mkdir()
    assert as_data(tmp_path / "empty").task is default_task()  # no task.yaml: the built-in one
    assert isinstance(data, Data) and data / "train.csv" == root / "train.csv"
