"""Suite-wide set-up: import kit before any test module imports torch, and the test tiers.

kit/__init__.py sets environment defaults (OMP_WAIT_POLICY, NO_ALBUMENTATIONS_UPDATE) that
only take effect when set before torch / albumentations load; plain ``pytest`` runs (without
``./run.sh test``) would otherwise miss them.

Tiers (markers registered in pyproject.toml): by default only the fast tier runs, every test
without a ``slow``, ``postgres``, ``browser`` or ``gpu`` marker. ``--all`` (``./run.sh test
--all``, what .ci/run calls) runs every test; an explicit ``-m EXPR`` chooses by itself, and a
test named by its node id (``tests/test_x.py::test_y``) runs whatever its tier.
"""
import pytest

import kit  # noqa: F401

TIERS = ("slow", "postgres", "browser", "gpu")


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help=f"run every test, the {', '.join(TIERS)} tiers included "
                          "(default: the fast tier only)")


def _named(item, args) -> bool:
    """Whether the command line names this test (or its class) by node id."""
    return any(item.nodeid == a or item.nodeid.startswith((a + "[", a + "::")) for a in args)


def pytest_collection_modifyitems(config, items):
    if config.getoption("all_tiers") or config.getoption("markexpr"):
        return
    named = [a.replace("\\", "/") for a in config.args if "::" in a]
    keep, drop = [], []
    for item in items:
        tiered = any(item.get_closest_marker(t) for t in TIERS)
        (drop if tiered and not _named(item, named) else keep).append(item)
    config.stash[_DROPPED] = len(drop)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_DROPPED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("all_tiers") or config.getoption("markexpr"):
        return
    # Under pytest-xdist the workers collect; the controller knows no count.
    dropped = config.stash.get(_DROPPED, None)
    if dropped == 0:
        return
    what = f"{dropped} test(s)" if dropped else "the tests"
    terminalreporter.write_line(f"fast tier: {what} marked {'/'.join(TIERS)} not run; "
                                "./run.sh test --all runs every test")
