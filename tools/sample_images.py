"""Real face images for validation, tests and benchmarks (BGR uint8, OpenCV convention).

- :func:`astronaut`: scikit-image's 512x512 portrait, one face at about x 177-272, y 56-176.
- :func:`selfie`: the crowd photo in ``shared/data/selfie`` beside the checkout (856 labelled
  faces), or ``None`` when that folder is absent.
- :func:`face_canvas`: synthetic canvases with the astronaut's face pasted at known places and
  scales, distinct for each seed, on a noisy grey background or on a photograph.
- :func:`photo_frame`: such a canvas on one of scikit-image's colour photographs (:data:`PHOTOS`),
  a frame that compresses as camera frames do (uniform noise, the plain canvas's background, is the
  worst case for JPEG: 5x the bytes at the same quality).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tools.settings import REPO_ROOT

__all__ = ["ASTRONAUT_FACE", "PHOTOS", "astronaut", "selfie", "selfie_dir", "Canvas", "face_canvas", "photo_frame"]

ASTRONAUT_FACE = (177.0, 56.0, 272.0, 176.0)  # x1, y1, x2, y2 in the 512x512 original
_CROP = (140, 20, 310, 215)  # the face with some context, x1, y1, x2, y2
PHOTOS = ("coffee", "chelsea", "rocket", "astronaut")  # scikit-image's colour photographs of scenes


@functools.cache
def _astronaut() -> np.ndarray:
    from skimage import data

    image = np.ascontiguousarray(data.astronaut()[..., ::-1])
    image.flags.writeable = False
    return image


def astronaut() -> np.ndarray:
    """scikit-image's astronaut, as a 512x512x3 BGR uint8 array (a fresh copy)."""
    return _astronaut().copy()


def selfie_dir() -> Path:
    """Where the labelled crowd photo lives (``$RTFACE_SELFIE_DIR`` or ``../shared/data/selfie``)."""
    return Path(os.environ.get("RTFACE_SELFIE_DIR", REPO_ROOT.parent / "shared" / "data" / "selfie"))


def selfie() -> np.ndarray | None:
    """The 2048x1150 crowd photo as BGR uint8, or ``None`` when it is not present."""
    path = selfie_dir() / "selfie.jpg"
    return cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None


@dataclass(frozen=True)
class Canvas:
    """A synthetic image and the true face boxes pasted into it (x1, y1, x2, y2, pixels)."""

    image: np.ndarray
    faces: np.ndarray


def face_canvas(seed: int, width: int = 1280, height: int = 960, count: int = 4,
                background: np.ndarray | None = None) -> Canvas:
    """A ``width`` x ``height`` canvas with ``count`` astronaut faces at seed-dependent places and
    sizes (face widths 40 to 240 px), non-overlapping, on a noisy grey background, or on
    ``background`` (BGR uint8, resized to the canvas)."""
    rng = np.random.default_rng(seed)
    canvas = (rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8) if background is None
              else cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR))
    x0, y0, x1, y1 = _CROP
    crop = _astronaut()[y0:y1, x0:x1]
    taken: list[tuple[int, int, int, int]] = []
    faces = []
    for _ in range(count * 50):
        if len(faces) == count:
            break
        face_w = rng.uniform(40, 240)
        k = face_w / (ASTRONAUT_FACE[2] - ASTRONAUT_FACE[0])
        w, h = round(crop.shape[1] * k), round(crop.shape[0] * k)
        if w >= width or h >= height:
            continue
        ox, oy = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        if any(ox < bx + bw and bx < ox + w and oy < by + bh and by < oy + h for bx, by, bw, bh in taken):
            continue
        patch = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
        fx1, fx2 = (ASTRONAUT_FACE[0] - x0) * k, (ASTRONAUT_FACE[2] - x0) * k
        if rng.random() < 0.5:  # mirrored: the face box mirrors too
            patch, (fx1, fx2) = patch[:, ::-1], (w - fx2, w - fx1)
        canvas[oy:oy + h, ox:ox + w] = patch
        taken.append((ox, oy, w, h))
        faces.append((ox + fx1, oy + (ASTRONAUT_FACE[1] - y0) * k, ox + fx2, oy + (ASTRONAUT_FACE[3] - y0) * k))
    return Canvas(image=canvas, faces=np.array(faces, dtype=np.float32).reshape(-1, 4))


@functools.cache
def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = np.ascontiguousarray(getattr(data, name)()[..., ::-1])
    image.flags.writeable = False
    return image


def photo_frame(seed: int, width: int = 1280, height: int = 960, count: int = 4) -> Canvas:
    """:func:`face_canvas` on the photograph ``PHOTOS[seed % len(PHOTOS)]`` instead of noise: a
    camera-like frame with ``count`` real faces at known places."""
    return face_canvas(seed, width, height, count, background=_photo(PHOTOS[seed % len(PHOTOS)]))
