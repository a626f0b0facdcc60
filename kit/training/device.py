"""Where and in what precision training runs: device choice, autocast, DataLoader workers,
out-of-memory errors turned into advice."""
from __future__ import annotations

import contextlib
import os

import torch

from kit.utils import KitError


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` if available, else ``mps``, else ``cpu``; a named device must be available."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    ok = {"cpu": True, "cuda": torch.cuda.is_available(),
          "mps": getattr(torch.backends, "mps", None) is not None
          and torch.backends.mps.is_available()}.get(dev.type, False)
    if not ok:
        raise KitError(f"device {name!r} is not available here; use --device cpu "
                       "(or leave --device out to pick the best one)")
    return dev


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device``; None = full precision.

    ``amp`` is a setting kit.schema checked: auto, off (YAML's bare ``off`` reads as false),
    bf16 or fp16.
    """
    if amp in (False, None, "off"):
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        # Emulated bf16 (e.g. a T4) is slower than fp16 with loss scaling.
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.is_bf16_supported()


def auto_flag(value, device: torch.device) -> bool:
    """``auto`` -> on CUDA only; otherwise the setting's boolean (``auto`` or true/false, as
    kit.schema checked it)."""
    if value == "auto":
        return device.type == "cuda"
    return bool(value)


def n_workers(value, device: torch.device) -> int:
    """DataLoader processes for ``num_workers`` (``auto``: 0 on CPU/MPS, up to 8 on CUDA;
    else the integer kit.schema checked)."""
    if value == "auto":
        # On a CPU the cores are busy with the model itself; extra processes only compete.
        return min(8, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0
    return int(value)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@contextlib.contextmanager
def oom_as_kit_error(batch_size: int, device: torch.device, what: str):
    """Turn an out-of-memory error into a KitError that suggests a smaller --batch-size."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not is_oom(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise KitError(f"out of memory while {what} with batches of {batch_size} on {device}; "
                       f"rerun with a smaller --batch-size (e.g. {max(1, batch_size // 2)}); "
                       "finished outputs are kept") from exc


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
