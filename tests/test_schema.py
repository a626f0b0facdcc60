"""kit.schema: every setting declared once, the YAML defaults and the schema in step, and a
mistyped value stopping its command with one line before any work."""
from __future__ import annotations

import copy

import pytest

from kit.cli import main
from kit.commands.config import defaults as group_defaults
from kit.commands.config import table
from kit.config import load_config, train_settings
from kit.schema import GROUPS, check, describe
from kit.schema.values import TTA_SETS, TTA_VIEWS
from kit.training.settings import train_config
from kit.utils import KitError

TOP_GROUPS = [g for g in GROUPS if g not in ("augment", "features")]


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and key != "space" and not prefix.endswith("space."):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("group", TOP_GROUPS)
def test_every_yaml_default_passes_its_schema(group):
    check(group, group_defaults(group))


@pytest.mark.parametrize("group", TOP_GROUPS)
def test_schema_and_yaml_have_the_same_keys(group):
    cfg = group_defaults(group)
    documented = {k for k, *_ in describe(group, cfg)}
    in_yaml = {k for k in _leaves(cfg) if not k.startswith("space.")}
    assert documented == in_yaml


@pytest.mark.parametrize("group", TOP_GROUPS)
def test_a_key_missing_from_the_yaml_fails(group):
    cfg = group_defaults(group)
    first = next(iter(cfg))
    del cfg[first]
    with pytest.raises(KitError, match=rf"^{group}: {first}: missing"):
        check(group, cfg)


@pytest.mark.parametrize("group", TOP_GROUPS)
def test_a_key_the_schema_lacks_fails(group):
    cfg = {**group_defaults(group), "not_a_setting": 1}
    with pytest.raises(KitError, match=rf"^{group}: not_a_setting: no such key \(known keys: "):
        check(group, cfg)


@pytest.mark.parametrize("sets, message", [
    ({"lr": "abc"}, r"train: lr = 'abc' is not allowed: a number >= 0"),
    ({"epochs": -3}, r"train: epochs = -3 is not allowed: an integer >= 1"),
    ({"epochs": True}, r"train: epochs = True is not allowed: an integer >= 1"),
    ({"batch_size": 0}, r"train: batch_size = 0 is not allowed: an integer >= 1"),
    ({"label_issues": {"inner_folds": 1}},
     r"train: label_issues.inner_folds = 1 is not allowed: an integer >= 2"),
    ({"head": {"dropout": 1.5}},
     r"train: head.dropout = 1.5 is not allowed: a number >= 0 and < 1"),
    ({"head": {"type": "foo"}},
     r"train: head.type = 'foo' is not allowed: one of auto, mlp, logreg"),
    ({"tta": "sideways"}, r"train: tta = 'sideways': expected one of the sets flips"),
    ({"unfreeze_schedule": "3:x"}, r"train: unfreeze_schedule = '3:x': block counts must be"),
    ({"train_norm": "batchnorm,foo"}, r"train: train_norm = 'batchnorm,foo': unknown kind"),
    ({"augment": {"color_jitter": {"hue": 0.9}}},
     r"train: augment.color_jitter.hue = 0.9 is not allowed: a number >= 0 and <= 0.5"),
    ({"features": {"dtype": "int8"}}, r"train: features.dtype = 'int8' is not allowed"),
])
def test_bad_training_settings_stop_with_one_line(sets, message):
    with pytest.raises(KitError, match=message) as err:
        train_settings(sets)
    assert "\n" not in str(err.value)


def test_forms_the_stages_accept_pass():
    # YAML 1.1 reads a bare off as false; --train-norm writes a comma string.
    for sets in ({"amp": False}, {"label_issues": {"mode": False}}, {"train_norm": "none"},
                 {"train_norm": []}, {"tta": ["id", "rot90"]}, {"tta": "none"},
                 {"unfreeze_schedule": "gradual:2"}, {"unfreeze_schedule": {0: 0, 3: "all"}},
                 {"num_workers": 2}, {"patches_size": 224}, {"lr": 1}):
        train_settings(sets)


