"""Tuned parameters for ``cv --params``: what they were tuned for, and what still applies.

A ``best.yaml`` is tuned on one *training path*: the ``features`` objective trains heads on
cached embeddings of a fully frozen backbone (cv's ``feature_cache`` path); the ``full``
objective trains as cv does (usually ``pixels``: trainable norm layers, colour jitter,
CutMix). The optimisation settings found on one path (learning rate, weight decay, epochs,
...) are about *that* optimisation problem: a head alone on fixed vectors learns at another
rate than norm layers plus a head on augmented pixels. So when cv trains on another path
than the file was tuned on, only the keys that mean the same thing on both paths are carried
over (:data:`PATH_FREE`); the others are dropped and named, with the two ways to get them
tuned for this path.

:func:`resolve` also describes where the parameters come from (``params_source`` in
``runs/<bb>/metrics.json``): a score picked as the best of N trials on the very folds cv
then scores makes cv's OOF score optimistic, so such parameters are marked ``honest: false``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kit.config import Layered
from kit.schema import path_free as schema_path_free
from kit.training.settings import train_config, training_path
from kit.utils import KitError, read_yaml

OBJECTIVES = ("features", "full")
# What each tune objective trains, as cv's training path.
OBJECTIVE_PATH = {"features": "feature_cache"}
PATH_WORDS = {"feature_cache": "heads on cached embeddings of a frozen backbone",
              "pixels": "pixels (trainable backbone parts, pixel augmentation, CutMix)"}

# Which keys mean the same thing on both training paths is declared with each key in the
# schema (kit.schema.training, path_free=True): the head's architecture, the loss and decision
# settings, test-time views, the input pipeline, how epochs are chosen, speed-only settings, and
# the keys that decide the path itself. Pixel augmentation (augment.*) means the same on pixels
# and is not applied on the cache path either way (cv says so). Everything else (lr,
# weight_decay, epochs, patience, warmup_epochs, min_lr_ratio, batch_size, lr_decay, any future
# key) describes one optimisation problem and is dropped when the path changes; head.type is
# bound to the path (the linear probe exists on cached embeddings only).
# A file with one of these keys was written by ./run.sh tune (a hand-written params file has
# only `params:`).
_TUNE_KEYS = ("trial", "study", "search_score", "score")


def path_free(key: str) -> bool:
    """Whether dotted key ``key`` means the same thing on every training path."""
    return schema_path_free(key)


def split_for_path(params: dict) -> tuple[dict, dict]:
    """``(kept, dropped)``: the keys of ``params`` that carry to another path, and the rest."""
    kept = {k: v for k, v in params.items() if path_free(k)}
    return kept, {k: v for k, v in params.items() if k not in kept}


def source_path(record: dict, params: dict, settings: Layered) -> str | None:
    """The training path a params file was tuned on: its ``training_path``, else what its
    objective trains (``full`` trains as cv does with these params), else None."""
    if record.get("training_path"):
        return str(record["training_path"])
    objective = record.get("objective")
    if objective in OBJECTIVE_PATH:
        return OBJECTIVE_PATH[objective]
    if objective == "full":
        return target_path(Layered(settings.defaults), params, True)
    return None


def target_path(settings: Layered, params: dict, feature_cache: bool = True) -> str:
    """The path cv takes with ``settings`` and ``params`` (dotted)."""
    return training_path(train_config(settings, params, feature_cache), feature_cache)


@dataclass
class Resolved:
    """What :func:`resolve` found: the params that apply and where they come from."""

    params: dict
    description: str
    source: dict
    dropped: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve(spec, paths, backbone: str, settings: Layered | None = None,
            feature_cache: bool = True, folds_sha256: str | None = None) -> Resolved:
    """Params for cv from ``--params`` (``tuned``, ``best``, ``none``, a file or a dict).

    Parameters
    ----------
    spec : str, dict or None
        ``tuned`` uses ``runs/tune/<bb>/best.yaml`` when it exists, ``best`` requires it,
        ``none`` (or None) uses nothing, a path reads that file, a dict is taken as given.
    paths : kit.paths.Paths
    backbone : str
    settings : kit.config.Layered
        cv's settings (defaults and command-line overrides): with the params they decide
        cv's path.
    feature_cache : bool
        cv's ``feature_cache`` flag (``--no-feature-cache`` = False).
    folds_sha256 : str, optional
        The current folds file's hash: params tuned on it make cv's OOF score optimistic.

    Returns
    -------
    Resolved
        ``params`` to apply (keys tuned for another path dropped), a one-line
        ``description``, ``source`` (``params_source`` of metrics.json), ``dropped`` and
        ``notes`` (lines to print).
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "none"):
        return Resolved({}, "none", {"spec": "none", "description": "defaults (no params file)",
                                     "honest": True, "why": "no tuned parameters"})
    if isinstance(spec, dict):
        return Resolved(dict(spec), "given", {
            "spec": "given", "description": "given by the caller", "keys": sorted(spec),
            "honest": True, "why": "not from a search on these folds, as far as the kit knows"})
    best = paths.tune_dir(backbone) / "best.yaml"
    if spec in ("tuned", "best"):
        if not best.exists():
            if spec == "best":
                raise KitError(f"--params best: {best} not found; run ./run.sh tune {backbone} "
                               "first, or use --params none")
            desc = f"none ({best} not found)"
            return Resolved({}, desc, {"spec": "tuned", "description": desc, "honest": True,
                                       "why": "no tuned parameters"})
        path = best
    else:
        path = Path(spec)
        if not path.exists():
            raise KitError(f"--params {spec}: no such file; give best, tuned, none or a YAML "
                           "file with a params: mapping of dotted keys")
    data = read_yaml(path)
    params = data.get("params", data)
    if not isinstance(params, dict):
        raise KitError(f"{path}: params must be a mapping of dotted config keys to values")
    params = dict(params)
    return _fit(path, spec if spec in ("tuned", "best") else "file", data, params, paths,
                backbone, settings, feature_cache, folds_sha256)


