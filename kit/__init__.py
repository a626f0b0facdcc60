"""an2dl-kit: a reproducible Kaggle submission kit for histopathology classification."""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
# OpenMP threads that spin while waiting (libgomp's default) collapse when other processes
# share the cores: a torch training step measured 2-8x slower on a busy 2-core box. Passive
# waiting only adds a wake-up latency on an idle one. Effective when set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The built-in task, the one a command runs on when nothing names another.
DEFAULT_TASK = "an2dl2526c2v2"


def _builtin_classes() -> tuple[str, ...]:
    """The built-in task file's classes: label strings exactly as in its train_labels.csv, in
    the order every file of that task uses. Read here, not repeated: the task file holds them."""
    from pathlib import Path

    import yaml

    file = Path(__file__).resolve().parent / "conf" / "tasks" / f"{DEFAULT_TASK}.yaml"
    return tuple(yaml.safe_load(file.read_text(encoding="utf-8"))["classes"])


CLASSES = _builtin_classes()
# Probability columns of every OOF/test file: "p_" + the label string, in class order.
PROB_COLUMNS = [f"p_{c}" for c in CLASSES]

# The `kit` logger's console handler: every stage's status lines come out on stdout as plain
# lines, whoever imports the kit (the CLI, a notebook, the tests).
from kit import log  # noqa: E402,F401
