"""The command line: ``python -m kit --help``, every ``<command> --help`` and ``./run.sh``."""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kit.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "80"}


def _command_lines(help_text: str) -> dict[str, list[str]]:
    """Lines of the top-level help that start with a command name, by command."""
    found: dict[str, list[str]] = {}
    for line in help_text.splitlines():
        words = line.split()
        if words and words[0] in COMMANDS and line.startswith("    "):
            found.setdefault(words[0], []).append(line)
    return found


def _check_top_level_help(text: str) -> None:
    lines = _command_lines(text)
    assert set(lines) == set(COMMANDS), set(COMMANDS) ^ set(lines)
    for name, help_line in COMMANDS.items():
        assert len(lines[name]) == 1, lines[name]
        # the whole help on the command's own line: argparse wraps lines at 80 columns
        assert lines[name][0].split(None, 1)[1] == help_line
    assert "./run.sh test" in text and "./run.sh kaggle" in text


def test_python_m_kit_help_lists_every_command_on_one_line():
    r = subprocess.run([sys.executable, "-m", "kit", "--help"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    _check_top_level_help(r.stdout)


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    _check_top_level_help(capsys.readouterr().out)


def test_the_bench_line_names_every_registered_bench(capsys):
    """The help line comes from the registry: a bench added there is listed, none is left out,
    and every module of kit/bench/ that is a bench (add_arguments and run) is registered."""
    from kit.bench import BENCHES

    listed = COMMANDS["bench"].split(": ", 1)[1].split(" | ")
    assert listed == list(BENCHES)
    assert main([]) == 0
    assert _command_lines(capsys.readouterr().out)["bench"][0].split(None, 1)[1] == \
        COMMANDS["bench"]
    for module in sorted((REPO / "kit" / "bench").glob("*.py")):
        mod = importlib.import_module(f"kit.bench.{module.stem}")
        if hasattr(mod, "add_arguments") and hasattr(mod, "run"):
            assert module.stem in BENCHES, f"kit/bench/{module.name} is not in kit.bench.BENCHES"
    for name in BENCHES:
        assert importlib.util.find_spec(f"kit.bench.{name}") is not None, name


def test_unknown_command_exits_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "kit", "frobnicate"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 2
    assert "invalid choice" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help(name, capsys):
    module = f"kit.commands.{name.replace('-', '_')}"
    assert importlib.util.find_spec(module) is not None, f"{module} is missing"
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ./run.sh {name}")
    assert COMMANDS[name] in " ".join(out.split())  # the one-line help, however wrapped
    for common in ("--data", "--workdir", "--seed"):
        assert common in out


def test_run_sh_help():
    # run.sh bootstraps .venv only when requirements.txt changed; here it is already set up
    r = subprocess.run([str(REPO / "run.sh"), "--help"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    _check_top_level_help(r.stdout)


def test_run_sh_passes_arguments_and_exit_code(tmp_path):
    r = subprocess.run([str(REPO / "run.sh"), "validate", "--data", str(tmp_path / "none")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert "dataset folder not found" in r.stderr and "Traceback" not in r.stderr


def test_run_for_user_turns_errors_and_ctrl_c_into_lines_and_exit_codes(capsys):
    from kit.process import run_for_user
    from kit.utils import KitError

    def bad():
        raise KitError("data/x.csv: broken; fix it")

    def stopped():
        raise KeyboardInterrupt

    assert run_for_user(bad, "interrupted") == 2
    assert capsys.readouterr().err == "error: data/x.csv: broken; fix it\n"
    assert run_for_user(stopped, "interrupted: rerun to resume") == 130
    assert capsys.readouterr().err == "interrupted: rerun to resume\n"
    assert run_for_user(lambda: None, "x") == 0 and run_for_user(lambda: 3, "x") == 3


@pytest.mark.parametrize("name", ["cv", "tune"])
def test_backbone_help_lists_the_registry(name, capsys):
    """cv and tune list every registered backbone with its size and gating, read from the
    registry (a backbone registered tomorrow appears without editing the command)."""
    from kit.models.backbones import describe_backbones, list_backbones

    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(line in out for line in describe_backbones(notes=False))
    for new in ("resnet18", "resnet50", "uni2_h", "h_optimus_1", "midnight", "gigapath"):
        assert new in list_backbones() and f"{new} (" in out
    assert "uni2_h (224 px, gated weights)" in out and "midnight (224 px)" in out
