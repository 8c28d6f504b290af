"""The reference pipeline everything served is checked against: the *original* ONNX export on
onnxruntime, the numpy decode of :mod:`tools.engine.priors`, a stable top-K, OpenCV's NMS.

It shares no code with the rewritten graph or the Triton models, so agreement means something.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort

from tools.engine.source import SourceModel
from tools.engine.priors import decode_reference, make_priors
from tools.settings import BuildSettings, topk_plan

__all__ = ["Detections", "ReferencePipeline", "clip_to_image", "nms_reference"]


@dataclass(frozen=True)
class Detections:
    """Faces of one image: ``boxes [M, 4]`` (x1, y1, x2, y2), ``scores [M]``, ``landmarks [M, 5, 2]``;
    pixels of the image the caller says (network or original), sorted by score."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray


def clip_to_image(det: Detections, width: int, height: int) -> Detections:
    """Clip boxes and landmarks to ``[0, width] x [0, height]``."""
    limit = np.array([width, height], dtype=np.float32)
    boxes = np.clip(det.boxes.reshape(-1, 2, 2), 0, limit).reshape(-1, 4)
    return Detections(boxes, det.scores, np.clip(det.landmarks, 0, limit))


def nms_reference(candidates: np.ndarray, score_threshold: float, iou_threshold: float,
                  max_detections: int) -> np.ndarray:
    """Threshold (score > t) and OpenCV's greedy NMS over one image's ``[K, 15]`` candidates."""
    cand = candidates[candidates[:, 4] > score_threshold]
    xywh = np.column_stack([cand[:, :2], cand[:, 2:4] - cand[:, :2]]).astype(np.float64)
    keep = np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), cand[:, 4].tolist(), score_threshold,
                                       iou_threshold), dtype=np.int64).reshape(-1)
    return cand[keep[:max_detections]]


class ReferencePipeline:
    """The original RetinaFace graph on onnxruntime (CPU) plus numpy post-processing."""

    def __init__(self, source: SourceModel, width: int, height: int, threads: int = 0):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(source.data, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.convention = source.convention
        self.width, self.height = width, height
        self.priors = make_priors(width, height)

    def forward(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the original graph on letterboxed ``images`` (uint8 ``[N, H, W, 3]`` BGR), fed as
        its input convention says."""
        blob = self.convention.apply(images)
        loc, conf, marks = self._session.run(["loc", "conf", "landmarks"], {self._input: blob})
        return {"loc": loc, "conf": conf, "landmarks": marks}

    def decoded(self, images: np.ndarray) -> np.ndarray:
        """All decoded anchors, ``[N, P, 15]`` in network pixels, in anchor order."""
        raw = self.forward(images)
        return decode_reference(raw["loc"], raw["conf"], raw["landmarks"], self.priors)

    def candidates(self, images: np.ndarray, topk: int) -> np.ndarray:
        """The ``topk`` best anchors per image, ``[N, topk, 15]`` in network pixels — what the
        rewritten graph must output: sorted by score (ties by anchor index); past TensorRT's
        largest K, chunk by chunk (anchor ``a`` in chunk ``a mod C``, ``tools.settings.topk_plan``),
        each chunk sorted. ``topk`` at or above the anchor count: every anchor, sorted."""
        decoded = self.decoded(images)
        batch, anchors = decoded.shape[:2]
        if topk >= anchors:
            order = np.argsort(-decoded[..., 4], axis=1, kind="stable")
        else:
            chunks, per_chunk = topk_plan(topk)
            scores = decoded[..., 4].reshape(batch, anchors // chunks, chunks)
            rows = np.argsort(-scores, axis=1, kind="stable")[:, :per_chunk]  # [N, k, C]
            order = (rows * chunks + np.arange(chunks)).transpose(0, 2, 1).reshape(batch, -1)
        return np.take_along_axis(decoded, order[..., None], axis=1)

    def detect(self, images: np.ndarray, scales: np.ndarray, topk: int = BuildSettings.topk,
               score_threshold: float = 0.5, iou_threshold: float = 0.4,
               max_detections: int = BuildSettings.max_detections) -> list[Detections]:
        """Faces per image in original pixels (network / scale, top-left letterbox), unclipped."""
        results = []
        for cand, scale in zip(self.candidates(images, topk), scales):
            kept = nms_reference(cand, score_threshold, iou_threshold, max_detections)
            scale = np.float32(scale)
            results.append(Detections(kept[:, :4] / scale, kept[:, 4],
                                      kept[:, 5:].reshape(-1, 5, 2) / scale))
        return results
