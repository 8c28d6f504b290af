"""Triton Python model: RetinaFace detections from the detector's top-K candidates.

Per image: score threshold, greedy NMS, letterbox undone (original = (network - pad) / scale),
clipped to the network frame, padded to MAX_DET rows of zeros. numpy only, and nothing from
outside this file, so the model repository runs in a stock Triton container.

Options come from ``config.pbtxt`` parameters (defaults) and, per request, from request
parameters ``score_threshold``, ``iou_threshold`` and ``max_detections``.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

TINY = np.finfo(np.float32).tiny  # keeps IoU finite for degenerate (zero-area) boxes
SCALE_RANGE = (1e-3, 1e4)  # network pixels per original pixel: beyond these, coordinates are nonsense
OPTION_TYPES = {"score_threshold": float, "iou_threshold": float, "max_detections": int}


class RequestError(ValueError):
    """A request the model cannot serve; its message goes back as the error status."""


def nms(boxes, iou_threshold, limit):
    """Indices kept by greedy NMS over ``boxes`` [M, 4] already sorted by descending score;
    a box is dropped when its IoU with a kept one exceeds ``iou_threshold``."""
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.arange(len(boxes))
    keep = []
    while order.size and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        height = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = width * height
        union = np.maximum(areas[best] + areas[rest] - inter, TINY)
        order = rest[inter / union <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def invalid_argument(message):
    """A TritonError with status INVALID_ARG where this Triton version supports error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


class TritonPythonModel:
    """Threshold + NMS + letterbox undo, one response per request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        outputs = {o["name"]: o for o in config["output"]}
        self.max_det = int(outputs["boxes"]["dims"][0])
        self.frame = np.array([float(params["network_width"]), float(params["network_height"])],
                              dtype=np.float32)
        self.defaults = self._validated({name: kind(params[name]) for name, kind in OPTION_TYPES.items()
                                         if name in params})
        self.defaults.setdefault("max_detections", self.max_det)

    def _validated(self, options):
        score = options.get("score_threshold")
        if score is not None and not 0.0 <= score <= 1.0:
            raise RequestError(f"score_threshold={score} is out of range: use 0..1")
        iou = options.get("iou_threshold")
        if iou is not None and not 0.0 < iou <= 1.0:
            raise RequestError(f"iou_threshold={iou} is out of range: use a value in (0, 1]")
        count = options.get("max_detections")
        if count is not None and not 1 <= count <= self.max_det:
            raise RequestError(f"max_detections={count} is out of range: use 1..{self.max_det}")
        return options

    def _options(self, request):
        raw = json.loads(request.parameters() or "{}")
        options = dict(self.defaults)
        for name, value in raw.items():
            kind = OPTION_TYPES.get(name)
            if kind is None:
                continue  # parameters meant for other steps or for Triton itself
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise RequestError(f"parameter {name}={value!r} must be a number")
            try:
                number = kind(value)
            except ValueError:
                raise RequestError(f"parameter {name}={value!r} is not a valid {kind.__name__}") from None
            if kind is int and float(value) != number:
                raise RequestError(f"parameter {name}={value!r} must be a whole number")
            if kind is float and not np.isfinite(number):
                raise RequestError(f"parameter {name}={value!r} must be finite")
            options[name] = number
        return self._validated(options)

    def _inputs(self, request):
        candidates = pb_utils.get_input_tensor_by_name(request, "candidates").as_numpy()
        placement = pb_utils.get_input_tensor_by_name(request, "letterbox").as_numpy()
        if placement.shape[0] != candidates.shape[0]:
            raise RequestError(f"letterbox has {placement.shape[0]} rows for a batch of "
                               f"{candidates.shape[0]} images; send one (scale, pad_x, pad_y) row per image")
        scale, pads = placement[:, 0], placement[:, 1:]
        if not (np.all(np.isfinite(placement)) and np.all((scale >= SCALE_RANGE[0]) & (scale <= SCALE_RANGE[1]))
                and np.all(np.abs(pads) <= self.frame.max())):
            raise RequestError(f"letterbox rows must be (scale, pad_x, pad_y) with scale in "
                               f"[{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] and |pad| <= {self.frame.max():g}, "
                               "all finite; original = (network - pad) / scale")
        return candidates, placement

    def _detect(self, candidates, placement, options):
        batch = len(candidates)
        boxes = np.zeros((batch, self.max_det, 4), dtype=np.float32)
        scores = np.zeros((batch, self.max_det), dtype=np.float32)
        points = np.zeros((batch, self.max_det, 5, 2), dtype=np.float32)
        counts = np.zeros((batch, 1), dtype=np.int32)
        limit = options["max_detections"]
        passing = candidates[..., 4] > options["score_threshold"]
        for i in range(batch):
            rows = candidates[i][passing[i]]
            keep = nms(rows[:, :4], options["iou_threshold"], limit)
            kept = rows[keep]
            n = len(kept)
            scale, pad = placement[i, 0], placement[i, 1:3]
            corners = np.clip(kept[:, :4].reshape(n, 2, 2), 0, self.frame)
            marks = np.clip(kept[:, 5:].reshape(n, 5, 2), 0, self.frame)
            boxes[i, :n] = ((corners - pad) / scale).reshape(n, 4)
            points[i, :n] = (marks - pad) / scale
            scores[i, :n] = kept[:, 4]
            counts[i, 0] = n
        return [pb_utils.Tensor("num_detections", counts), pb_utils.Tensor("boxes", boxes),
                pb_utils.Tensor("scores", scores), pb_utils.Tensor("landmarks", points)]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                candidates, placement = self._inputs(request)
                tensors = self._detect(candidates, placement, self._options(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=invalid_argument(str(exc))))
        return responses
