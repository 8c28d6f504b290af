"""The model repository's names and files: the wire contract on the server's side.

Model and tensor names, the files each backend's detector is, and the committed model code.
What each model does is in its own folder under ``model_repository/``; what the configs say is
rendered from a plan (:mod:`tools.engine.configs`); the build record is :mod:`tools.engine.record`.
The SDK states its side of the contract itself (``rtface_client``); ``tests/test_wire_contract.py``
checks that both sides agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tools.settings import MODEL_REPOSITORY

__all__ = ["ENSEMBLE", "ENCODED", "PREPROCESS", "DETECTOR", "POSTPROCESS", "MODELS", "OUTPUTS", "ARTIFACTS",
           "TORCH_MODEL_FILE", "MODEL_REPOSITORY", "artifact_name", "copy_model_code"]

ENSEMBLE, DETECTOR, POSTPROCESS = "retinaface", "retinaface_detector", "retinaface_postprocess"
ENCODED, PREPROCESS = "retinaface_encoded", "retinaface_preprocess"  # encoded images in: decode + letterbox first
MODELS = (ENSEMBLE, ENCODED, PREPROCESS, DETECTOR, POSTPROCESS)
OUTPUTS = ("num_detections", "boxes", "scores", "landmarks", "capped")  # both ensembles'; the encoded one adds image_size
ARTIFACTS = {"tensorrt": "model.plan", "torch": "model.pt", "onnxruntime": "model.onnx"}
TORCH_MODEL_FILE = "model_torch.py"  # the torch Python models, beside model.py (onnxruntime detector, OpenCV preprocess)
GENERATED = ("config.pbtxt", *ARTIFACTS.values(), "*.pt2", "build.json", "__pycache__")


def artifact_name(backend: str) -> str:
    """The detector file Triton loads for ``backend``."""
    return ARTIFACTS[backend]


def copy_model_code(target: Path) -> Path:
    """Copy the committed model code of ``model_repository/`` (no generated configs or
    artifacts) into ``target``, so an engine can be built there without touching the real one."""
    shutil.copytree(MODEL_REPOSITORY, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*GENERATED))
    return target
