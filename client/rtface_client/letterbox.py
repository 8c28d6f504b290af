"""Letterboxing: fit any image into the engine's fixed input without distorting it.

The image is scaled by ``s = min(W / w, H / h)``, resized with bilinear interpolation to
``(round(w * s), round(h * s))`` and placed at the top-left of a zero ``H x W x 3`` canvas.
A point in network pixels maps back to original pixels as ``(p - pad) / s``; the padding is
always zero with top-left placement, but travels with each request so other placements work.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Letterbox", "letterbox", "letterbox_into"]


@dataclass(frozen=True)
class Letterbox:
    """How an original image was placed in the network input: scale and padding, in pixels."""

    scale: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def as_tuple(self) -> tuple[float, float, float]:
        """``(scale, pad_x, pad_y)``: a row of the server's ``letterbox`` input."""
        return self.scale, self.pad_x, self.pad_y

    def as_row(self) -> np.ndarray:
        """The ``(scale, pad_x, pad_y)`` float32 row the server's ``letterbox`` input expects."""
        return np.array(self.as_tuple(), dtype=np.float32)


def letterbox_into(image: np.ndarray, out: np.ndarray) -> Letterbox:
    """Letterbox ``image`` (``HxWx3`` BGR or ``HxW`` gray uint8) into ``out``, a
    ``height x width x 3`` uint8 array written in place (pass a view of a transport buffer to
    avoid a copy), and return the placement."""
    height, width = out.shape[:2]
    src_h, src_w = image.shape[:2]
    scale = min(width / src_w, height / src_h)
    new_w = min(width, max(1, round(src_w * scale)))
    new_h = min(height, max(1, round(src_h * scale)))
    target = out[:new_h, :new_w]
    if image.ndim == 2:
        target[...] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)[..., None]
    elif (new_w, new_h) == (src_w, src_h):
        target[...] = image
    else:
        resized = cv2.resize(image, (new_w, new_h), dst=target, interpolation=cv2.INTER_LINEAR)
        if not np.shares_memory(resized, target):
            target[...] = resized
    out[new_h:] = 0
    out[:new_h, new_w:] = 0
    return Letterbox(scale=scale)


def letterbox(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, Letterbox]:
    """Letterbox ``image`` into a new ``height x width x 3`` uint8 array; return it and the placement."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    return out, letterbox_into(image, out)