def _fit(path: Path, spec: str, data: dict, params: dict, paths, backbone: str,
         settings: Layered, feature_cache: bool, folds_sha256: str | None) -> Resolved:
    """Keep the keys of ``params`` that fit cv's path; describe the file."""
    tuned = any(k in data for k in _TUNE_KEYS)
    notes = []
    record = dict(data)
    assumed = False
    if tuned and record.get("objective") is None:
        record["objective"], assumed = "features", True
        notes.append(f"{path} records no objective (written by an older kit): taken as "
                     "features, the default (heads on cached embeddings)")
    elif record.get("objective") is not None and record["objective"] not in OBJECTIVES:
        raise KitError(f"{path}: objective must be one of {', '.join(OBJECTIVES)} (got "
                       f"{record['objective']!r}); fix the file or rerun ./run.sh tune")
    try:
        src = source_path(record, params, settings)
        dst = target_path(settings, params, feature_cache)
    except KitError as exc:  # e.g. an unknown key: name the file it came from
        raise KitError(f"{path}: {exc}; keys are cv's dotted config keys (head.depth, lr, "
                       "augment.cutmix_alpha, ...)") from None
    kept, dropped = (split_for_path(params) if src is not None and src != dst
                     else (dict(params), {}))
    if dropped:
        notes.append(
            f"{path} was tuned for {src} ({PATH_WORDS.get(src, src)}); this cv trains on {dst} "
            f"({PATH_WORDS.get(dst, dst)}): dropped {', '.join(sorted(dropped))} (tuned for "
            f"the other path), kept {', '.join(sorted(kept)) or 'nothing'}. To use values tuned "
            f"for this path: --train-norm none (train on the cache, as tuned) or ./run.sh tune "
            f"{backbone} --objective full")
    same_folds = None
    if tuned:
        recorded = record.get("folds_sha256")
        # An older best.yaml does not say which folds it was tuned on: assume these.
        same_folds = True if recorded is None or folds_sha256 is None \
            else recorded == folds_sha256
    selected = bool(tuned and same_folds and kept)
    source = {
        "spec": spec, "path": str(path), "tuned": tuned,
        "objective": record.get("objective"), "objective_assumed": assumed,
        "source_path": src, "target_path": dst,
        "score": _num(record.get("search_score", record.get("score"))),
        "score_kind": record.get("search_score_kind") or (
            "search: best of the trials on these folds (optimistic)" if tuned else None),
        "holdout_score": _num(record.get("holdout_score")),
        "trials": record.get("trials"), "trial": record.get("trial"),
        "early_stopping": record.get("early_stopping"),
        "tuned_on_same_folds": same_folds,
        "kept": sorted(kept), "dropped": sorted(dropped),
        "honest": not selected,
        "why": (f"chosen as the best of {record.get('trials') or 'N'} trials scored on these "
                "folds' OOF rows: cv's OOF score on them is optimistic" if selected else
                "tuned on another folds file" if tuned and same_folds is False else
                "every tuned key was dropped for this path" if tuned else
                "a hand-written params file, not a search on these folds"),
    }
    estimate = paths.tune_dir(backbone) / "estimate.json"
    if tuned and estimate.is_file():
        import json

        try:
            est = json.loads(estimate.read_text())
            # "score" (the task's metric) since tasks; an older file's is its macro F1.
            source["estimate"] = {"metric": est.get("metric", "macro_f1"),
                                  "score": _num(est.get("score", est.get("macro_f1"))),
                                  "macro_f1": _num(est.get("macro_f1")), "file": str(estimate),
                                  "objective": est.get("objective")}
        except ValueError:
            pass  # a damaged estimate is reported by the report, not here
    desc = f"{path} ({len(kept)} values" + (f", {len(dropped)} dropped for {dst}" if dropped
                                            else "") + ")"
    source["description"] = desc
    return Resolved(kept, desc, source, dropped, notes)


def _num(value):
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
