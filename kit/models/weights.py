"""Weights lookup: where a backbone's weights come from, and loading them strictly.

``--weights`` (``create_backbone(name, weights=...)``) takes one of three forms:

- ``auto``: pretrained weights, looked for in this order (:func:`find_pretrained`):

  1. ``$KIT_WEIGHTS_DIR/<name>``: a folder, or a ``<name>.safetensors`` / ``.pth`` /
     ``.pt`` / ``.bin`` file beside it;
  2. the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
     ``~/.cache/huggingface/hub``: :func:`hf_cache_dir`);
  3. for timm models with a download URL, torch's hub cache
     (``<torch.hub.get_dir()>/checkpoints``);
  4. a download through the hub client, after a short probe (``DOWNLOAD_TIMEOUT_S``) so an
     unreachable hub does not stall the run; skipped when ``HF_HUB_OFFLINE`` or
     ``TRANSFORMERS_OFFLINE`` is set.

  With nothing found, one :class:`~kit.utils.KitError` on one line names every place looked
  in, why nothing was downloaded, and how to fetch the weights on a machine with internet;
  for a gated repository it also says how to accept the licence and log in. There is never
  a silent fallback to random weights. (The tiny test backbones have no pretrained weights:
  for them ``auto`` means random, decided in :mod:`kit.models.backbones`.)
- a path (:func:`weights_path`): a state-dict file (``.safetensors``, ``.pth``, ``.bin``)
  or a folder (:data:`WEIGHT_FILES` inside it, or a ``save_pretrained`` folder for the
  transformers ViTs).
- ``random``: explicit random initialisation.

:func:`load_module_weights` loads a state dict strictly: a file for another architecture
is an error, never a half-random model.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from kit.utils import KitError

# Weight file names looked for inside a folder, in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt", "model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Weight files of a Hugging Face repository, in order of preference (cache and download).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DOWNLOAD_TIMEOUT_S = 10  # the hub probe; an unreachable hub must not stall "auto" for long


# --------------------------------------------------------------------------- weight files
def weights_path(name: str, weights) -> Path | None:
    """The path ``weights`` names, or ``None`` for the keywords.

    Parameters
    ----------
    name : str
        Backbone name (for messages).
    weights : {"auto", "random"} or path

    Returns
    -------
    Path or None
        ``None`` for ``auto`` and ``random``, else the resolved existing path.

    Raises
    ------
    KitError
        When the path does not exist.
    """
    if str(weights) in ("auto", "random"):
        return None
    path = Path(weights).expanduser()
    if not path.exists():
        raise KitError(f"{name}: weights {path} not found; pass an existing file or folder, "
                       "'auto' (pretrained) or 'random'")
    return path.resolve()


def weight_file(name: str, path: Path) -> Path:
    """The weight file for ``path``: itself, or the first of :data:`WEIGHT_FILES` inside it.

    Raises
    ------
    KitError
        When the folder holds none of :data:`WEIGHT_FILES`.
    """
    if path.is_file():
        return path
    for fname in WEIGHT_FILES:
        if (path / fname).is_file():
            return path / fname
    raise KitError(f"{name}: no weight file in {path} (looked for {', '.join(WEIGHT_FILES)})")


def read_state_dict(name: str, file: Path) -> dict:
    """The state dict in ``file``, read with timm's loader (``weights_only``).

    A ``state_dict``/``model`` wrapper and ``module.`` prefixes are removed (timm), and so
    is a ``model.`` prefix on every key (a state dict saved from the kit's ``Backbone``).

    Raises
    ------
    KitError
        When the file cannot be read or holds no state dict.
    """
    from timm.models import load_state_dict  # unwraps 'state_dict'/'model', strips 'module.'

    try:
        sd = load_state_dict(str(file), weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to fix
        raise KitError(f"{name}: cannot read weights {file}: {first_line(exc)}") from None
    if not isinstance(sd, dict) or not sd:
        raise KitError(f"{name}: {file} holds no state dict")
    # A state dict saved from the kit's Backbone wrapper has every key under "model.".
    if all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return sd


def load_module_weights(module: nn.Module, path: Path, name: str, ignore=()) -> None:
    """Load the weights at ``path`` (file or folder) into ``module`` strictly.

    Parameters
    ----------
    module : nn.Module
        Loaded in place.
    path : Path
        A weight file, or a folder (see :func:`weight_file`).
    name : str
        Backbone name (for messages).
    ignore : sequence of str
        Key prefixes dropped from the file first (e.g. a classifier head).

    Raises
    ------
    KitError
        When a tensor is missing, unexpected or of another shape: a file for another
        architecture is an error, not a warning.
    """
    file = weight_file(name, path)
    sd = read_state_dict(name, file)
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p + ".") for p in ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise KitError(f"{name}: weights {file} do not fit the model ({len(missing)} tensors "
                       f"missing, {len(unexpected)} unexpected, e.g. {example}); pass a "
                       f"{name} state dict in timm's format or --weights random")
    try:
        module.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise KitError(f"{name}: weights {file} have tensors of another shape: "
                       f"{first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name if empty), at most 300 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------- "auto" lookup
def hf_cache_dir() -> Path:
    """The hub cache as huggingface_hub resolves it, read now (tests change the env)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return xdg / "huggingface" / "hub"


def _offline() -> str | None:
    """The name of the variable that forbids downloads, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    return None


def local_weights(name: str) -> Path | None:
    """``$KIT_WEIGHTS_DIR/<name>`` (folder or weight file) when it is there, else None: what
    ``./run.sh all`` without runs trains."""
    return _local_weights(name)[0]


def _local_weights(name: str) -> tuple[Path | None, str]:
    """``$KIT_WEIGHTS_DIR/<name>`` (folder or ``<name>.<suffix>`` file) and a description."""
    root = os.environ.get("KIT_WEIGHTS_DIR")
    if not root:
        return None, f"$KIT_WEIGHTS_DIR/{name} (KIT_WEIGHTS_DIR is not set)"
    base = Path(root).expanduser() / name
    for candidate in (base, *(base.with_name(name + s) for s in WEIGHT_SUFFIXES)):
        if candidate.exists():
            return candidate.resolve(), str(base)
    return None, f"{base} (absent)"


def _from_hf_cache(repo: str, cache: Path, need_config: bool) -> Path | None:
    """The cached weight file of ``repo`` (its snapshot folder when ``need_config``), or None."""
    from huggingface_hub import try_to_load_from_cache

    def cached(fname):
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache)
        return Path(hit) if isinstance(hit, str) else None

    weight = next((p for p in map(cached, HUB_WEIGHT_FILES) if p), None)
    if weight is None:
        return None
    if not need_config:
        return weight
    config = cached("config.json")
    return weight.parent if config is not None and config.parent == weight.parent else None


def _download(repo: str, cache: Path, need_config: bool) -> Path:
    """Download ``repo``'s weights (and configs when ``need_config``) into ``cache``."""
    from huggingface_hub import hf_hub_download, model_info

    # A short probe first: an unreachable hub fails here within DOWNLOAD_TIMEOUT_S.
    names = {s.rfilename for s in (model_info(repo, timeout=DOWNLOAD_TIMEOUT_S).siblings or [])}
    weight = next((f for f in HUB_WEIGHT_FILES if f in names), None)
    if weight is None:
        raise RuntimeError(f"{repo} has neither model.safetensors nor pytorch_model.bin")
    path = Path(hf_hub_download(repo, weight, cache_dir=cache, etag_timeout=DOWNLOAD_TIMEOUT_S))
    if not need_config:
        return path
    for extra in ("config.json", "preprocessor_config.json"):
        if extra in names:
            hf_hub_download(repo, extra, cache_dir=cache, etag_timeout=DOWNLOAD_TIMEOUT_S)
    return path.parent


def find_pretrained(name: str, repo: str, need_config: bool, url: str | None = None,
                    gated: bool = False) -> tuple[Path, str]:
    """Path and source of pretrained weights for ``weights="auto"``, or one clear KitError.

    Parameters
    ----------
    name : str
        Backbone name: ``$KIT_WEIGHTS_DIR/<name>`` and the advice's ``--local-dir``.
    repo : str
        Hugging Face repository of the weights.
    need_config : bool
        The loader needs ``config.json`` beside the weights (transformers models): the
        result is then a folder.
    url : str, optional
        timm's download URL: its file name is looked for in torch's hub cache.
    gated : bool
        The repository needs each user to accept its licence; the message says how.

    Returns
    -------
    path : Path
        The weight file or folder.
    source : str
        ``local:PATH``, ``hf-cache:REPO``, ``timm-cache:PATH`` or ``hub:REPO``.

    Raises
    ------
    KitError
        Nothing found: one line naming every place looked in and how to fetch the weights.
    """
    local, where = _local_weights(name)
    if local is not None:
        return local, f"local:{local}"
    looked = [where]
    cache = hf_cache_dir()
    hit = _from_hf_cache(repo, cache, need_config)
    if hit is not None:
        return hit, f"hf-cache:{repo}"
    looked.append(f"the Hugging Face cache {cache} ({repo} not there)")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if cached.is_file():
            return cached, f"timm-cache:{cached}"
        looked.append(f"the timm/torch cache {cached} (absent)")
    offline = _offline()
    if offline:
        why = f"{offline} is set, so nothing was downloaded"
    else:
        try:
            return _download(repo, cache, need_config), f"hub:{repo}"
        except Exception as exc:  # no network, proxy, gated repo...: all end in the same advice
            why = f"downloading {repo} failed ({first_line(exc)})"
    licence = ""
    if gated:
        licence = (f"{repo} is gated: sign in at https://huggingface.co/{repo} and accept its "
                   "licence there (access may need the owner's approval), then log in where "
                   "you download with `hf auth login` or an HF_TOKEN access token. ")
    raise KitError(
        f"{name}: no pretrained weights found: looked in {'; '.join(looked)}; {why}. {licence}"
        f"Fetch them on a machine with internet: `hf download {repo} --local-dir {name}` "
        f"(older clients: `huggingface-cli download {repo} --local-dir {name}`), copy the "
        f"folder here and pass --weights PATH/{name} or set KIT_WEIGHTS_DIR=PATH; or copy that "
        f"machine's Hugging Face cache to {cache}; --weights random trains from scratch")
