"""The kit logger: plain lines on stdout by default, -q keeps warnings, capture() collects."""
import logging

from kit.cli import build_parser
from kit.log import capture, set_verbosity


def test_stage_lines_come_out_plain_on_stdout_and_quiet_keeps_warnings(capsys):
    log = logging.getLogger("kit.training.cv")
    try:
        log.info("tiny_cnn: OOF macro F1 0.500")
        log.debug("hidden by default")
        assert capsys.readouterr().out == "tiny_cnn: OOF macro F1 0.500\n"
        set_verbosity(-1)
        log.info("chatter")
        log.warning("tiny_cnn: WARNING: collapsed model")
        assert capsys.readouterr().out == "tiny_cnn: WARNING: collapsed model\n"
        set_verbosity(1)
        log.debug("debug line")
        assert capsys.readouterr().out == "debug line\n"
    finally:
        set_verbosity(0)


def test_capture_collects_lines_instead_of_printing(capsys):
    log = logging.getLogger("kit.tuning.tune")
    with capture() as lines:
        log.info("fold 0: done")
    log.info("after")
    assert lines == ["fold 0: done"] and capsys.readouterr().out == "after\n"


def test_the_cli_takes_quiet_and_verbose():
    parser = build_parser(names={"folds"})
    assert parser.parse_args(["folds", "-q"]).verbosity == -1
    assert parser.parse_args(["folds", "-v"]).verbosity == 1
    assert parser.parse_args(["folds"]).verbosity == 0
