"""Detection-level agreement between two detectors' candidates: the check every accelerated
backend (torch, TensorRT) must pass against the rewritten graph on onnxruntime.

Both sides go through the same NMS; faces are matched both ways (every expected face found, no
extra face found), then boxes and landmarks are compared in network pixels and scores directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tools.engine.reference import nms_reference
from tools.matching import match_boxes

__all__ = ["Tolerance", "DetectionAgreement", "compare_detections", "combined", "compare_runs"]

FACE_SCORE = 0.5    # faces that must be found on the other side
MARGIN_SCORE = 0.3  # what the other side may report them at (scores near 0.5 can cross it)
NMS_IOU = 0.4


@dataclass(frozen=True)
class Tolerance:
    """How far a backend may drift from onnxruntime: match IoU, the share of faces allowed to
    go unmatched either way (a float16 box of a tiny face can fall just under the IoU), and the
    largest box corner, landmark (network pixels) and score differences of matched faces."""

    iou: float = 0.95
    unmatched: float = 0.005
    box_px: float = 0.5
    landmark_px: float = 0.5
    score: float = 0.01


@dataclass(frozen=True)
class DetectionAgreement:
    """One image's comparison: faces on each side, unmatched either way, largest errors."""

    expected: int
    found: int
    missing: int
    extra: int
    box_px: float
    landmark_px: float
    score: float

    def problems(self, tolerance: Tolerance) -> list[str]:
        """What exceeds ``tolerance``, in words (empty when it agrees)."""
        out = []
        if self.missing > tolerance.unmatched * self.expected:
            out.append(f"{self.missing} of {self.expected} faces not found at IoU {tolerance.iou}")
        if self.extra > tolerance.unmatched * self.found:
            out.append(f"{self.extra} extra faces of {self.found}")
        for name, value, limit in (("box", self.box_px, tolerance.box_px),
                                   ("landmark", self.landmark_px, tolerance.landmark_px),
                                   ("score", self.score, tolerance.score)):
            if value > limit:
                out.append(f"{name} error {value:.4f} > {limit}")
        return out


def combined(agreements: list[DetectionAgreement]) -> DetectionAgreement:
    """Several images' agreements as one: counts added, largest errors kept."""
    return DetectionAgreement(*(sum(getattr(a, f) for a in agreements) for f in ("expected", "found", "missing", "extra")),
                              *(max((getattr(a, f) for a in agreements), default=0.0)
                                for f in ("box_px", "landmark_px", "score")))


def _one_way(left: np.ndarray, right: np.ndarray, iou: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices of matched pairs (left >= FACE_SCORE against right >= MARGIN_SCORE) and the
    count of such left faces without a match."""
    strong = np.flatnonzero(left[:, 4] >= FACE_SCORE)
    matches = match_boxes(left[strong, :4], right[:, :4], iou)
    hit = matches >= 0
    return strong[hit], matches[hit], int((~hit).sum())


def compare_detections(expected_candidates: np.ndarray, found_candidates: np.ndarray,
                       tolerance: Tolerance = Tolerance()) -> DetectionAgreement:
    """Compare one image's ``candidates`` [K, 15] (x1, y1, x2, y2, score, 10 landmark
    coordinates; network pixels) from the reference side and the backend under test."""
    expected = nms_reference(expected_candidates, MARGIN_SCORE, NMS_IOU, 100_000)
    found = nms_reference(found_candidates, MARGIN_SCORE, NMS_IOU, 100_000)
    e_index, f_index, missing = _one_way(expected, found, tolerance.iou)
    _, _, extra = _one_way(found, expected, tolerance.iou)
    diff = np.abs(expected[e_index] - found[f_index])
    return DetectionAgreement(
        expected=int((expected[:, 4] >= FACE_SCORE).sum()), found=int((found[:, 4] >= FACE_SCORE).sum()),
        missing=missing, extra=extra,
        box_px=float(diff[:, :4].max(initial=0.0)), landmark_px=float(diff[:, 5:].max(initial=0.0)),
        score=float(diff[:, 4].max(initial=0.0)))


def compare_runs(backend: str, reference_runs, backend_runs, output: str, tolerance: Tolerance) -> list[str]:
    """Compare a backend's Polygraphy runs with onnxruntime's (same feeds, same order) image by
    image on ``output``; print the overall agreement and return what exceeds ``tolerance``."""
    overall = combined([compare_detections(expected, found, tolerance)
                        for reference_out, backend_out in zip(reference_runs, backend_runs, strict=True)
                        for expected, found in zip(reference_out[output], backend_out[output], strict=True)])
    print(f"{backend} vs onnxruntime: {overall.expected} faces, {overall.missing} missing, {overall.extra} extra; "
          f"max error box {overall.box_px:.3f} px, landmark {overall.landmark_px:.3f} px, score {overall.score:.4f}")
    return overall.problems(tolerance)
