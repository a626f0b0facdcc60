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
        raise KitError(f"{path}: file not found")
    except yaml.YAMLError as exc:
        raise KitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix or delete it")
    if not isinstance(data, dict):
        raise KitError(f"{path}: expected a mapping at the top level")
    return data


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


def progress(iterable=None, **kwargs):
    """tqdm progress bar on stderr; hidden when stderr is not a terminal unless KIT_PROGRESS=1."""
    import sys

    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() or os.environ.get("KIT_PROGRESS") == "1")
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
