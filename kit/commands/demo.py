"""``./run.sh demo``: generate the demo dataset and run every stage on it.

A plain sequence of the public stage functions, writing under ``runs/demo/`` only. The stages'
modules are imported in the functions that call them: ``./run.sh demo --help`` stays fast.

``--task LAYOUT`` generates the data in another competition's layout instead
(:func:`kit.data.task_synth.write_task_dataset`: ``imagefolder``, ``csv``, ``csv_masks``, each
with its ``task.yaml``) under ``runs/demo-<layout>/`` and runs the same stages on it, reading
the task as any dataset's.
"""
from __future__ import annotations

from pathlib import Path

from kit.config import load_config, train_settings
from kit.paths import Paths
from kit.task import as_data
from kit.utils import KitError

OUT = "runs/demo"
LAYOUTS = ("imagefolder", "csv", "csv_masks")  # kit.data.task_synth.LAYOUTS, without importing it


def add_arguments(parser):
    parser.add_argument("--out", default=None,
                        help="work directory for the demo (default: runs/demo, with --task "
                             "runs/demo-<layout>)")
    # The common --task names a task file elsewhere; here the demo writes the task with its
    # data, so it names the layout (and $KIT_TASK, meant for real data, is not read).
    task = next(a for a in parser._actions if "--task" in a.option_strings)
    task.default, task.metavar = None, "LAYOUT"
    task.help = ("generate the demo data in another competition's layout, with its task.yaml: "
                 f"{', '.join(LAYOUTS)} (default: AN2DL's layout and task)")
    # Defaults: kit.data.synth's demo preset (120 training and 40 test images, short side 256).
    parser.add_argument("--n-train", type=int, default=None,
                        help="demo training images (default: 120)")
    parser.add_argument("--n-test", type=int, default=None, help="demo test images (default: 40)")
    parser.add_argument("--short-side", type=int, default=None,
                        help="short image side in px (default: 256)")


def run(args) -> int:
    from kit.submission.report import run_report

    if args.task is not None and args.task not in LAYOUTS:
        raise KitError(f"demo --task {args.task}: the demo generates its data in one of the "
                       f"layouts {', '.join(LAYOUTS)}; for your own data run the stages with "
                       "--data DIR --task FILE")
    out = Path(args.out or (OUT if args.task is None else f"{OUT}-{args.task}"))
    paths = Paths.from_root(out)
    given = {"n_train": args.n_train, "n_test": args.n_test, "short_side": args.short_side}
    data = make_data(out / "data", args.task, args.seed,
                     **{k: v for k, v in given.items() if v is not None})
    print(f"demo data      -> {data}" + ("" if data.task.builtin else
                                         f" (task {data.task.name}, layout {args.task})"))
    data_stages(paths, data, args.seed)
    _cv(paths, data, args.seed)
    # A second backbone for the blend: its head tuned on cached embeddings, then cv with the
    # best params (runs/tiny_cnn/ stays the plain, stronger model).
    _tune(paths, data, args.seed)
    _blend(paths, data, args.seed)  # after both cv runs (it reads runs/<bb>/), before the report
    _fusion(paths, data, args.seed)  # after the blend, so that it blends the separate runs only
    # last: the report summarises every stage above
    print(f"report         -> {run_report(paths, data, load_config('report'))}")
    return 0


def make_data(root: Path, layout: str | None, seed: int, **sizes):
    """The demo dataset as a :class:`kit.task.Data`: AN2DL's (``layout`` None) or one of
    :mod:`kit.data.task_synth`'s layouts at the demo's sizes."""
    from kit.data import demo

    if layout is None:
        return as_data(demo.generate(root, seed=seed, **sizes))
    from kit.data.task_synth import write_task_dataset

    sizes = {**{k: v for k, v in demo.synth.PRESETS["demo"].items()
                if k in ("n_train", "n_test", "short_side")}, **sizes}
    return as_data(write_task_dataset(root, layout, seed=seed, **sizes))


def data_stages(paths: Paths, data, seed: int) -> None:
    """clean, patches and folds on ``data``, as their commands run them."""
    from kit.data import clean, folds, patches

    outliers = clean.run_clean(paths, data, load_config("clean"))
    print(f"clean          -> {paths.outliers_csv} ({len(outliers)} flagged), "
          f"{paths.clean_dir / 'review.html'}")
    sets = patches.run_patches(paths, data, load_config("patches"))
    print(f"patches        -> {sets['train'].folder}, {sets['test'].folder}")
    folds.run_folds(paths, data, load_config("folds"), seed=seed, force=True)
    print(f"folds          -> {paths.folds_csv}")


def _oof(metrics: dict, data) -> str:
    """``OOF <metric> <score> [<interval>]`` of a cv run in the task's metric (a run written
    before ``oof_score`` existed: its macro F1)."""
    from kit.metrics import format_ci, get_metric

    if "oof_score" in metrics:
        return (f"OOF {get_metric(as_data(data).task.metric).title} "
                f"{format_ci(metrics['oof_score'], metrics.get('oof_score_ci95'))}")
    return f"OOF macro F1 {format_ci(metrics['oof_macro_f1'], metrics['oof_macro_f1_ci95'])}"


