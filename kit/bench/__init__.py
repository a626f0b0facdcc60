"""Benchmarks run by ``./run.sh bench <what>``: one module per subject.

Each module exposes ``add_arguments(parser)`` and ``run(args)`` (the CLI's common options
``--data``, ``--workdir`` and ``--seed`` are already on the parser). Keep top-level imports
light: the module is imported to build its ``--help``.
"""
