"""Real input data for perf_analyzer (``--input-data``): letterboxed face images, the same frames
as JPEG files for the encoded ensemble, and, for the post-processing model alone, the detector's
real candidates for them.

perf_analyzer's JSON holds one entry per request (batch 1); each tensor is written as
``{"content": {"b64": ...}, "shape": [...]}``: the raw little-endian bytes in base64, which keeps a
1280x960x3 frame at ~4.9 MB instead of ~15 MB of decimal text. A BYTES tensor's b64 holds its
serialized form, each element's length (4 bytes, little-endian) before its bytes.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.engine import repository
from tools import sample_images
from tools.server_info import engine_size, model_config

__all__ = ["Frame", "output_bytes", "sample_frames", "tensor_entry", "bytes_entry", "jpeg_frame",
           "detector_candidates", "input_data", "write_input_data"]

CANVAS_SEEDS = (1, 2)  # synthetic canvases beside the astronaut and the selfie
_ITEM_BYTES = {"TYPE_UINT8": 1, "TYPE_FP16": 2, "TYPE_INT32": 4, "TYPE_FP32": 4, "TYPE_INT64": 8}


@dataclass(frozen=True)
class Frame:
    """One letterboxed request: ``image`` H x W x 3 BGR uint8 at the engine size and its
    ``letterbox`` row (scale, pad_x, pad_y), float32."""

    name: str
    image: np.ndarray
    letterbox: np.ndarray


def output_bytes(config: dict, max_detections: int) -> int:
    """The largest output of one batch-1 request of the model ``config`` describes, in bytes, a
    variable dimension counted as ``max_detections`` rows (e.g. ``landmarks`` [-1, 5, 2] FP32 =
    120,000 bytes at MAX_DET 3000)."""
    return max(int(np.prod([max_detections if int(d) < 0 else int(d) for d in tensor["dims"]]))
               * _ITEM_BYTES[tensor["data_type"]] for tensor in config["output"])


def sample_frames(width: int, height: int) -> list[Frame]:
    """The astronaut, the selfie (when present) and synthetic canvases, letterboxed to
    ``width`` x ``height`` network pixels."""
    from rtface_client.letterbox import letterbox

    sources = [("astronaut", sample_images.astronaut()), ("selfie", sample_images.selfie())]
    sources += [(f"canvas{seed}", sample_images.face_canvas(seed).image) for seed in CANVAS_SEEDS]
    frames = []
    for name, image in sources:
        if image is not None:
            boxed, placement = letterbox(image, width, height)
            frames.append(Frame(name, boxed, placement.as_row()))
    return frames


def tensor_entry(array: np.ndarray) -> dict:
    """One tensor of one batch-1 request in perf_analyzer's JSON: base64 bytes and the shape."""
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"content": {"b64": base64.b64encode(data.tobytes()).decode("ascii")},
            "shape": list(array.shape)}


def bytes_entry(data: bytes) -> dict:
    """One BYTES element (e.g. an encoded image) of one batch-1 request in perf_analyzer's JSON."""
    return {"content": {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")},
            "shape": [1]}


def jpeg_frame(frame: Frame) -> bytes:
    """``frame``'s pixels as the JPEG the SDK would send for them (its quality, encoded once)."""
    from rtface_client.images import encode_image

    return encode_image(frame.image)


def detector_candidates(url: str, frames: list[Frame]) -> list[np.ndarray]:
    """Run ``retinaface_detector`` on the server at ``url`` (gRPC) once, on all ``frames`` as one
    batch at the default score threshold, and return each frame's ``candidates`` [R, 15] float32,
    network pixels: what the detector hands the postprocess for a request holding these frames
    (every top-K chunk trimmed to the rows some frame passes, so all share one shape and stack
    into perf_analyzer's batches)."""
    import tritonclient.grpc as grpcclient

    batch = np.stack([frame.image for frame in frames])
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput("images", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        result = client.infer(repository.DETECTOR, [tensor], outputs=[grpcclient.InferRequestedOutput("candidates")])
    return list(result.as_numpy("candidates"))


def input_data(model: str, url: str, frames: list[Frame]) -> dict:
    """perf_analyzer's ``--input-data`` document for ``model`` (ensemble, detector or
    post-processing), one request per frame."""
    if model == repository.POSTPROCESS:
        steps = [{"candidates": tensor_entry(c), "letterbox": tensor_entry(f.letterbox)}
                 for c, f in zip(detector_candidates(url, frames), frames)]
    elif model == repository.DETECTOR:  # with letterbox rows where it takes them (the torch detector)
        rows = any(tensor["name"] == "letterbox" for tensor in model_config(url, model)["input"])
        steps = [{"images": tensor_entry(f.image), **({"letterbox": tensor_entry(f.letterbox)} if rows else {})}
                 for f in frames]
    elif model == repository.ENSEMBLE:
        steps = [{"images": tensor_entry(f.image), "letterbox": tensor_entry(f.letterbox)}
                 for f in frames]
    elif model == repository.ENCODED:
        steps = [{"image": bytes_entry(jpeg_frame(f))} for f in frames]
    else:
        raise ValueError(f"MODEL={model!r}: use {repository.ENSEMBLE}, {repository.ENCODED}, "
                         f"{repository.DETECTOR} or {repository.POSTPROCESS}")
    return {"data": steps}


def write_input_data(model: str, url: str, path: Path) -> Path:
    """Generate the real-data JSON for ``model`` against the server at ``url`` into ``path``."""
    frames = sample_frames(*engine_size(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(model, url, frames)))
    return path