def test_values_are_checked_not_converted():
    # Converting (1 -> 1.0) would change the config hashed into every cache and run key.
    cfg = train_config(train_settings({"lr": 1, "warmup_epochs": 2}))
    assert type(cfg["lr"]) is int and cfg["warmup_epochs"] == 2


def test_tuned_params_are_checked_too():
    with pytest.raises(KitError, match=r"train \(with --params\): head.depth = -1 is not"):
        train_config(train_settings(), {"head.depth": -1})


@pytest.mark.parametrize("group, sets, message", [
    ("blend", {"prior": "xyz"}, r"blend: prior = 'xyz' is not allowed: one of train, em"),
    ("blend", {"bias_low": 2.0, "bias_high": 1.0}, r"blend: bias_high \(1.0\) must be above"),
    ("patches", {"select": "all"}, r"patches: select = 'all' is not allowed: one of top_k"),
    ("patches", {"min_region_px": 0}, r"patches: min_region_px = 0 is not allowed"),
    ("folds", {"n_splits": 1}, r"folds: n_splits = 1 is not allowed: an integer >= 2"),
    ("tune", {"objective": "fast"}, r"tune: objective = 'fast' is not allowed"),
    ("clean", {"green": {"min_g": 2}}, r"clean: green.min_g = 2 is not allowed"),
    ("submit", {"poll_interval": 0}, r"submit: poll_interval = 0 is not allowed"),
    ("report", {"reliability_bins": 1}, r"report: reliability_bins = 1 is not allowed"),
])
def test_bad_stage_settings_stop_at_load(group, sets, message):
    with pytest.raises(KitError, match=message):
        load_config(group, sets)


def test_schema_views_are_the_tta_modules():
    from kit.training.tta import VIEW_SETS, VIEWS

    assert tuple(VIEWS) == TTA_VIEWS
    assert set(VIEW_SETS) <= set(TTA_SETS)


@pytest.mark.parametrize("argv", [
    ["cv", "tiny_cnn", "--set", "lr=abc"],
    ["cv", "tiny_cnn", "--set", "epochs=-3"],
    ["cv", "tiny_cnn", "--set", "batch_size=0"],
    ["cv", "tiny_cnn", "--set", "label_issues.inner_folds=1"],
    ["cv", "tiny_cnn", "--set", "head.dropout=1.5"],
    ["blend", "--set", "prior=xyz"],
])
def test_commands_stop_before_any_work(argv, tmp_path, capsys):
    # An empty work directory and no data: the setting is refused before inputs are looked for.
    code = main([*argv, "--workdir", str(tmp_path), "--data", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    key, value = argv[-1].split("=")
    assert len(err.splitlines()) == 1 and f"{key} = " in err and "not allowed" in err, err
    assert list(tmp_path.iterdir()) == []


def test_config_command_lists_every_key(capsys):
    assert main(["config", "train"]) == 0
    out = capsys.readouterr().out
    for key, *_ in describe("train", group_defaults("train")):
        assert f"  {key} " in out
    md = table("blend", markdown=True)
    assert "| `prior` | `train` | one of train, em |" in md


def test_unknown_key_is_named_with_the_known_ones():
    cfg = copy.deepcopy(group_defaults("folds"))
    cfg["n_split"] = 5
    with pytest.raises(KitError, match=r"n_split: no such key \(known keys: n_splits\)"):
        check("folds", cfg)


def test_settings_page_is_the_schema(capsys):
    # docs/settings.md is `./run.sh config --markdown`: regenerate it when a key changes.
    from pathlib import Path

    assert main(["config", "--markdown"]) == 0
    page = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert page.read_text() == capsys.readouterr().out, (
        "docs/settings.md is stale: ./run.sh config --markdown > docs/settings.md")
