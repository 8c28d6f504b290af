"""Backend parity: the same images through each way of running the detector, face by face.

Paths, all at the served engine's size, letterboxed by the SDK's :func:`letterbox`:

- ``in-process``: the rewritten graph (:func:`tools.engine.surgery.rewrite`) on onnxruntime in this
  process, then :func:`tools.engine.reference.nms_reference`, the letterbox undone, clipped to the image;
- ``served onnxruntime``: the Triton ensemble with the onnxruntime detector, through the SDK;
- ``served TensorRT FP16``: the same with a TensorRT plan, where TensorRT and a GPU exist.

Each served path is compared with the in-process one: faces paired one to one at IoU >= 0.9
(:func:`tools.matching.match_boxes`); matched rate = pairs / the larger face count of the two
(a face missing on either side counts against it); score and landmark differences over pairs,
landmarks in original-image pixels. The agreeing rate counts only the pairs that are also within
``AGREE_SCORE`` in score and ``AGREE_LANDMARK_PX`` in landmarks (the GPU parity goal's per-face test).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from rtface_client import Face
from rtface_client.letterbox import letterbox

from tools.evaluation.served import EngineInfo, served_faces
from tools.matching import match_boxes
from tools.engine.source import SourceModel
from tools.engine.reference import Detections, clip_to_image, nms_reference
from tools.sample_images import astronaut, face_canvas, selfie
from tools.engine.surgery import rewrite

__all__ = ["MATCH_IOU", "AGREE_SCORE", "AGREE_LANDMARK_PX", "IOU_THRESHOLD", "ParityStats", "parity_images", "RewrittenGraph",
           "faces_to_detections", "compare", "compare_served"]

MATCH_IOU = 0.9
AGREE_SCORE = 0.01       # |score difference| of an agreeing pair
AGREE_LANDMARK_PX = 0.5  # mean landmark distance of an agreeing pair, original pixels
IOU_THRESHOLD = 0.4  # the served default NMS threshold
CANVAS_SIZES = ((800, 600), (1280, 960), (1920, 1080))


def parity_images(canvases: int = 6, with_selfie: bool = True) -> dict[str, np.ndarray]:
    """Named BGR images: the astronaut, the selfie (when present and asked for), and
    ``canvases`` face canvases (six faces each) cycling through three sizes."""
    images = {"astronaut": astronaut()}
    crowd = selfie() if with_selfie else None
    if crowd is not None:
        images["selfie"] = crowd
    for seed in range(canvases):
        w, h = CANVAS_SIZES[seed % len(CANVAS_SIZES)]
        images[f"canvas{seed}-{w}x{h}"] = face_canvas(seed, w, h, count=6).image
    return images


class RewrittenGraph:
    """The served detector graph (rewritten ONNX bytes) on onnxruntime in this process, with the
    reference NMS and letterbox undo: faces in original pixels."""

    def __init__(self, onnx_bytes: bytes, width: int, height: int, threads: int = 0):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.width, self.height = width, height

    @classmethod
    def from_source(cls, source: SourceModel, width: int, height: int, topk: int) -> "RewrittenGraph":
        """Rewrite ``source`` for a ``width`` x ``height`` engine with ``topk`` candidates, as
        ``make engine`` does, and load the result."""
        model, _ = rewrite(source.load(), width, height, topk, source.convention)
        return cls(model.SerializeToString(), width, height)

    def detect(self, image: np.ndarray, score_threshold: float, max_detections: int,
               iou_threshold: float = IOU_THRESHOLD) -> Detections:
        """Faces of one BGR ``image``, sorted by score, clipped to the image."""
        boxed, placement = letterbox(image, self.width, self.height)
        candidates = self._session.run(None, {"images": boxed[None]})[0][0]
        kept = nms_reference(candidates, score_threshold, iou_threshold, max_detections)
        scale = np.float32(placement.scale)
        det = Detections(kept[:, :4] / scale, kept[:, 4], kept[:, 5:].reshape(-1, 5, 2) / scale)
        return clip_to_image(det, image.shape[1], image.shape[0])


def faces_to_detections(faces: list[Face]) -> Detections:
    """SDK faces as :class:`Detections` (original pixels)."""
    return Detections(np.array([f.box for f in faces], np.float32).reshape(-1, 4),
                      np.array([f.score for f in faces], np.float32),
                      np.array([f.landmarks for f in faces], np.float32).reshape(-1, 5, 2))


@dataclass
class ParityStats:
    """Face-level agreement of one path with the in-process one, summed over images."""

    reference_faces: int = 0
    faces: int = 0
    matched: int = 0
    score_deltas: list[float] = field(default_factory=list)
    landmark_errors: list[float] = field(default_factory=list)  # per face, mean over 5 points

    def add(self, reference: Detections, other: Detections, min_iou: float = MATCH_IOU) -> None:
        pairs = match_boxes(reference.boxes, other.boxes, min_iou)
        ref_idx = np.flatnonzero(pairs >= 0)
        other_idx = pairs[ref_idx]
        self.reference_faces += len(reference.scores)
        self.faces += len(other.scores)
        self.matched += len(ref_idx)
        self.score_deltas += np.abs(reference.scores[ref_idx] - other.scores[other_idx]).tolist()
        distance = np.linalg.norm(reference.landmarks[ref_idx] - other.landmarks[other_idx], axis=-1)
        self.landmark_errors += distance.mean(axis=-1).tolist()

    @property
    def matched_rate(self) -> float:
        """Pairs / the larger face count (1.0 when neither path found a face)."""
        return self.matched / max(self.reference_faces, self.faces) if self.faces else 1.0

    @property
    def agreeing_rate(self) -> float:
        """Pairs within ``AGREE_SCORE`` and ``AGREE_LANDMARK_PX`` / the larger face count."""
        agreeing = sum(d <= AGREE_SCORE and e <= AGREE_LANDMARK_PX
                       for d, e in zip(self.score_deltas, self.landmark_errors))
        return agreeing / max(self.reference_faces, self.faces) if self.faces else 1.0

    def summary(self) -> dict:
        deltas, errors = np.array(self.score_deltas), np.array(self.landmark_errors)
        return {"reference_faces": self.reference_faces, "faces": self.faces,
                "matched": self.matched, "matched_rate": self.matched_rate, "agreeing_rate": self.agreeing_rate,
                "mean_abs_score_delta": float(deltas.mean()) if deltas.size else 0.0,
                "max_abs_score_delta": float(deltas.max(initial=0.0)),
                "mean_landmark_error_px": float(errors.mean()) if errors.size else 0.0,
                "max_landmark_error_px": float(errors.max(initial=0.0))}


def compare(reference: list[Detections], other: list[Detections], min_iou: float = MATCH_IOU) -> ParityStats:
    """Agreement of ``other`` with ``reference``, image by image (same order), faces matched at
    IoU >= ``min_iou``."""
    stats = ParityStats()
    for ref, det in zip(reference, other, strict=True):
        stats.add(ref, det, min_iou)
    return stats


def compare_served(url: str, engine: EngineInfo, graph: RewrittenGraph,
                   images: dict[str, np.ndarray], score_threshold: float, min_iou: float = MATCH_IOU) -> dict:
    """The in-process rewritten graph vs the server at ``url`` on ``images`` at one threshold;
    a :meth:`ParityStats.summary` plus the per-image face counts."""
    if (graph.width, graph.height) != (engine.width, engine.height):
        raise ValueError("the in-process graph and the served engine differ in input size")
    local = [graph.detect(image, score_threshold, engine.max_detections) for image in images.values()]
    served = [faces_to_detections(faces)
              for faces in served_faces(url, list(images.values()), score_threshold)]
    summary = compare(local, served, min_iou).summary()
    summary["per_image"] = {name: [len(a.scores), len(b.scores)]
                            for name, a, b in zip(images, local, served)}
    return summary
