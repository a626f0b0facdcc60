"""notebooks/kaggle.ipynb runs end to end in a real Jupyter kernel (nbclient + ipykernel) on
the demo data, on the CPU, with tiny random-weight backbones standing in for Phikon and
EfficientNet-B0 and submit as a dry run: the notebook cannot rot unnoticed."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "kaggle.ipynb"

nbformat = pytest.importorskip("nbformat", reason="nbformat is in requirements.txt (dev)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in requirements.txt (dev)")


def inject(nb, params: dict):
    """Add a cell after the one tagged ``parameters``, as papermill does."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def test_the_notebook_is_parameterised_and_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert 'DATA = "/kaggle/input/an2dl2526c2v2"' in tagged[0].source
    for c in nb.cells:  # committed without outputs: no stale results, no private paths
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None
    text = "\n".join(c.source for c in nb.cells)
    for stage in ("validate", "clean", "patches", "folds", "cv", "tune", "blend", "report",
                  "submit"):
        assert f'an2dl("{stage}"' in text, stage


def _outputs(nb):
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            yield i, out


@pytest.mark.slow
def test_the_notebook_runs_on_the_demo_data(tmp_path, monkeypatch):
    from kit.data import demo

    data = demo.generate(tmp_path / "data", n_train=48, n_test=12, short_side=256, seed=3)
    work = tmp_path / "work"
    # Dummy credentials authenticate offline; submit runs as a dry run and sends nothing.
    monkeypatch.setenv("KAGGLE_USERNAME", "ci-user")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))
    nb = inject(nbformat.read(NOTEBOOK, as_version=4), {
        "DATA": str(data), "WORKDIR": str(work), "KIT_SOURCE": str(ROOT), "INSTALL": False,
        "BACKBONE_A": "tiny_vit", "BACKBONE_B": "tiny_cnn", "WEIGHTS": "random",
        "WEIGHTS_B": "random", "CV_ARGS": ["--epochs", "2", "--train-norm", "none"],
        "TUNE_ARGS": ["--trials", "3"], "SUBMIT": False, "MESSAGE": "ci",
    })
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        (tmp_path / "executed.ipynb").write_text(nbformat.writes(nb))  # to read on failure
    errors = [o for _, o in _outputs(nb) if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for _, o in _outputs(nb) if o.output_type == "stream")
    assert "an2dl-kit 0.1.0 from" in text and "(untouched)" in text
    assert "dry run: credentials from" in text and "nothing sent" in text
    assert "IFrame" not in text and "\x1b" not in text  # no stray warnings or escape codes
    html = [o for _, o in _outputs(nb) if o.output_type == "display_data"
            and "<iframe srcdoc=" in o.get("data", {}).get("text/html", "")]
    assert len(html) == 2  # the clean review page and the report, inline
    sub = pd.read_csv(work / "submissions" / "latest.csv")
    assert len(sub) == 12 and list(sub.columns) == ["sample_index", "label"]
    manifest = json.loads((work / "submissions" / "latest.json").read_text())
    assert set(manifest["blend"]["backbones"] if "blend" in manifest else
               json.loads((work / "runs" / "blend" / "blend.json").read_text())["backbones"]) \
        == {"tiny_vit", "tiny_cnn"}
    assert (work / "runs" / "tune" / "tiny_vit" / "best.yaml").exists()
    assert (work / "runs" / "report.html").exists()
