"""Decoding the dataset's files: images to uint8 RGB (any mode), masks to bool, thumbnails,
and the size check ``validate`` runs on every file."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# Test scans reach ~6200 x 1024 and some teams upscaled: trust the data.
Image.MAX_IMAGE_PIXELS = None


def image_size(path: Path, problems: list[str], check_pixels: bool) -> tuple[int, int] | None:
    """``(width, height)`` of an image file, or None with one line in ``problems`` when it
    cannot be read (``check_pixels``: its chunks are verified too)."""
    kind = path.suffix.lstrip(".").upper() or "image"
    try:
        with Image.open(path) as im:
            size = im.size
            if check_pixels:
                im.verify()  # chunk CRCs and the end marker, without decoding every pixel
        return size
    except Exception as exc:  # PIL raises many types for broken files
        problems.append(f"{path}: unreadable or truncated {kind} ({type(exc).__name__}: {exc}); "
                        "re-download or delete the file")
        return None


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL image (RGB, RGBA, L, LA, P, 16-bit) as uint8 ``H x W x 3``."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.uint32)
        arr = (arr >> 8) if arr.max(initial=0) > 255 else arr
        return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def jpeg_thumbnail(im: Image.Image, side: int, quality: int = 80) -> bytes:
    """JPEG bytes of a copy of ``im`` shrunk to fit ``side`` x ``side`` (for review pages)."""
    thumb = im.convert("RGB") if im.mode != "RGB" else im.copy()
    thumb.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 ``H x W x 3`` RGB."""
    with Image.open(path) as im:
        return to_rgb_array(im)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask to a bool ``H x W`` array; any value > 0 is inside."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return arr > 0
