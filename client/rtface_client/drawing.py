"""Faces drawn on images, readable at any face size: strokes, labels and landmarks scale with
each box, and a score label is left out where it would not fit inside its box's width."""

from __future__ import annotations

import cv2
import numpy as np

from rtface_client.types import Face

__all__ = ["draw_faces", "LABEL_MIN_SCALE"]

BOX_COLOR = (0, 255, 0)
LANDMARK_COLORS = ((255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 255, 255))
FONT = cv2.FONT_HERSHEY_SIMPLEX
STROKE_PER_PX = 1 / 50      # box line width per pixel of the box's shorter side
LABEL_PER_PX = 1 / 90       # font scale per pixel of the box's width
LABEL_MIN_SCALE = 0.35      # smaller labels are unreadable: none is drawn
LABEL_MAX_SCALE = 1.5
LANDMARK_PER_PX = 1 / 40    # landmark dot radius per pixel of the box's shorter side


def _draw_face(canvas: np.ndarray, face: Face) -> None:
    x1, y1, x2, y2 = (round(v) for v in face.box)
    side = max(1, min(x2 - x1, y2 - y1))
    stroke = max(1, round(side * STROKE_PER_PX))
    cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX_COLOR, stroke)
    scale = min(LABEL_MAX_SCALE, (x2 - x1) * LABEL_PER_PX)
    label = f"{face.score:.2f}"
    if scale >= LABEL_MIN_SCALE:
        weight = max(1, round(scale * 1.5))
        (width, height), _ = cv2.getTextSize(label, FONT, scale, weight)
        if width <= x2 - x1:
            cv2.putText(canvas, label, (x1, max(height, y1 - stroke - 1)), FONT, scale, BOX_COLOR, weight, cv2.LINE_AA)
    radius = max(1, round(side * LANDMARK_PER_PX))
    for (x, y), color in zip(face.landmarks, LANDMARK_COLORS):
        cv2.circle(canvas, (round(float(x)), round(float(y))), radius, color, -1, cv2.LINE_AA)


def draw_faces(image: np.ndarray, faces: list[Face]) -> np.ndarray:
    """A copy of ``image`` (BGR, or gray made BGR) with each face's box, score and landmarks."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    for face in faces:
        _draw_face(canvas, face)
    return canvas
