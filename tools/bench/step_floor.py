"""The served pipeline's floor: a copy of a built model repository whose Python steps answer at
once without computing (a detector that hands on candidates hands on one zero row per top-K
chunk; the postprocess, and a detector that finishes its detections itself, no faces). Configs,
instance groups and transports stay the build's own, so a trace of the copy (``TRACE_FILE``, :mod:`tools.bench.trace_report`) shows what each step costs before it computes:
Triton handing the request to the step's stub process and the response back.

``python -m tools.bench.step_floor BUILT_REPOSITORY TARGET``, then serve ``TARGET``
(``MODEL_REPOSITORY=TARGET make serve``). A TensorRT detector is not a Python step and stays.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tools.engine import record, repository

__all__ = ["FloorError", "write_floor", "main"]

_HEAD = '''"""A step of the served pipeline's floor (tools/bench/step_floor.py): answers without computing."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def batch(request, *names):
    tensor = next(t for t in map(lambda n: pb_utils.get_input_tensor_by_name(request, n), names) if t is not None)
    return tensor.shape()[0]


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
'''

DETECTOR = _HEAD + '''
    def execute(self, requests):
        chunks = int(self.config["parameters"]["topk_chunks"]["string_value"])
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("candidates", np.zeros((batch(r, "images"), chunks, 15), np.float32))])
            for r in requests]
'''

FACES = _HEAD + '''
    def execute(self, requests):
        shapes = {"num_detections": (1,), "boxes": (1, 4), "scores": (1,), "landmarks": (1, 5, 2), "capped": (1,)}
        kinds = {"num_detections": np.int32, "capped": np.int32, "image_size": np.int32}
        responses = []
        for r in requests:
            n = batch(r, "letterbox", "images", "image")
            mine = {**shapes, **({"image_size": (2,)} if pb_utils.get_input_tensor_by_name(r, "image") is not None else {})}
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.zeros((n,) + shape, kinds.get(name, np.float32))) for name, shape in mine.items()]))
        return responses
'''


class FloorError(ValueError):
    """The source is not a built model repository."""


def write_floor(source: Path, target: Path) -> Path:
    """Copy the built repository ``source`` to ``target`` with every Python step's model files
    replaced by ones that answer without computing; returns ``target``."""
    if record.read(source) is None:
        raise FloorError(f"{source} holds no build: run `make engine` first, or name a built repository")
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    for step in (repository.DETECTOR, repository.POSTPROCESS):
        config = (target / step / "config.pbtxt").read_text()
        if 'backend: "python"' not in config:
            continue
        code = FACES if 'name: "num_detections"' in config else DETECTOR
        for name in ("model.py", repository.TORCH_MODEL_FILE):
            (target / step / "1" / name).write_text(code)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    try:
        print(write_floor(args.source.resolve(), args.target.resolve()))
    except FloorError as exc:
        print(f"step floor: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
