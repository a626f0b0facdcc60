"""One ``tune`` run's resolved arguments, as one value: what every backbone's study and every
worker process of ``--workers/--gpus`` (as JSON) runs with."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kit.config import Layered
from kit.paths import Paths
from kit.task import Data, parse_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneJob:
    """The arguments of :func:`kit.tuning.tune.run_tune`, built once by it.

    ``cfg`` is the resolved ``tune`` config, ``settings`` the training settings the trials
    start from (:func:`kit.config.train_settings`: the defaults and the user's ``train``
    overrides, ``--set train.KEY=VALUE``); ``data`` the dataset (a :class:`kit.task.Data`, a
    root, or None), whose task gives the classes and the metric; the other fields are
    ``run_tune``'s keyword arguments.
    """

    paths: Paths
    data: object
    cfg: dict
    settings: Layered
    backbones: tuple[str, ...] = ()
    study_suffix: str | None = None
    space_file: str | None = None
    warm_start_from: str | None = None
    weights: str = "auto"
    seed: int = 42
    device: str | None = None
    create_only: bool = False
    estimate: bool = False

    def trial_settings(self) -> Layered:
        """The settings every trial resolves its params against: the user's overrides merged
        into the defaults, so that a trial's params (the searched values) go over them, where
        cv's own overrides would go over the params (:func:`kit.config.Layered.resolve`)."""
        return Layered(self.settings.resolve())

    def to_json(self, **changes) -> str:
        """The job (with ``changes``) as JSON: a worker's payload (the task travels as its
        content, so a worker reads the same task whatever ``--task`` named)."""
        job = replace(self, **changes)
        plain = {f.name: getattr(job, f.name) for f in fields(job)}
        data = job.data
        plain.update(paths=str(job.paths.root), settings=asdict(job.settings),
                     backbones=list(job.backbones),
                     data=None if data is None else str(data),
                     space_file=None if job.space_file is None else str(job.space_file))
        if isinstance(data, Data):
            source = data.task.source
            plain["task"] = {"content": data.task.to_dict(), "builtin": data.task.builtin,
                             "source": None if source is None else str(source)}
        return json.dumps(plain)

    @classmethod
    def from_json(cls, text: str) -> "TuneJob":
        """The job :meth:`to_json` wrote."""
        plain = json.loads(text)
        task = plain.pop("task", None)
        data = plain["data"]
        if task is not None and data is not None:
            data = Data(data, parse_task(task["content"], task["source"],
                                         builtin=task["builtin"]))
        return cls(**{**plain, "data": data, "paths": Paths.from_root(Path(plain["paths"])),
                      "settings": Layered(**plain["settings"]),
                      "backbones": tuple(plain["backbones"])})


def dotted(overrides: dict, prefix: str = "") -> dict:
    """Nested overrides as ``{dotted key: value}`` (``{"head": {"depth": 2}}`` ->
    ``{"head.depth": 2}``)."""
    out = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def note_searched(bb: str, space, settings: Layered) -> list[str]:
    """Log one line naming the user's training overrides (``--set train.KEY``) that the
    search space sets itself (searched or fixed there): each trial's value wins over them.
    Returns those keys."""
    clash = sorted(k for k in dotted(settings.overrides) if k in space.params)
    if clash:
        log.info(f"tune {bb}: {', '.join(f'train.{k}' for k in clash)} "
                 f"{'is' if len(clash) == 1 else 'are'} in the search space: each trial uses "
                 "its own value, not the one given (--set/--config train:); the other train "
                 "settings given apply to every trial")
    return clash
