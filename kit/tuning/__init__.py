"""Tuning: the ``tune`` stage, an Optuna search of head and augmentation settings per
backbone, on top of training's loop and embedding cache.

:mod:`kit.tuning.tune` runs a study over the space :mod:`kit.tuning.search_space` declares
(YAML, one place per backbone) and writes ``runs/tune/<bb>/best.yaml`` for ``cv --params``;
:mod:`kit.tuning.storage` says where studies live (SQLite, an RDB URL, a journal file) and
:mod:`kit.tuning.workers` runs one worker process per GPU on one storage
(``tune --workers/--gpus``).
"""
