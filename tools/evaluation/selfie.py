"""``make eval-selfie``: WIDER FACE protocol AP on the labelled "World's Largest Selfie".

Ground truth: ``selfie.txt`` in ``shared/data/selfie`` (YOLO rows ``class cx cy w h``, normalised;
class 0 clear, 1 dim, 2 guessed). As in the benchmark's own evaluation, boxes are compared in a
2048x1152 frame: labels are scaled to it, and predictions (pixels of the 2048x1150 photo) are
scaled by ``2048 / image width`` and ``1152 / image height`` into it. Matching, thresholds and AP
are those of :mod:`tools.evaluation.wider_protocol` (IoU >= 0.5, +1 pixel convention, min-max scores).

Two settings: ``all`` (all 856 faces count) and ``clear`` (the 336 class-0 faces count; a
prediction on a dim or guessed face is ignored, not a false positive).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rtface_client.letterbox import letterbox

from tools.evaluation.served import (EVAL_SCORE_THRESHOLD, EngineInfo, detections_to_rows,
                                faces_to_rows, served_faces)
from tools.engine.reference import ReferencePipeline, clip_to_image
from tools.sample_images import selfie, selfie_dir
from tools.settings import topk_plan
from tools.evaluation.wider_protocol import average_precision

__all__ = ["PROTOCOL_FRAME", "CLASS_NAMES", "SETTINGS", "SelfieTruth", "load_labels",
           "to_protocol_frame", "selfie_curves", "reference_rows", "saturation", "evaluate_run",
           "evaluate_uncapped"]

PROTOCOL_FRAME = (2048, 1152)  # (width, height) the benchmark compares boxes in
CLASS_NAMES = {0: "clear", 1: "dim", 2: "guessed"}
SETTINGS = ("all", "clear")
KEY = "selfie"


@dataclass(frozen=True)
class SelfieTruth:
    """Labelled faces: ``boxes [N, 4]`` x, y, w, h in protocol-frame pixels, ``classes [N]``."""

    boxes: np.ndarray
    classes: np.ndarray

    def counts(self, setting: str) -> np.ndarray:
        """Which faces count in ``setting`` (``all`` or ``clear``); the others are ignored."""
        return np.ones(len(self.classes), bool) if setting == "all" else self.classes == 0


def load_labels(path: Path | None = None, frame: tuple[int, int] = PROTOCOL_FRAME) -> SelfieTruth:
    """Read YOLO rows ``class cx cy w h`` (normalised) into boxes in ``frame`` pixels."""
    rows = np.loadtxt(path or selfie_dir() / "selfie.txt", dtype=np.float64, ndmin=2)
    scale = np.array(frame * 2, np.float64)
    centre, size = rows[:, 1:3] * scale[:2], rows[:, 3:5] * scale[2:]
    return SelfieTruth(np.column_stack([centre - size / 2, size]), rows[:, 0].astype(np.int64))


def to_protocol_frame(rows: np.ndarray, image_size: tuple[int, int],
                      frame: tuple[int, int] = PROTOCOL_FRAME) -> np.ndarray:
    """WIDER rows ``[M, 5]`` (x, y, w, h, score) from pixels of an ``image_size`` (w, h) image
    into ``frame`` pixels; scores unchanged."""
    sx, sy = frame[0] / image_size[0], frame[1] / image_size[1]
    return np.asarray(rows, np.float64).reshape(-1, 5) * np.array([sx, sy, sx, sy, 1.0])


def selfie_curves(rows: np.ndarray, truth: SelfieTruth) -> dict[str, dict]:
    """AP (percent), precision and recall per setting for protocol-frame ``rows``."""
    out = {}
    for setting in SETTINGS:
        ap, precision, recall = average_precision({KEY: rows}, {KEY: truth.boxes},
                                                  {KEY: truth.counts(setting)})
        out[setting] = {"ap": 100.0 * ap, "precision": precision, "recall": recall}
    return out


def reference_rows(pipeline: ReferencePipeline, image: np.ndarray, topk: int,
                   max_detections: int) -> np.ndarray:
    """The in-process reference (original graph + numpy decode + OpenCV NMS) on ``image``, with
    the SDK's letterbox, score threshold 0.02, clipped to the image like the SDK: WIDER rows in
    original pixels."""
    boxed, placement = letterbox(image, pipeline.width, pipeline.height)
    det = pipeline.detect(boxed[None], np.array([placement.scale], np.float32), topk=topk,
                          score_threshold=EVAL_SCORE_THRESHOLD, max_detections=max_detections)[0]
    return detections_to_rows(clip_to_image(det, image.shape[1], image.shape[0]))


def saturation(pipeline: ReferencePipeline, image: np.ndarray, engine: EngineInfo,
               detections: int) -> dict:
    """Whether top-K or MAX_DET bound the result: anchors above the threshold before top-K (all
    of them, from the reference decode) against TOPK, chunk by chunk where the engine's top-K is
    chunked (``tools.settings.topk_plan``), and faces after NMS against MAX_DET."""
    boxed, _ = letterbox(image, pipeline.width, pipeline.height)
    above = pipeline.decoded(boxed[None])[0, :, 4] > EVAL_SCORE_THRESHOLD
    chunks, per_chunk = topk_plan(engine.topk)
    fullest = int(above.reshape(-1, chunks).sum(axis=0).max())
    return {"anchors_above_threshold": int(above.sum()), "topk": engine.topk, "topk_chunks": chunks,
            "fullest_chunk": fullest, "topk_saturated": fullest > per_chunk, "detections": detections,
            "max_detections": engine.max_detections,
            "max_detections_reached": detections >= engine.max_detections}


def evaluate_run(url: str, engine: EngineInfo, pipeline: ReferencePipeline,
                 truth: SelfieTruth | None = None, image: np.ndarray | None = None,
                 transport: str = "auto") -> dict:
    """Served (``url``, SDK over ``transport``: ``encoded`` sends the photo as the SDK's JPEG)
    and in-process reference AP on the selfie at the engine's size, top-K and MAX_DET. Returns
    JSON-ready numbers plus the curves under ``"curves"``."""
    truth = truth or load_labels()
    image = selfie() if image is None else image
    if image is None:
        raise FileNotFoundError(f"no selfie.jpg in {selfie_dir()}")
    if (pipeline.width, pipeline.height) != (engine.width, engine.height):
        raise ValueError(f"reference at {pipeline.width}x{pipeline.height}, engine at "
                         f"{engine.width}x{engine.height}: compare at the same size")
    size = (image.shape[1], image.shape[0])
    served = faces_to_rows(served_faces(url, [image], EVAL_SCORE_THRESHOLD, transport=transport)[0])
    reference = reference_rows(pipeline, image, engine.topk, engine.max_detections)
    curves = {"served": selfie_curves(to_protocol_frame(served, size), truth),
              "reference": selfie_curves(to_protocol_frame(reference, size), truth)}
    report = {"engine": engine.as_dict(),
              "faces": {"all": len(truth.classes),
                        **{name: int(np.sum(truth.classes == c)) for c, name in CLASS_NAMES.items()}}}
    for path, rows in (("served", served), ("reference", reference)):
        report[path] = {setting: round(curves[path][setting]["ap"], 3) for setting in SETTINGS}
        report[path]["detections"] = len(rows)
    report["ap_difference"] = {s: round(report["served"][s] - report["reference"][s], 3)
                               for s in SETTINGS}
    report["saturation"] = saturation(pipeline, image, engine, len(reference))
    report["curves"] = curves
    return report


def evaluate_uncapped(pipeline: ReferencePipeline, truth: SelfieTruth, image: np.ndarray) -> dict:
    """The in-process reference with no top-K or MAX_DET cap (every anchor enters NMS): what
    the model finds on the selfie at this size when no candidate limit binds."""
    anchors = len(pipeline.priors)
    rows = reference_rows(pipeline, image, topk=anchors, max_detections=anchors)
    curves = selfie_curves(to_protocol_frame(rows, (image.shape[1], image.shape[0])), truth)
    return {**{s: round(curves[s]["ap"], 3) for s in SETTINGS}, "detections": len(rows),
            "curves": curves}
