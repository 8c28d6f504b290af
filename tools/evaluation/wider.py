"""``make eval DATA=<folder>``: WIDER FACE val easy / medium / hard AP of the served pipeline.

``DATA`` holds the images as ``<event>/<name>.jpg`` (directly, or under ``images/`` or
``WIDER_val/images/`` as the official archive unpacks) and, anywhere below it, the official
ground truth ``wider_face_val.mat`` + ``wider_{easy,medium,hard}_val.mat`` (the ``eval_tools``
``ground_truth/`` folder). ``--gt`` names that folder when it lives elsewhere.

Every image listed in the ground truth goes through the served pipeline (SDK ``detect_stream``)
at score threshold 0.02; predictions are written in the official text format
(``<out>/predictions/<event>/<name>.txt``) and evaluated from those files with the official
protocol (:mod:`tools.evaluation.wider_protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.evaluation.served import EVAL_SCORE_THRESHOLD, faces_to_rows, served_faces
from tools.evaluation.wider_protocol import (SETTINGS, ImageKey, average_precision, load_ground_truth,
                              read_predictions, write_predictions)

__all__ = ["DataError", "GT_FILES", "IMAGE_ROOTS", "PUBLISHED", "WiderSet", "find_ground_truth",
           "find_images", "load_set", "evaluate_served"]

GT_FILES = ("wider_face_val.mat",) + tuple(f"wider_{s}_val.mat" for s in SETTINGS)
IMAGE_ROOTS = (".", "images", "WIDER_val/images")
# Published WIDER FACE val AP (%) per network (not measured here).
PUBLISHED = {"mnet025": {"RetinaFace-MobileNet0.25, original scale": {"easy": 90.70, "medium": 88.16, "hard": 73.82},
                         "RetinaFace-MobileNet0.25, short side 1600": {"easy": 88.67, "medium": 87.09, "hard": 80.99}},
             "mnv2": {"RetinaFace-MobileNetV2": {"easy": 93.4, "medium": 91.8, "hard": 79.5}}}


class DataError(FileNotFoundError):
    """The WIDER-format folder lacks the ground truth or images; the message says what."""


def find_ground_truth(data: Path) -> Path:
    """The folder at or below ``data`` holding all four official .mat files."""
    for candidate in [data, *sorted(p.parent for p in data.rglob(GT_FILES[-1]))]:
        if all((candidate / name).is_file() for name in GT_FILES):
            return candidate
    raise DataError(f"no folder under {data} holds {', '.join(GT_FILES)} (the official "
                    "eval_tools/ground_truth); pass --gt DIR")


def find_images(data: Path, keys: list[ImageKey]) -> dict[ImageKey, Path]:
    """``<root>/<event>/<name>.jpg`` for every key, for the first root of :data:`IMAGE_ROOTS`
    under ``data`` that holds the first key's image; raises naming any missing image."""
    event, name = keys[0]
    roots = [data / r for r in IMAGE_ROOTS if (data / r / event / f"{name}.jpg").is_file()]
    if not roots:
        raise DataError(f"{event}/{name}.jpg is not under {data} (looked in "
                        f"{', '.join(IMAGE_ROOTS)})")
    paths = {key: roots[0] / key[0] / f"{key[1]}.jpg" for key in keys}
    missing = [f"{e}/{n}.jpg" for (e, n), path in paths.items() if not path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(keys)} images missing under {roots[0]}, "
                        f"e.g. {missing[0]}")
    return paths


@dataclass(frozen=True)
class WiderSet:
    """A WIDER-format set ready to run: the ground truth (boxes ``x, y, w, h`` and per-setting
    counts masks, as :func:`tools.evaluation.wider_protocol.load_ground_truth` reads them) and each image's path."""

    gt_dir: Path
    gt: dict[ImageKey, np.ndarray]
    keep: dict[str, dict[ImageKey, np.ndarray]]
    paths: dict[ImageKey, Path]


def load_set(data: Path, gt_dir: Path | None = None) -> WiderSet:
    """Find the ground truth (``gt_dir``, or under ``data``) and every image it lists."""
    data = Path(data)
    gt_dir = find_ground_truth(data) if gt_dir is None else Path(gt_dir)
    if not all((gt_dir / name).is_file() for name in GT_FILES):
        raise DataError(f"{gt_dir} lacks one of {', '.join(GT_FILES)}")
    gt, keep = load_ground_truth(gt_dir)
    return WiderSet(gt_dir, gt, keep, find_images(data, list(gt)))


def evaluate_served(url: str, wider: WiderSet, out_dir: Path, concurrency: int = 2) -> dict:
    """Run every image of ``wider`` through the server at ``url``, write the predictions under
    ``out_dir/predictions`` and return AP (%) and curves per setting."""
    keys = list(wider.gt)
    print(f"{len(keys)} images, {sum(len(b) for b in wider.gt.values())} faces "
          f"(ground truth {wider.gt_dir})")
    faces = served_faces(url, (str(wider.paths[key]) for key in keys), EVAL_SCORE_THRESHOLD,
                         concurrency=concurrency, progress=200)
    pred_dir = Path(out_dir) / "predictions"
    write_predictions({key: faces_to_rows(f) for key, f in zip(keys, faces)}, pred_dir)
    pred = read_predictions(pred_dir)  # evaluate what was written, as a submission would be
    curves = {}
    for setting in SETTINGS:
        ap, precision, recall = average_precision(pred, wider.gt, wider.keep[setting])
        curves[setting] = {"ap": 100.0 * ap, "precision": precision, "recall": recall}
    return {"images": len(keys),
            "faces": {s: int(sum(np.sum(m) for m in wider.keep[s].values())) for s in SETTINGS},
            "detections": int(sum(len(f) for f in faces)), "predictions": str(pred_dir),
            "ap": {s: round(curves[s]["ap"], 3) for s in SETTINGS},
            "published": PUBLISHED, "curves": curves}
