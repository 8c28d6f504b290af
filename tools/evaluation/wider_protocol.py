"""WIDER FACE validation protocol in numpy: easy / medium / hard average precision.

Follows the official evaluation (the MATLAB ``wider_eval.m`` and its widely used Python port)
step by step:

1. Scores are min-max normalised, ``(s - min) / (max - min)``, over every prediction of the
   evaluated images (the images of the ground truth).
2. Per image, predictions are sorted by score, highest first. Each one goes to the ground-truth
   box it overlaps most; at IoU >= 0.5 it recalls that face, once (a later hit on the same face
   is a false positive, with no fall-back to the next-best face). A hit on an ignored face makes
   the prediction ignored: neither a true nor a false positive.
3. For the thresholds ``t_k = 1 - k / 1000`` (k = 1 .. 1000, so 0.999 down to 0.0), every image
   adds the number of its non-ignored predictions with score >= t_k ("proposals") and the number
   of faces recalled up to its last prediction with score >= t_k. Images without ground-truth
   boxes or without predictions add nothing (their false positives are not counted), but their
   counted faces still enter the recall denominator.
4. ``precision = recalled / proposals``, ``recall = recalled / counted faces``; AP is the VOC
   all-point area under the precision envelope (precision made non-increasing from the right).

Conventions
-----------
- Boxes, predicted and ground truth alike, are ``x, y, w, h`` in pixels (left, top, width,
  height), as in the .mat files and in the submission text format. Predictions are float
  ``[M, 5]``: ``x, y, w, h, score``.
- IoU uses the official pixel-inclusive convention: the official code forms ``x2 = x + w`` and
  adds 1 to every width, height and intersection side, so a box spans ``w + 1`` by ``h + 1``
  pixels. Two boxes that merely touch (``x2`` of one equals ``x`` of the other) overlap by one
  pixel column. Computed in float64, like the MATLAB code.
- Ground truth per image is boxes ``[N, 4]`` plus a boolean ``counts`` mask ``[N]``: True where the
  face counts in the setting, False where it is ignored (the official ``gt_list`` holds the
  1-based indices of the counted faces).
- Image keys in :func:`evaluate` and the text format are ``(event, name)``, e.g.
  ``("0--Parade", "0_Parade_marchingband_1_20")``: the event folder and the image file name
  without extension. A missing key means no predictions for that image.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy.io import loadmat

from tools.matching import iou_matrix

__all__ = [
    "SETTINGS",
    "ImageKey",
    "average_precision",
    "evaluate",
    "image_pr_counts",
    "load_ground_truth",
    "match_image",
    "normalize_scores",
    "read_prediction_file",
    "read_predictions",
    "score_thresholds",
    "voc_ap",
    "wider_iou",
    "write_predictions",
]

ImageKey = tuple[str, str]
K = TypeVar("K", bound=Hashable)

SETTINGS = ("easy", "medium", "hard")


def wider_iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU ``[M, N]`` of ``boxes [M, 4]`` with ``gt [N, 4]`` (both ``x, y, w, h`` in pixels), with
    the official +1 pixel convention: each box covers ``[x, x + w + 1) x [y, y + h + 1)``."""

    def inclusive(b: np.ndarray) -> np.ndarray:
        b = np.asarray(b, np.float64).reshape(-1, 4)
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:] + 1.0], axis=1)

    return iou_matrix(inclusive(boxes), inclusive(gt))


def normalize_scores(pred: Mapping[K, np.ndarray]) -> dict[K, np.ndarray]:
    """Copies of ``pred`` (``[M, 5]`` x, y, w, h, score) with every score mapped to
    ``(s - min) / (max - min)``, min and max taken over all images together.

    When every score is the same, all become 1.0 (the official code divides 0 by 0 there)."""
    arrays = {key: np.array(boxes, np.float64).reshape(-1, 5) for key, boxes in pred.items()}
    scores = np.concatenate([np.empty(0)] + [a[:, 4] for a in arrays.values()])
    if scores.size == 0:
        return arrays
    if not np.all(np.isfinite(scores)):
        raise ValueError("prediction scores must be finite")
    low, high = scores.min(), scores.max()
    for a in arrays.values():
        a[:, 4] = (a[:, 4] - low) / (high - low) if high > low else 1.0
    return arrays


