"""What the generator really drew, for ``bench noise``: every image's drawn class, written label
and whether that label is bad (flipped, or a cartoon's), recomputed from the generated set's
plan; the flips' counts and the test ceiling they set; how well cv's label-issue flags find
the flipped labels.

Pandas, sklearn and the training modules are imported in the functions that use them: a bench
module is imported to build its ``--help`` (kit/bench/__init__.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from kit.bench.heldout import read_table
from kit.utils import KitError


def drawn_labels(data) -> dict:
    """What the generator drew for every image of ``data``, recomputed from its plan: per
    split (``train``, ``test``) a frame indexed by ``sample_index`` with ``kind`` (real, green,
    cartoon), ``drawn`` (the class its pixels show; a cartoon's label is meaningless),
    ``written`` (the label in the label files: differs from ``drawn`` where ``label_noise``
    flipped it) and ``bad`` (flipped, or a cartoon).

    The plan is a pure function of ``demo.json``'s arguments; the written labels are checked
    against the label files, so a generator that no longer reproduces its plan fails here.
    """
    import pandas as pd

    from kit.data import synth

    data = Path(data)
    meta = json.loads((data / synth.META_JSON).read_text())
    plan = synth.make_plan(meta["n_train"], meta["n_test"], meta["short_side"], meta["seed"],
                           meta.get("n_cartoon"), meta.get("n_green"), meta.get("long_side_max"),
                           meta.get("n_test_green", 1), class_counts=meta.get("class_counts"),
                           label_noise=float(meta.get("label_noise", 0.0)))
    df = pd.DataFrame([{"split": it.split, "sample_index": it.name, "kind": it.kind,
                        "drawn": it.label, "written": it.written} for it in plan])
    files = {"train": data / "train_labels.csv", "test": data / synth.TEST_LABELS_CSV}
    for split, path in files.items():
        if not path.is_file():
            continue
        given = read_table(path).set_index("sample_index").label
        mine = df[df.split == split].set_index("sample_index").written
        if not given.sort_index().equals(mine.sort_index()):
            raise KitError(f"{data}: the generator's plan no longer gives the labels in "
                           f"{path.name}; bench noise cannot tell which labels were flipped")
    # A cartoon's label carries nothing: a bad label wherever it is left in the folds.
    df["bad"] = (df.drawn != df.written) | (df.kind == "cartoon")
    # The two splits reuse file names: one frame each, indexed by them.
    return {split: df[df.split == split].set_index("sample_index") for split in ("train", "test")}


def noise_counts(plan) -> dict:
    """How many labels the generator flipped, per split, and the test ceiling: the macro F1
    on the held-back labels of a model that predicts every test image's drawn class (the
    flipped test labels cap what any model scores)."""
    from kit.metrics import macro_f1

    real = plan["train"][plan["train"].kind != "cartoon"]
    test = plan["test"]
    return {"train_flipped": int((real.drawn != real.written).sum()), "train_real": int(len(real)),
            "test_flipped": int((test.drawn != test.written).sum()), "test": int(len(test)),
            "test_ceiling": macro_f1(test.written.tolist(), test.drawn.tolist())}


def flag_quality(run_dir: Path, plan) -> dict:
    """The label-issue flags of a run (``fold_k/label_issues.csv``: each outer fold's verdict
    on its own training images) against the labels the generator flipped.

    Counts are summed over the folds (an image is assessed by every fold it trains in):
    ``flagged`` of ``assessed``, ``bad`` (a flipped label, or a cartoon left in the folds)
    among them, ``precision`` = bad share of the flagged, ``recall`` = flagged share of the
    bad, ``base_rate`` = bad share of the assessed (what random flags would reach), and
    ``quality_auc``: how well cleanlab's label quality ranks bad below good labels (ROC AUC;
    0.5 = no better than chance). ``{"recorded": False}`` when cv wrote no per-fold file.
    """
    import numpy as np
    import pandas as pd

    from kit.training.label_issues import FILE

    files = sorted(Path(run_dir).glob(f"fold_*/{FILE}"))
    if not files:
        return {"recorded": False}
    df = pd.concat([read_table(f) for f in files], ignore_index=True)
    bad = plan["train"].loc[df.sample_index, "bad"].to_numpy(bool)
    flagged = df.flagged.astype(int).to_numpy(bool)
    tp = int((bad & flagged).sum())
    out = {"recorded": True, "folds": len(files), "assessed": int(len(df)),
           "flagged": int(flagged.sum()), "bad": int(bad.sum()), "true_flags": tp,
           "share_flagged": float(flagged.mean()) if len(df) else math.nan,
           "precision": tp / int(flagged.sum()) if flagged.any() else math.nan,
           "recall": tp / int(bad.sum()) if bad.any() else math.nan,
           "base_rate": float(bad.mean()) if len(df) else math.nan,
           "quality_auc": math.nan}
    if 0 < bad.sum() < len(bad):
        from sklearn.metrics import roc_auc_score

        out["quality_auc"] = float(roc_auc_score(bad, -df.quality.to_numpy(np.float64)))
    return out
