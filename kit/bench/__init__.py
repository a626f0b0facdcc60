"""Benchmarks run by ``./run.sh bench <what>``: one module per subject, registered in
:data:`BENCHES` (``kit/commands/bench.py`` dispatches on it; ``./run.sh --help`` lists it).

Each module exposes ``add_arguments(parser)`` and ``run(args)`` (the CLI's common options
``--data``, ``--workdir`` and ``--seed`` are already on the parser). Keep top-level imports
light: the module is imported to build its ``--help``. The other modules here are shared
pieces of the benches (``heldout``, ``label_truth``, ``noise_summary``, ``gpu_report``).
"""

# name -> one-line help; the module is kit.bench.<name>
BENCHES = {
    "patches": "patch extraction vs plain PNG decoding of the same files",
    "train": "training throughput of the backbones",
    "tune": "Optuna trials throughput",
    "blend": "blend search and submission writing",
    "gpu": "CUDA paths: short cv with AMP, CPU/GPU agreement, loop and embedding throughput",
    "honesty": "|OOF - test| macro F1 per training path and early-stopping mode, on generated data",
    "noise": "label_issues, bag and head levers vs a baseline on noisy generated labels (test F1)",
    "regions": "patches select per_region vs top_k on generated data (test F1, OOF - test)",
}
