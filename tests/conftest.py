"""Suite-wide set-up: import kit before any test module imports torch.

kit/__init__.py sets environment defaults (OMP_WAIT_POLICY, NO_ALBUMENTATIONS_UPDATE) that
only take effect when set before torch / albumentations load; plain ``pytest`` runs (without
``./run.sh test``) would otherwise miss them.
"""
import kit  # noqa: F401
