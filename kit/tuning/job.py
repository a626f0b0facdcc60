"""One ``tune`` run's resolved arguments, as one value: what every backbone's study and every
worker process of ``--workers/--gpus`` (as JSON) runs with."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kit.config import Layered
from kit.paths import Paths


@dataclass(frozen=True)
class TuneJob:
    """The arguments of :func:`kit.tuning.tune.run_tune`, built once by it.

    ``cfg`` is the resolved ``tune`` config, ``settings`` the training settings the trials
    start from (:func:`kit.config.train_settings`); the other fields are ``run_tune``'s
    keyword arguments.
    """

    paths: Paths
    data: str | None
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

    def to_json(self, **changes) -> str:
        """The job (with ``changes``) as JSON: a worker's payload."""
        job = replace(self, **changes)
        plain = {f.name: getattr(job, f.name) for f in fields(job)}
        plain.update(paths=str(job.paths.root), settings=asdict(job.settings),
                     backbones=list(job.backbones),
                     data=None if job.data is None else str(job.data),
                     space_file=None if job.space_file is None else str(job.space_file))
        return json.dumps(plain)

    @classmethod
    def from_json(cls, text: str) -> "TuneJob":
        """The job :meth:`to_json` wrote."""
        plain = json.loads(text)
        return cls(**{**plain, "paths": Paths.from_root(Path(plain["paths"])),
                      "settings": Layered(**plain["settings"]),
                      "backbones": tuple(plain["backbones"])})