def _tune(paths: Paths, data, seed: int, backbone: str = "tiny_vit", trials: int = 8) -> None:
    """A short search (features objective) and ``cv --params best`` with its result.

    cv keeps the backbone frozen as the features objective does (norm layers too), so it
    trains the heads on the search's embedding cache and reproduces the tuned score.
    """
    from kit.metrics import get_metric
    from kit.training.cv import run_cv
    from kit.tuning.tune import run_tune

    # The demo's own study file: a fresh study each run, as the demo data is regenerated.
    (paths.runs_dir / "optuna.db").unlink(missing_ok=True)
    cfg = load_config("tune", {"objective": "features", "trials": trials})
    best = run_tune(paths, data, cfg, settings=train_settings(), backbones=[backbone], seed=seed,
                    weights="random")[backbone]
    title = get_metric(as_data(data).task.metric).title
    print(f"tune           -> {paths.tune_dir(backbone) / 'best.yaml'} (trial {best['trial']} "
          f"of {trials}, features OOF {title} {best['score']:.4f})")
    metrics = run_cv(paths, data, train_settings(FROZEN_CV), backbone=backbone, params="best",
                     seed=seed, weights="random")
    print(f"cv --params best -> {paths.backbone_dir(backbone)} ({metrics['training_path']}): "
          f"{_oof(metrics, data)}")


# cv of the tuned backbone: nothing in it trains, as in the features objective.
FROZEN_CV = {"train_norm": [], "unfreeze_last": 0}

# A demo-sized budget: tiny_cnn from random weights, every block trained (nothing pretrained
# to keep frozen), six epochs; about a minute on a 2-core CPU.
DEMO_CV = {"epochs": 6, "patience": 0, "lr": 3e-3, "unfreeze_last": 4}


def _cv(paths: Paths, data, seed: int) -> None:
    """Cross-validated tiny_cnn: OOF and test probabilities for the blend."""
    from kit.training.cv import run_cv

    metrics = run_cv(paths, data, train_settings(DEMO_CV), backbone="tiny_cnn", seed=seed,
                     weights="random", params="none")
    n = len(as_data(data).task.classes)
    print(f"cv             -> {paths.backbone_dir('tiny_cnn')} (oof.csv, test.csv, tta/, "
          f"metrics.json): {_oof(metrics, data)} (chance {1 / n:.2f} for {n} classes)")


def _fusion(paths: Paths, data, seed: int, parts: str = "tiny_cnn+tiny_vit") -> None:
    """``cv tiny_cnn+tiny_vit``: one head on both frozen backbones' cached embeddings (tiny_vit's
    cache is tune's); the report sets it against the blend of the separate runs."""
    from kit.training.cv import run_cv

    metrics = run_cv(paths, data, train_settings(), backbone=parts, seed=seed, weights="random",
                     params="none")
    width = metrics["config"]["fusion"]["input_width"]
    print(f"cv (fusion)    -> {paths.backbone_dir(parts)} ({width} features per patch): "
          f"{_oof(metrics, data)}")


def _blend(paths: Paths, data, seed: int) -> None:
    """Blend every backbone the demo trained into a validated submission + manifest."""
    from kit.ensemble.blend import complete_backbones
    from kit.metrics import format_ci, get_metric
    from kit.submission.blend_output import run_blend

    if not complete_backbones(paths):  # only until the cv step runs before this one
        print("blend          skipped: no runs/<backbone>/ with oof.csv, test.csv and "
              "metrics.json yet (./run.sh cv writes them)")
        return
    result = run_blend(paths, data, load_config("blend"), name="demo", seed=seed)
    s = result.scores
    # The task's metric: "score" where the blend names it so, else its macro F1 (as before).
    score = lambda part: part.get("score", part["macro_f1"])  # noqa: E731
    oof = {b: m.get("oof_score", m.get("oof_macro_f1")) for b, m in result.inputs.meta.items()}
    singles = ", ".join(f"{b} {v:.4f}" for b, v in oof.items() if v is not None)
    print(f"blend          -> {result.csv_path} ({len(result.test_labels)} rows, validated), "
          f"{result.manifest_path.name}, {result.latest_csv}")
    label = "expected score" if result.expected["honest"] else \
        "OPTIMISTIC: " + "; ".join(f"{bb}: {', '.join(why)}"
                                   for bb, why in result.expected["why"].items())
    print(f"                  {get_metric(as_data(data).task.metric).title} nested "
          f"{format_ci(score(s['nested']), s['nested'].get('ci95'))} ({label}), "
          f"in-sample {score(s['in_sample']):.4f} (optimistic); single backbones' OOF: "
          f"{singles}")
