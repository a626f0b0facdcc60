"""kit.utils.progress: a bar on a terminal or in Jupyter, plain log lines elsewhere."""
from __future__ import annotations

import io
import sys
import types

import pytest

import kit.utils as utils
from kit.utils import KitError, progress, progress_mode


class Clock:
    """A fake time.time for tqdm: the loop body sets ``t``."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    import tqdm.std

    c = Clock()
    monkeypatch.setattr(tqdm.std, "time", c)
    return c


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv("KIT_PROGRESS", raising=False)
    monkeypatch.delenv("KIT_PROGRESS_INTERVAL", raising=False)


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    assert progress_mode(Stream(tty=True)) == "bar"
    assert progress_mode(Stream(tty=False)) == "log"
    for value, mode in (("1", "bar"), ("bar", "bar"), ("log", "log"), ("0", "off"),
                        ("OFF", "off")):
        monkeypatch.setenv("KIT_PROGRESS", value)
        assert progress_mode(Stream(tty=False)) == mode
        assert progress_mode(Stream(tty=True)) == mode
    monkeypatch.setenv("KIT_PROGRESS", "loud")
    with pytest.raises(KitError, match="KIT_PROGRESS='loud': use one of auto, bar, log, off"):
        progress_mode()


def test_jupyter_kernel_gets_the_bar_with_widgets(monkeypatch):
    class ZMQInteractiveShell:  # the class name ipykernel's shell has
        pass

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: ZMQInteractiveShell()
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    assert utils.in_jupyter()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "ipywidgets" else real(name, *a))
    assert progress_mode(Stream(tty=False)) == "bar"  # tqdm.autonotebook draws a widget
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    assert progress_mode(Stream(tty=False)) == "log"  # no widgets: lines, not escape codes
    ipython.get_ipython = lambda: None  # IPython imported, but no kernel running
    assert not utils.in_jupyter()
    assert progress_mode(Stream(tty=False)) == "log"


def test_log_lines_every_interval_and_a_last_one(monkeypatch, capsys, clock):
    monkeypatch.setenv("KIT_PROGRESS_INTERVAL", "2.5")
    seen = []
    for i in progress(range(10), desc="phikon fold 0 epoch 1/3", unit="batch"):
        seen.append(i)
        clock.t = i + 1.0  # each item takes one (fake) second
    assert seen == list(range(10))  # the iterable is passed through untouched
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # no bar redraws, no cursor moves
    lines = err.splitlines()
    # 2.5 s apart at most once: after items 3, 6, 9 (t = 3, 6, 9), then the closing line.
    assert [line.split(":")[0] for line in lines] == ["phikon fold 0 epoch 1/3"] * 4
    assert [line.split(": ", 1)[1].split(" ")[0] for line in lines] == [
        "3/10", "6/10", "9/10", "10/10"]
    assert lines[0].startswith("phikon fold 0 epoch 1/3: 3/10 batch (30%), 00:03 elapsed, "
                               "00:07 left, ")
    assert lines[-1].startswith("phikon fold 0 epoch 1/3: 10/10 batch (100%), 00:10 elapsed")
    assert lines[-1].endswith("batch/s")


def test_a_loop_shorter_than_the_interval_prints_nothing(capsys, clock):
    for i in progress(range(50), desc="fast"):
        clock.t = i * 0.01  # 0.5 s in all, under the default 5 s
    assert capsys.readouterr().err == ""


def test_no_total_and_leave_false(monkeypatch, capsys, clock):
    monkeypatch.setenv("KIT_PROGRESS_INTERVAL", "1")
    for i in progress(iter(range(4)), desc="embed", unit="batch", leave=False):
        clock.t = 2.0 * (i + 1)
    lines = capsys.readouterr().err.splitlines()
    # Every item crossed the interval; leave=False adds no closing line (and no blank one).
    assert lines == [f"embed: {n} batch, 00:{2 * n:02d} elapsed, 0.5 batch/s" for n in (1, 2, 3, 4)]


def test_manual_updates_and_off(monkeypatch, capsys, clock):
    monkeypatch.setenv("KIT_PROGRESS_INTERVAL", "1")
    bar = progress(total=4, desc="patches", unit="img")
    for k in range(4):
        clock.t = k + 1.0
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err.splitlines()[-1].startswith("patches: 4/4 img (100%)")
    monkeypatch.setenv("KIT_PROGRESS", "off")
    for i in progress(range(3), desc="quiet"):
        clock.t = 10.0 * (i + 1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_bad_interval_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("KIT_PROGRESS_INTERVAL", value)
    with pytest.raises(KitError, match="KIT_PROGRESS_INTERVAL=.*give a number of seconds > 0"):
        progress(range(3))


def test_bar_mode_uses_tqdm_autonotebook(monkeypatch):
    import tqdm.asyncio
    import tqdm.autonotebook

    monkeypatch.setenv("KIT_PROGRESS", "bar")
    bar = progress(range(3), desc="x")
    assert isinstance(bar, tqdm.autonotebook.tqdm) and not bar.disable
    # Not tqdm.auto's asyncio mixin: it makes an iterator of the iterable in __init__.
    assert not isinstance(bar, tqdm.asyncio.tqdm_asyncio)
    bar.close()


class Reiterable:
    """An iterable (no ``__next__``, like a DataLoader) that counts the iterators made of it."""

    def __init__(self, n: int):
        self.n, self.iters = n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        self.iters += 1
        return iter(range(self.n))


@pytest.mark.parametrize("mode", ["off", "bar", "log"])
def test_progress_makes_one_iterator_of_what_it_wraps(monkeypatch, mode):
    # A DataLoader draws its workers' base seed from its generator each time an iterator of it
    # is made; a second, discarded iterator shifts every later draw of that generator (the
    # sampler's order) and, with workers, starts them for nothing.
    monkeypatch.setenv("KIT_PROGRESS", mode)
    data = Reiterable(3)
    assert list(progress(data, desc="x")) == [0, 1, 2]
    assert data.iters == 1


def test_seeded_loader_batches_do_not_depend_on_the_display(monkeypatch):
    import torch

    def batches(wrap):
        # The sampler and the loader share one generator, as in kit.training.loaders.
        g = torch.Generator().manual_seed(0)
        sampler = torch.utils.data.RandomSampler(range(20), generator=g)
        loader = torch.utils.data.DataLoader(list(range(20)), batch_size=8, sampler=sampler,
                                             generator=g)
        return [[b.tolist() for b in wrap(loader)] for _ in range(2)]  # two epochs

    plain = batches(lambda loader: loader)  # no progress at all
    for mode in ("off", "bar", "log"):
        monkeypatch.setenv("KIT_PROGRESS", mode)
        assert batches(lambda loader: progress(loader, desc="x")) == plain, mode


def test_cv_on_pixels_gives_the_same_probabilities_whatever_the_display(monkeypatch, tmp_path):
    """The same data, config and seed give byte-identical OOF and test probabilities (CPU)
    with the progress bar, the log lines or nothing shown."""
    from kit.config import train_settings
    from kit.data.synth import write_patch_workdir
    from kit.training.cv import run_cv

    out = {}
    for mode in ("off", "bar", "log"):
        monkeypatch.setenv("KIT_PROGRESS", mode)
        paths = write_patch_workdir(tmp_path / mode, n_train=16, n_test=4, n_folds=2)
        # unfreeze_last with random weights: the pixel path, the DataLoader in the loop
        run_cv(paths, None, train_settings({"epochs": 2, "patience": 0, "unfreeze_last": 4,
                                            "batch_size": 16, "warmup_epochs": 0}),
               backbone="tiny_cnn", weights="random", params="none", seed=0, restart=True)
        run = paths.backbone_dir("tiny_cnn")
        out[mode] = {name: (run / name).read_bytes() for name in ("oof.csv", "test.csv")}
    assert out["bar"] == out["off"]
    assert out["log"] == out["off"]
