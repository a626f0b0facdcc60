"""Config groups and the one override syntax: --config FILE and --set KEY=VALUE (dotted)."""
from __future__ import annotations

import json

import pytest
import yaml

from cv_data import make_workdir
from kit.cli import CONFIG_GROUPS, main
from kit.config import dotted_to_nested, load_config, parse_value, stage_overrides, with_flags
from kit.utils import KitError


def test_dotted_and_nested_keys_mean_the_same():
    assert dotted_to_nested({"head.depth": 2, "lr": 0.1}) == {"head": {"depth": 2}, "lr": 0.1}
    assert dotted_to_nested({"head": {"depth": 2}, "head.width": 8}) == \
        {"head": {"depth": 2, "width": 8}}
    # a dotted key and a nested mapping below the same parent merge at every depth
    assert dotted_to_nested({"augment.color_jitter.p": 0.5,
                             "augment": {"color_jitter": {"hue": 0.1}}}) == \
        {"augment": {"color_jitter": {"p": 0.5, "hue": 0.1}}}
    with pytest.raises(KitError, match="conflicts"):
        dotted_to_nested({"lr": 1, "lr.x": 2})


@pytest.mark.parametrize("text,value", [("2", 2), ("3e-4", 3e-4), ("true", True),
                                        ("[a, b]", ["a", "b"]), ("null", None),
                                        ("mean_prob", "mean_prob"), ("0.5", 0.5)])
def test_set_values_read_as_yaml(text, value):
    assert parse_value(text) == value


def test_file_then_sets_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"head": {"depth": 3}, "lr": 0.5, "augment.cutmix_alpha": 0.25}))
    over = stage_overrides(f, ["lr=0.1", "head.width=64"])
    assert over == {"head": {"depth": 3, "width": 64}, "lr": 0.1,
                    "augment": {"cutmix_alpha": 0.25}}
    assert with_flags(over, {"lr": 0.2, "epochs": None})["lr"] == 0.2  # flags win, None skipped
    with pytest.raises(KitError, match="KEY=VALUE"):
        stage_overrides(None, ["head.depth"])
    with pytest.raises(KitError, match="no such file"):
        stage_overrides(tmp_path / "nope.yaml")
    with pytest.raises(KitError, match="unknown key 'dpth'"):
        load_config("train", stage_overrides(None, ["head.dpth=1"]))


@pytest.mark.parametrize("command", sorted(CONFIG_GROUPS))
def test_every_stage_with_settings_takes_config_and_set(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--config FILE" in out and "--set KEY=VALUE" in out


def test_cv_settings_from_set_reach_the_run(tmp_path, capsys):
    paths = make_workdir(tmp_path / "w", n_folds=2)
    cfg = tmp_path / "train.yaml"
    cfg.write_text("head.depth: 0\nbatch_size: 32\n")
    code = main(["cv", "tiny_cnn", "--workdir", str(paths.root), "--weights", "random",
                 "--params", "none", "--config", str(cfg), "--set", "epochs=1",
                 "--set", "early_stopping=none", "--set", "head.dropout=0.1"])
    assert code == 0
    metrics = json.loads((paths.backbone_dir("tiny_cnn") / "metrics.json").read_text())
    c = metrics["config"]
    assert c["epochs"] == 1 and c["head"]["depth"] == 0 and c["head"]["dropout"] == 0.1
    assert c["batch_size"] == 32 and metrics["selection"]["early_stopping"] == "none"
    capsys.readouterr()
    assert main(["cv", "tiny_cnn", "--workdir", str(paths.root), "--set", "head.dpth=1"]) == 2
    assert "unknown key 'dpth'" in capsys.readouterr().err
