"""Validation with Polygraphy: the rewritten graph must reproduce the original graph plus the
reference decode and top-K on real face images, within 1e-4 (absolute or relative)."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CompareFunc

try:  # Polygraphy >= 0.53 names the simple comparison as a class
    from polygraphy.comparator import SimpleCompareFunc
except ImportError:
    SimpleCompareFunc = CompareFunc.simple
from rtface_client.letterbox import letterbox

from tools.engine.reference import ReferencePipeline
from tools.sample_images import astronaut, face_canvas, selfie
from tools.engine.surgery import INPUT_NAME, OUTPUT_NAME

__all__ = ["ReferenceRunner", "validation_feeds", "compare_with_reference", "TOLERANCE"]

TOLERANCE = 1e-4
CANVAS_SIZES = ((800, 600), (1280, 960), (1920, 1080))


class ReferenceRunner(BaseRunner):
    """A Polygraphy runner for :class:`ReferencePipeline`: uint8 ``images`` in, ``candidates`` out."""

    def __init__(self, pipeline: ReferencePipeline, topk: int):
        super().__init__(name="reference(original graph + numpy decode + top-K)")
        self._pipeline, self._topk = pipeline, topk

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return TensorMetadata().add(INPUT_NAME, np.uint8,
                                    (None, self._pipeline.height, self._pipeline.width, 3))

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        out = OrderedDict([(OUTPUT_NAME, self._pipeline.candidates(feed_dict[INPUT_NAME], self._topk))])
        self.inference_time = time.perf_counter() - start
        return out


def validation_feeds(width: int, height: int) -> list[dict[str, np.ndarray]]:
    """Real-face inputs letterboxed to ``width`` x ``height``: the astronaut, the selfie when
    present, and multi-face canvases at several sizes; the last feed is a batch of two."""
    images = [astronaut()] + [face_canvas(seed, w, h, count=6).image
                              for seed, (w, h) in enumerate(CANVAS_SIZES)]
    crowd = selfie()
    if crowd is not None:
        images.append(crowd)
    boxed = [letterbox(image, width, height)[0] for image in images]
    feeds = [{INPUT_NAME: b[None]} for b in boxed]
    feeds.append({INPUT_NAME: np.stack(boxed[:2])})
    return feeds


def compare_with_reference(rewritten: bytes, pipeline: ReferencePipeline, topk: int) -> bool:
    """Run the rewritten graph (onnxruntime, CPU) and the reference side by side through
    Polygraphy's Comparator; True when every output agrees within :data:`TOLERANCE`."""
    runners = [OnnxrtRunner(SessionFromOnnx(rewritten, providers=["cpu"]),
                            name="rewritten(onnxruntime)"),
               ReferenceRunner(pipeline, topk)]
    feeds = validation_feeds(pipeline.width, pipeline.height)
    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(
        results, compare_func=SimpleCompareFunc(atol=TOLERANCE, rtol=TOLERANCE))
    return bool(accuracy)
