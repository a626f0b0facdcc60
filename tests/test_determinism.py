"""kit.utils.seed_everything: deterministic algorithms come with the cuBLAS workspace setting."""
from __future__ import annotations

import os

import pytest

from kit.utils import seed_everything


@pytest.mark.parametrize("given, expected", [(None, ":4096:8"), (":16:8", ":16:8")])
def test_seed_everything_sets_cublas_workspace_unless_given(monkeypatch, given, expected):
    import torch

    if given is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", given)
    seed_everything(3)  # the other suites call it too: its process-wide effects are expected
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == expected
    assert torch.are_deterministic_algorithms_enabled()
