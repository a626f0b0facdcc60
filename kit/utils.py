"""Small shared helpers: errors, atomic writes, hashing, seeding, config files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

_UMASK = os.umask(0)
os.umask(_UMASK)


class KitError(Exception):
    """An error the user can fix; the CLI prints it as one line per problem, no traceback.

    Parameters
    ----------
    message : str
        What went wrong and how to fix it.
    problems : list of str, optional
        Extra lines, one per problem (e.g. one per bad file).
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A crash half-way leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp creates 0600; give the file the mode a plain open() would
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_csv(path: str | os.PathLike, df, float_format: str | None = None) -> Path:
    """Write a DataFrame as CSV (no index, ``\\n`` line ends) atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n", float_format=float_format)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_config(path: str | os.PathLike, cfg: dict) -> Path:
    """Write the resolved config of a run as YAML next to its outputs."""
    return atomic_write_text(path, yaml.safe_dump(_plain(cfg), sort_keys=True))


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise KitError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise KitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); "
                       "fix or delete it") from None
    if not isinstance(data, dict):
        raise KitError(f"{path}: expected a mapping at the top level")
    return data


def read_csv_columns(path: str | os.PathLike, columns, expected: str, fix: str = ""):
    """A CSV file as strings (nothing read as NaN), column names stripped, with ``columns``
    required and kept (in that order).

    Raises
    ------
    KitError
        One line naming ``path``: unparsable, or missing columns; each says the ``expected``
        header, then ``fix`` when given.
    """
    import pandas as pd

    then = f"; {fix}" if fix else ""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for unparsable CSV
        raise KitError(f"{path}: cannot be read as CSV ({exc}); "
                       f"expected header {expected}{then}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KitError(f"{path}: missing column(s) {', '.join(missing)}; expected header "
                       f"{expected} (found: {','.join(df.columns)}){then}")
    return df[list(columns)].copy()


def connected_components(items, pairs) -> dict:
    """Each of ``items`` -> the smallest item of its connected component under ``pairs``
    (transitive: ``(a, b)`` and ``(b, c)`` put a, b and c together). Pairs naming an item
    not in ``items`` are ignored."""
    parent = {x: x for x in items}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        if a in parent and b in parent:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def n_workers(requested: int | None) -> int:
    """Worker processes to use: ``requested``, or one per available core when 0/None."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, int(requested) if requested else int(cores or 1))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode())


