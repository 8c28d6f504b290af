"""TensorRT plan build and check with Polygraphy (needs TensorRT and a GPU).

The plan has one optimization profile (batch min 1 / opt MAX_BATCH/2 / max MAX_BATCH) and is
compared with the rewritten graph on onnxruntime at detection level: every onnxruntime face
with score >= 0.5 must be found by the plan at IoU >= 0.9, with FP16-sized score differences.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from tools.matching import match_boxes
from tools.engine.reference import nms_reference
from tools.engine.surgery import INPUT_NAME, OUTPUT_NAME

__all__ = ["tensorrt_status", "build_plan", "compare_plan", "MATCH_IOU", "SCORE_TOLERANCE"]

MATCH_IOU = 0.9
SCORE_TOLERANCE = 0.02  # FP16 keeps ~3 significant digits; softmax scores move by ~1e-3..1e-2


def tensorrt_status() -> tuple[bool, str]:
    """Whether a TensorRT plan can be built here, and why (or why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (python -c 'import tensorrt' fails)"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "TensorRT is installed but no NVIDIA GPU is visible (no nvidia-smi)"
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if listing.returncode != 0 or "GPU" not in listing.stdout:
        return False, "TensorRT is installed but nvidia-smi lists no GPU"
    return True, f"TensorRT {tensorrt.__version__} and {listing.stdout.splitlines()[0]}"


def build_plan(onnx_bytes: bytes, plan_path: Path, width: int, height: int, max_batch: int,
               fp16: bool) -> Path:
    """Build a serialized TensorRT engine from the rewritten graph and save it at ``plan_path``."""
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxBytes,
                                        Profile, SaveEngine)

    shape = lambda batch: (batch, height, width, 3)  # noqa: E731
    profile = Profile().add(INPUT_NAME, min=shape(1), opt=shape(max(1, max_batch // 2)),
                            max=shape(max_batch))
    config = CreateConfig(fp16=fp16, profiles=[profile])
    SaveEngine(EngineBytesFromNetwork(NetworkFromOnnxBytes(onnx_bytes), config=config),
               path=str(plan_path))()
    return plan_path


def compare_plan(plan_path: Path, onnx_bytes: bytes, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """Run the plan and the rewritten graph on onnxruntime side by side (Polygraphy runners);
    return the disagreements at detection level (empty when they agree)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    runners = [TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path))), name="tensorrt"),
               OnnxrtRunner(SessionFromOnnx(onnx_bytes, providers=["cpu"]), name="onnxruntime")]
    results = Comparator.run(runners, data_loader=feeds)
    (_, plan_runs), (_, ort_runs) = results.items()
    problems = []
    for index, (plan_out, ort_out) in enumerate(zip(plan_runs, ort_runs)):
        for image, (plan_cand, ort_cand) in enumerate(zip(plan_out[OUTPUT_NAME], ort_out[OUTPUT_NAME])):
            expected = nms_reference(ort_cand, 0.5, 0.4, 10_000)
            found = nms_reference(plan_cand, 0.3, 0.4, 10_000)
            matches = match_boxes(expected[:, :4], found[:, :4], MATCH_IOU)
            missing = int((matches < 0).sum())
            matched = matches >= 0
            drift = np.abs(expected[matched, 4] - found[matches[matched], 4]).max(initial=0.0)
            if missing or drift > SCORE_TOLERANCE:
                problems.append(f"feed {index} image {image}: {missing} of {len(expected)} faces "
                                f"unmatched at IoU {MATCH_IOU}, max score drift {drift:.4f}")
    return problems
