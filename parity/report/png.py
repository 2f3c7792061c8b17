"""A minimal PNG encoder for palette images (no imaging library needed).

Heatmaps are stored as 8-bit palette PNGs: one byte per cell plus a 256-colour palette, deflated.
That is several times smaller than SVG rectangles and needs nothing beyond the standard library.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_palette(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """PNG bytes of a [H, W] uint8 index image with a [256, 3] uint8 RGB palette."""
    indices = np.ascontiguousarray(indices, dtype=np.uint8)
    if indices.ndim != 2 or indices.size == 0:
        raise ValueError(f"need a non-empty 2-D index image, got shape {indices.shape}")
    height, width = indices.shape
    palette = np.ascontiguousarray(palette, dtype=np.uint8).reshape(-1, 3)
    # Each scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), indices], axis=1).tobytes()
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)),
        _chunk(b"PLTE", palette.tobytes()),
        _chunk(b"IDAT", zlib.compress(raw, 9)),
        _chunk(b"IEND", b""),
    ])


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for inline use."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