def match_image(boxes: np.ndarray, gt: np.ndarray, counts: np.ndarray,
                iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Official matching of one image's predictions to its ground truth.

    ``boxes [M, 4]`` are sorted by score, highest first; ``gt [N, 4]`` (N >= 1), both ``x, y, w, h``;
    ``counts [N]`` is False for ignored faces. Returns ``recalled [M]`` (int: counted faces recalled
    by predictions ``0..m``, the official ``pred_recall``) and ``proposal [M]`` (bool: False where
    the prediction hit an ignored face, the official ``proposal_list == -1``).
    """
    overlaps = wider_iou(boxes, gt)
    best = overlaps.argmax(axis=1)
    hit = overlaps[np.arange(len(best)), best] >= iou
    counted = np.asarray(counts, bool)[best]
    recalls = np.flatnonzero(hit & counted)
    _, first = np.unique(best[recalls], return_index=True)
    new_face = np.zeros(len(best), np.int64)
    new_face[recalls[first]] = 1
    return np.cumsum(new_face), ~(hit & ~counted)


def score_thresholds(count: int = 1000) -> np.ndarray:
    """The official thresholds ``1 - k / count`` for k = 1 .. count (descending, last is 0.0)."""
    return 1.0 - np.arange(1, count + 1) / count


def image_pr_counts(scores: np.ndarray, proposal: np.ndarray, recalled: np.ndarray,
                    thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold ``t``: the number of non-ignored predictions with score >= t, and the
    faces recalled up to the last prediction with score >= t (0 when there is none).

    ``scores [M]`` are sorted descending; ``proposal`` and ``recalled`` come from
    :func:`match_image`. Returns two int arrays shaped like ``thresholds``."""
    above = np.searchsorted(-np.asarray(scores), -np.asarray(thresholds), side="right")
    proposals = np.concatenate(([0], np.cumsum(proposal)))[above]
    return proposals, np.concatenate(([0], recalled))[above]


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point AP: sentinels (recall 0 and 1, precision 0 at both ends), precision made
    non-increasing from the right, then the sum of ``Δrecall × precision``."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def average_precision(pred_by_image: Mapping[K, np.ndarray], gt_by_image: Mapping[K, np.ndarray],
                      keep_by_image: Mapping[K, np.ndarray], iou: float = 0.5,
                      thresholds: int = 1000) -> tuple[float, np.ndarray, np.ndarray]:
    """AP of one setting, with in-memory ground truth.

    ``pred_by_image``: ``[M, 5]`` x, y, w, h, raw score (normalised here over the images of
    ``gt_by_image``; other keys are ignored). ``gt_by_image``: ``[N, 4]`` x, y, w, h.
    ``keep_by_image``: bool ``[N]``, False = ignored face. Returns ``(ap, precision, recall)``, the
    curves ``[thresholds]`` ordered from the highest threshold down; precision is 0 where no
    prediction passes a threshold (official: 0/0, which leaves AP unchanged: recall is 0 there).
    """
    preds = normalize_scores({k: pred_by_image[k] for k in gt_by_image if k in pred_by_image})
    cuts = score_thresholds(thresholds)
    proposals, recalled = np.zeros(thresholds, np.int64), np.zeros(thresholds, np.int64)
    faces = 0
    for key, boxes in gt_by_image.items():
        gt = np.asarray(boxes, np.float64).reshape(-1, 4)
        counts = np.asarray(keep_by_image[key], bool).reshape(-1)
        if counts.shape != (len(gt),):
            raise ValueError(f"{key}: {len(gt)} boxes but {counts.size} keep flags")
        faces += int(counts.sum())
        pred = preds.get(key, np.empty((0, 5)))
        if len(gt) == 0 or len(pred) == 0:
            continue
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        image_recalled, proposal = match_image(pred[:, :4], gt, counts, iou)
        p, r = image_pr_counts(pred[:, 4], proposal, image_recalled, cuts)
        proposals += p
        recalled += r
    if faces == 0:
        raise ValueError("no ground-truth face counts in this setting")
    precision = np.divide(recalled, proposals, out=np.zeros(thresholds), where=proposals > 0)
    recall = recalled / faces
    return voc_ap(recall, precision), precision, recall


