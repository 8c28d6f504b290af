"""Matching detections between two pipelines: IoU and one-to-one greedy matching."""

from __future__ import annotations

import numpy as np

__all__ = ["iou_matrix", "match_boxes"]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a [M, 4]`` with every box in ``b [K, 4]`` (x1, y1, x2, y2): ``[M, K]``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = lambda boxes: np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(reference: np.ndarray, candidate: np.ndarray, min_iou: float) -> np.ndarray:
    """For each reference box, the index of its one-to-one match in ``candidate`` (best IoU first,
    at least ``min_iou``), or -1 when unmatched."""
    ious = iou_matrix(reference, candidate)
    matches = np.full(len(ious), -1, dtype=np.int64)
    taken = np.zeros(ious.shape[1], dtype=bool)
    for flat in np.argsort(-ious, axis=None):
        r, c = divmod(int(flat), ious.shape[1])
        if ious[r, c] < min_iou:
            break
        if matches[r] < 0 and not taken[c]:
            matches[r], taken[c] = c, True
    return matches
