"""an2dl-kit: a reproducible Kaggle submission kit for histopathology classification."""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

__version__ = "0.1.0"

# Label strings exactly as in train_labels.csv; this order is the kit's class order everywhere.
CLASSES = ("Luminal A", "Luminal B", "HER2(+)", "Triple negative")
