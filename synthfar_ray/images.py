"""JPEG encode/decode shared by generation, ingest, training and the report."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    """HxWx3 uint8 array (or PIL image) -> JPEG bytes."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes (JPEG/PNG/...) -> HxWx3 uint8 RGB. Raises ValueError on undecodable data."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt data
        raise ValueError(f"undecodable image ({len(data)} bytes): {e}") from e
