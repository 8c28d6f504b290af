"""The TensorRT path's checks that need no TensorRT: which layers an FP16 plan keeps in FP32,
the builder/server version tie, and the readiness check's opset and Resize limits. The plan build
itself is in ``test_engine_pipeline.py`` and skips without TensorRT and a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from tools.engine import record, repository
from tools.engine.source import load_source_model
from tools.engine.surgery import rewrite
from tools.engine.tensorrt_check import check_tensorrt_readiness
from tools.engine.backends.tensorrt import (TensorRTBuildError, check_versions_match, fp32_layer_names,
                                            serving_tensorrt_version)
from tools.settings import REPO_ROOT


@pytest.fixture(scope="module")
def rewritten_model() -> onnx.ModelProto:
    return rewrite(load_source_model().load(), 640, 640, 1000)[0]


def test_fp16_plans_keep_preprocessing_softmax_decode_and_topk_in_fp32(rewritten_model):
    names, tensors = fp32_layer_names(rewritten_model)
    ops = {node.name: node.op_type for node in rewritten_model.graph.node}
    pinned = {ops[name] for name in names}
    assert {"Cast", "Sub", "Softmax", "Exp", "TopK", "GatherElements"} <= pinned
    assert "Conv" not in pinned and "LeakyRelu" not in pinned
    assert {"candidates", "conf"} <= tensors


def test_a_plan_for_another_tensorrt_is_refused_in_one_line_naming_the_fix():
    check_versions_match("10.7.0", "10.7.0", "make engine")
    check_versions_match("10.7.0", None, "make engine")  # serving side unknown: nothing to compare
    with pytest.raises(TensorRTBuildError) as caught:
        check_versions_match("10.8.0", "10.7.0", "make engine")
    message = str(caught.value)
    assert "\n" not in message and "10.8.0" in message and "10.7.0" in message and "24.12" in message


def test_the_servers_tensorrt_is_read_from_the_environment_or_its_libnvinfer(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_TENSORRT_VERSION", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    (tmp_path / "libnvinfer.so.10.7.0").write_bytes(b"")
    assert serving_tensorrt_version() == "10.7.0"
    monkeypatch.setenv("TRITON_TENSORRT_VERSION", "10.3.0.26")
    assert serving_tensorrt_version() == "10.3.0"


def test_make_serve_refuses_a_plan_built_by_another_tensorrt(tmp_path):
    repo = repository.copy_model_code(tmp_path / "repo")
    plan = repo / repository.DETECTOR / "1" / "model.plan"
    plan.write_bytes(b"a plan")
    (plan.parent / "build.json").write_text(json.dumps({
        "backend": "tensorrt", "tensorrt_builder": "10.8.0", "artifact_sha256": record.file_sha256(plan)}))
    result = subprocess.run([sys.executable, "-m", "tools.serve"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "MODEL_REPOSITORY": str(repo), "TRITON_TENSORRT_VERSION": "10.7.0"},
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "TensorRT 10.8.0" in line and "TensorRT 10.7.0" in line


def _one_node_model(node: gs.Node, x: gs.Variable, y: gs.Variable, opset: int) -> onnx.ModelProto:
    return gs.export_onnx(gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=opset))


def test_readiness_rejects_opsets_past_tensorrt_10s_parser_and_half_pixel_symmetric_resize():
    x, y = gs.Variable("x", np.float32, [1, 3, 8, 8]), gs.Variable("y", np.float32)
    scales = gs.Constant("scales", np.array([1, 1, 2, 2], np.float32))
    resize = gs.Node("Resize", "resize", {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
                     [x, gs.Constant("roi", np.zeros(0, np.float32)), scales], [y])
    problems = check_tensorrt_readiness(_one_node_model(resize, x, y, opset=21))
    assert any("opset 21" in p for p in problems)
    assert any("half_pixel_symmetric" in p for p in problems)


@pytest.fixture(scope="module")
def real_candidates(rewritten_model) -> np.ndarray:
    """onnxruntime's candidates for a 640x640 canvas with six pasted faces."""
    import onnxruntime as ort
    from rtface_client.letterbox import letterbox

    from tools.sample_images import face_canvas

    frame = letterbox(face_canvas(4, 800, 600, count=6).image, 640, 640)[0][None]
    session = ort.InferenceSession(rewritten_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": frame})[0][0]


def test_detection_check_flags_missing_and_extra_faces_and_landmark_drift(real_candidates):
    from tools.engine.detections import Tolerance, compare_detections

    tolerance = Tolerance(unmatched=0.0)
    same = compare_detections(real_candidates, real_candidates.copy(), tolerance)
    assert same.expected >= 5 and same.problems(tolerance) == []

    strong = np.flatnonzero(real_candidates[:, 4] > 0.5)
    fewer = real_candidates.copy()
    fewer[np.abs(fewer[:, :4] - real_candidates[strong[0], :4]).max(axis=1) < 30, 4] = 0.0  # one face gone
    assert compare_detections(real_candidates, fewer, tolerance).missing == 1
    assert compare_detections(fewer, real_candidates, tolerance).extra == 1

    drift = real_candidates.copy()
    drift[:, 5:] += 2.0  # every landmark 2 px off, boxes and scores untouched
    problems = compare_detections(real_candidates, drift, tolerance).problems(tolerance)
    assert problems and all("landmark" in p for p in problems)