def check_random_state(seed: int | np.random.Generator | None) -> np.random.Generator:
    """The one place a seed becomes a numpy Generator (as scikit-learn's helper of that name)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (if imported) so that CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # data stages do not need torch
        return
    torch.manual_seed(seed)
    # cuBLAS is only deterministic with a fixed workspace (CUDA >= 10.2); it reads this when
    # its first handle is made, so set it here, before any CUDA matmul. A user's value wins.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def package_versions(names=("numpy", "pandas", "torch", "timm", "transformers", "albumentations",
                            "scikit-learn", "optuna", "kaggle", "pillow")) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# How progress is shown: KIT_PROGRESS=auto (default) | bar | log | off (1 = bar, 0 = off, as
# before); KIT_PROGRESS_INTERVAL = seconds between log lines (default 5).
PROGRESS_MODES = ("auto", "bar", "log", "off")
PROGRESS_INTERVAL_S = 5.0


def progress_mode(stream=None) -> str:
    """``bar``, ``log`` or ``off``: how :func:`progress` shows loops now.

    ``auto`` gives a bar on a terminal or in a Jupyter kernel with ipywidgets (where
    ``tqdm.autonotebook`` renders a widget), and a log line every ``KIT_PROGRESS_INTERVAL`` seconds
    elsewhere: a ``!an2dl-kit`` cell, a CI log or ``nohup``, where a bar's carriage returns
    would be one unreadable line.
    """
    import sys

    value = os.environ.get("KIT_PROGRESS", "auto").strip().lower() or "auto"
    value = {"1": "bar", "0": "off", "true": "bar", "false": "off"}.get(value, value)
    if value not in PROGRESS_MODES:
        raise KitError(f"KIT_PROGRESS={os.environ['KIT_PROGRESS']!r}: use one of "
                       f"{', '.join(PROGRESS_MODES)} (or unset it)")
    if value != "auto":
        return value
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return "bar"
    if in_jupyter():
        # tqdm.autonotebook draws a widget with ipywidgets; without it, a text bar whose cursor
        # moves (nested bars) come out as stray escape codes in the cell: log lines instead.
        import importlib.util

        return "bar" if importlib.util.find_spec("ipywidgets") is not None else "log"
    return "log"


def progress_interval() -> float:
    """Seconds between two log lines (``KIT_PROGRESS_INTERVAL``, default 5)."""
    text = os.environ.get("KIT_PROGRESS_INTERVAL", "").strip()
    if not text:
        return PROGRESS_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise KitError(f"KIT_PROGRESS_INTERVAL={text!r}: give a number of seconds > 0 "
                       "(or unset it)")
    return value


def in_jupyter() -> bool:
    """True inside a Jupyter kernel (notebook, lab, Colab, Kaggle, VS Code), as
    tqdm.autonotebook sees it."""
    import sys

    if "ipykernel.zmqshell" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "qt" not in type(shell).__name__.lower()


def progress(iterable=None, **kwargs):
    """A progress bar over ``iterable`` (tqdm's arguments: ``desc``, ``total``, ``unit``, ...).

    On a terminal or in Jupyter: ``tqdm.autonotebook`` (a widget in a notebook). Elsewhere
    (stderr piped, e.g. a ``!an2dl-kit`` notebook cell or a log file): one plain line every
    few seconds (:func:`progress_interval`) while the loop runs, and a last one when it ends;
    a loop shorter than the interval prints nothing. ``KIT_PROGRESS`` forces a mode
    (:func:`progress_mode`).

    Every mode, ``off`` included, makes exactly one iterator of ``iterable``, when the loop
    starts: the display never changes what a loop computes (a seeded DataLoader draws from
    its generator each time an iterator of it is made).
    """
    import sys

    mode = progress_mode()
    if mode == "log":
        return _log_progress_class()(iterable, interval=progress_interval(), file=sys.stderr,
                                     **kwargs)
    import warnings

    with warnings.catch_warnings():
        # tqdm.autonotebook warns once when a notebook lacks ipywidgets, then draws a text
        # bar: fine. Not tqdm.auto: its asyncio mixin calls iter(iterable) in __init__, even
        # disabled, and the loop then makes a second iterator. For a DataLoader that is a
        # second draw of its seeded generator (shared with the sampler: another order of
        # the batches) and, with workers, a round of them started for nothing.
        warnings.simplefilter("ignore")
        from tqdm.autonotebook import tqdm
    return tqdm(iterable, disable=mode == "off", dynamic_ncols=True, **kwargs)


class _DropBlank:
    """File wrapper that drops the blank writes (``\\r``, ``\\n``) tqdm makes around a bar."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.strip():
            self.stream.write(text)
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


_LOG_CLASS = None


def _log_progress_class():
    """tqdm subclass that prints a full line per refresh instead of redrawing a bar."""
    global _LOG_CLASS
    if _LOG_CLASS is not None:
        return _LOG_CLASS
    from tqdm.std import tqdm

    class LogProgress(tqdm):
        monitor_interval = 0  # no monitor thread: it only shortens miniters, fixed at 1 here

        def __init__(self, iterable=None, interval: float = PROGRESS_INTERVAL_S, file=None,
                     **kwargs):
            for key in ("dynamic_ncols", "ncols", "position", "ascii", "colour"):
                kwargs.pop(key, None)  # bar geometry means nothing in a log
            # delay = interval: a loop that ends sooner prints nothing; mininterval: at most
            # one line per interval; miniters=1: time alone decides when.
            super().__init__(iterable, file=_DropBlank(file), mininterval=interval,
                             delay=interval, miniters=1, **kwargs)

        def display(self, msg=None, pos=None):
            if msg is not None:  # tqdm clears a bar with msg="": nothing to clear in a log
                return True
            if self.n == getattr(self, "_logged_n", None):
                return True  # the closing line would repeat the last periodic one
            self._logged_n = self.n
            self.fp.write(self.log_line() + "\n")
            return True

        def log_line(self) -> str:
            d = self.format_dict
            rate = d["rate"] if d["rate"] else (d["n"] / d["elapsed"] if d["elapsed"] else 0)
            unit = d["unit"] or "it"
            desc = f"{d['prefix']}: " if d["prefix"] else ""
            fmt = self.format_interval
            if d["total"]:
                left = (d["total"] - d["n"]) / rate if rate else None
                pct = 100 * d["n"] / d["total"]
                return (f"{desc}{d['n']}/{d['total']} {unit} ({pct:.0f}%), "
                        f"{fmt(d['elapsed'])} elapsed, "
                        f"{fmt(left) if left is not None else '?'} left, {rate:.3g} {unit}/s")
            return f"{desc}{d['n']} {unit}, {fmt(d['elapsed'])} elapsed, {rate:.3g} {unit}/s"

    _LOG_CLASS = LogProgress
    return LogProgress