def _cells(cell_array: np.ndarray) -> list:
    """Elements of a MATLAB cell array as loadmat returns it (object ndarray), in MATLAB order."""
    return list(np.asarray(cell_array).ravel(order="F"))


def _text(char_array: np.ndarray) -> str:
    """The string inside a MATLAB char array as loadmat returns it."""
    return str(np.asarray(char_array).ravel()[0])


def _counts_mask(size: int, one_based: np.ndarray) -> np.ndarray:
    """Bool ``[size]`` mask, True at the 1-based indices ``one_based`` (the official ``gt_list``)."""
    mask = np.zeros(size, bool)
    mask[np.asarray(one_based).astype(np.int64).ravel() - 1] = True
    return mask


def load_ground_truth(
        gt_dir: Path) -> tuple[dict[ImageKey, np.ndarray], dict[str, dict[ImageKey, np.ndarray]]]:
    """Read ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat`` from ``gt_dir``.

    Returns the boxes per image (float64 ``[N, 4]`` x, y, w, h) and, per setting, the counts mask
    per image (bool ``[N]``, False = ignored)."""
    gt_dir = Path(gt_dir)
    face = loadmat(gt_dir / "wider_face_val.mat")
    keys = [(_text(event), _text(name))
            for event, names in zip(_cells(face["event_list"]), _cells(face["file_list"]),
                                    strict=True)
            for name in _cells(names)]
    boxes = [np.asarray(b, np.float64).reshape(-1, 4)
             for per_event in _cells(face["face_bbx_list"]) for b in _cells(per_event)]
    gt = dict(zip(keys, boxes, strict=True))
    keep = {}
    for setting in SETTINGS:
        gt_list = loadmat(gt_dir / f"wider_{setting}_val.mat")["gt_list"]
        indices = [i for per_event in _cells(gt_list) for i in _cells(per_event)]
        keep[setting] = {key: _counts_mask(len(b), i)
                         for key, b, i in zip(keys, boxes, indices, strict=True)}
    return gt, keep


def evaluate(pred: Mapping[ImageKey, np.ndarray], gt_dir: Path,
             iou: float = 0.5) -> dict[str, float]:
    """Official WIDER FACE val AP per setting: ``{"easy": ap, "medium": ap, "hard": ap}``.

    ``pred`` maps ``(event, name)`` to ``[M, 5]`` x, y, w, h, raw score (pixels)."""
    gt, keep = load_ground_truth(gt_dir)
    return {setting: average_precision(pred, gt, keep[setting], iou)[0] for setting in SETTINGS}


def _number(value: float) -> str:
    """Shortest decimal text that reads back as exactly ``value``."""
    return np.format_float_positional(float(value), trim="-")


def write_predictions(pred: Mapping[ImageKey, np.ndarray], out_dir: Path) -> None:
    """Write the official submission format: ``out_dir/<event>/<name>.txt`` holding the image
    name, the box count, then one ``x y w h score`` line per box (pixels, raw score)."""
    for (event, name), boxes in pred.items():
        rows = np.asarray(boxes, np.float64).reshape(-1, 5)
        path = Path(out_dir) / event / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [name, str(len(rows))] + [" ".join(map(_number, row)) for row in rows]
        path.write_text("\n".join(lines) + "\n")


def read_prediction_file(path: Path) -> np.ndarray:
    """One file of the submission format as float64 ``[M, 5]`` (x, y, w, h, score). As the
    official reader does, line 1 is skipped and exactly the count on line 2 of box lines is read
    (first five numbers of each)."""
    lines = Path(path).read_text().splitlines()
    count = int(lines[1])
    rows = [[float(v) for v in line.split()[:5]] for line in lines[2:2 + count]]
    if len(rows) != count or any(len(row) != 5 for row in rows):
        raise ValueError(f"{path}: expected {count} lines of x y w h score")
    return np.array(rows, np.float64).reshape(-1, 5)


def read_predictions(pred_dir: Path) -> dict[ImageKey, np.ndarray]:
    """Every ``pred_dir/<event>/<name>.txt``, keyed ``(event, name)``."""
    return {(path.parent.name, path.stem): read_prediction_file(path)
            for path in sorted(Path(pred_dir).glob("*/*.txt"))}
