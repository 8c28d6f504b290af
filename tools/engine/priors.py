"""RetinaFace anchor priors and the numpy reference decode of the raw head outputs.

Conventions: priors are ``(cx, cy, w, h)`` in network-input pixels, ordered feature level by
feature level (strides 8, 16, 32), row-major over each feature map, then anchor size — the
order the exported heads concatenate their outputs in.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MIN_SIZES", "STEPS", "VARIANCES", "anchor_count", "make_priors", "decode_reference"]

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)


def anchor_count(width: int, height: int) -> int:
    """How many anchors a ``width`` x ``height`` input has: ``len(make_priors(width, height))``."""
    return sum(len(sizes) * math.ceil(height / step) * math.ceil(width / step) for step, sizes in zip(STEPS, MIN_SIZES))


def make_priors(width: int, height: int) -> np.ndarray:
    """Anchor priors for a ``width`` x ``height`` network input: float32 ``[P, 4]`` (cx, cy, w, h)."""
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centers = np.stack([(xs.ravel() + 0.5) * step, (ys.ravel() + 0.5) * step], axis=1)
        for_each_size = np.repeat(centers, len(sizes), axis=0)
        wh = np.tile(np.array([[s, s] for s in sizes], dtype=np.float64), (rows * cols, 1))
        levels.append(np.hstack([for_each_size, wh]))
    return np.concatenate(levels).astype(np.float32)


def decode_reference(loc: np.ndarray, conf: np.ndarray, landmarks: np.ndarray,
                     priors: np.ndarray) -> np.ndarray:
    """Decode raw head outputs into detections, in numpy, the way the original model card does.

    ``loc`` ``[N, P, 4]``, ``conf`` ``[N, P, 2]`` (softmaxed), ``landmarks`` ``[N, P, 10]``;
    returns float32 ``[N, P, 15]``: x1, y1, x2, y2, face score, then five (x, y) landmarks, all
    in network-input pixels.
    """
    centers, sizes = priors[:, :2], priors[:, 2:]
    box_centers = centers + loc[..., :2] * VARIANCES[0] * sizes
    box_sizes = sizes * np.exp(loc[..., 2:] * VARIANCES[1])
    corners = np.concatenate([box_centers - box_sizes / 2, box_centers + box_sizes / 2], axis=-1)
    points = landmarks.reshape(*landmarks.shape[:-1], 5, 2) * VARIANCES[0] * sizes[:, None, :]
    points = (points + centers[:, None, :]).reshape(landmarks.shape)
    return np.concatenate([corners, conf[..., 1:2], points], axis=-1).astype(np.float32)
