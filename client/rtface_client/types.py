"""The SDK's result type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Face", "LANDMARK_NAMES"]

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
COORDINATE_DECIMALS = 2  # JSON pixels: a hundredth of a pixel, boxes and landmarks alike
SCORE_DECIMALS = 4


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in pixels of the original image (x right, y down, origin top-left).

    ``box`` is ``(x1, y1, x2, y2)``; ``score`` the face confidence in 0..1; ``landmarks`` a
    ``(5, 2)`` float32 array of (x, y) points in :data:`LANDMARK_NAMES` order.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``box`` and ``landmarks`` as plain lists of pixels rounded to
        ``COORDINATE_DECIMALS``, ``score`` to ``SCORE_DECIMALS``."""
        return {"box": [round(float(v), COORDINATE_DECIMALS) for v in self.box],
                "score": round(float(self.score), SCORE_DECIMALS),
                "landmarks": [[round(float(x), COORDINATE_DECIMALS), round(float(y), COORDINATE_DECIMALS)]
                              for x, y in self.landmarks]}
