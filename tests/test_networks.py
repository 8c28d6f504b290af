"""The networks ``make engine MODEL=...`` builds: the input convention as data, the rewrites that
make a TensorFlow export's ops plain, the one-line refusals, and (where pip can make the converter's
environment) RetinaFace-MobileNetV2 converted, built and served equal to its own reference."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.conftest import configs
from tools.engine import networks, record, repository
from tools.engine.build import build
from tools.engine.conventions import BGR_MEAN, RGB, ConventionError, InputConvention, parse_convention
from tools.engine.source import ModelSourceError, load_source_model
from tools.engine.surgery import add_preprocessing, make_shapes_static, plain_ops
from tools.settings import NETWORKS, REPO_ROOT, BuildSettings


def test_the_networks_are_the_settings_choices_with_their_input_conventions():
    assert set(networks.NETWORK_FILES) == set(NETWORKS)
    assert networks.network("mnet025").convention == BGR_MEAN and networks.network("mnv2").convention == RGB


def test_an_unknown_model_fails_make_engine_in_one_line_naming_the_choices(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.engine.build"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "NETWORK": "resnet50", "MODEL_REPOSITORY": str(tmp_path / "repo")})
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 1 and line.startswith("make engine: MODEL='resnet50': use mnet025")
    assert "mnv2" in line and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("text, expected", [
    ("bgr-mean", BGR_MEAN), ("rgb", RGB), ("RGB", RGB),
    ("rgb:mean=123.7,116.3,103.5:std=58.4,57.1,57.4", InputConvention("rgb", (123.7, 116.3, 103.5), (58.4, 57.1, 57.4))),
    ("bgr:mean=104,117,123", BGR_MEAN)])
def test_input_conventions_are_read_from_their_text(text, expected):
    assert parse_convention(text) == expected
    assert parse_convention(str(expected)) == expected


@pytest.mark.parametrize("text", ["yuv", "rgb:mean=1,2", "bgr:std=1,0,1", "rgb:scale=2"])
def test_a_bad_input_convention_says_how_to_write_one(text):
    with pytest.raises(ConventionError, match="bgr-mean .* rgb .* ORDER:mean="):
        parse_convention(text)


def test_a_convention_feeds_the_network_its_channels_mean_and_std():
    images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)  # BGR
    np.testing.assert_array_equal(RGB.apply(images), images.transpose(0, 3, 1, 2)[:, ::-1].astype(np.float32))
    custom = InputConvention("rgb", (1.0, 2.0, 3.0), (2.0, 4.0, 8.0))
    expected = (images[..., ::-1].astype(np.float32) - [1, 2, 3]) / [2, 4, 8]
    np.testing.assert_allclose(custom.apply(images), expected.transpose(0, 3, 1, 2), rtol=1e-6)


def tensorflow_like(width: int, height: int) -> onnx.ModelProto:
    """A small graph with what a TensorFlow export brings: RGB 0-255 input normalised in-graph,
    SAME padding, a bottom-right Pad before a strided depthwise convolution, ReLU6 (Clip) and a
    half-pixel nearest 2x upsampling; outputs as a RetinaFace's would be named."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(8, 3, 3, 3)), "w2": rng.normal(size=(8, 1, 3, 3)), "w3": rng.normal(size=(4, 8, 1, 1))}
    inits = [helper.make_tensor(name, TensorProto.FLOAT, w.shape, w.astype(np.float32).ravel()) for name, w in weights.items()]
    inits += [helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 127.5]), helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
              helper.make_tensor("low", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("high", TensorProto.FLOAT, [], [6.0]),
              helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 0, 0, 0, 0, 1, 1]),
              helper.make_tensor("roi", TensorProto.FLOAT, [0], []),
              helper.make_tensor("up", TensorProto.FLOAT, [4], [1, 1, 2, 2])]
    nodes = [helper.make_node("Mul", ["x", "scale"], ["a"]), helper.make_node("Sub", ["a", "one"], ["b"]),
             helper.make_node("Conv", ["b", "w1"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Clip", ["c", "low", "high"], ["d"]),
             helper.make_node("Pad", ["d", "pads"], ["e"]),
             helper.make_node("Conv", ["e", "w2"], ["f"], group=8, strides=[2, 2]),
             helper.make_node("Clip", ["f", "low", "high"], ["g"]),
             helper.make_node("Resize", ["g", "roi", "up"], ["h"], mode="nearest",
                              coordinate_transformation_mode="tf_half_pixel_for_nn", nearest_mode="floor"),
             helper.make_node("Conv", ["h", "w3"], ["loc"])]
    graph = helper.make_graph(nodes, "tf_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, height, width])],
                              [helper.make_tensor_value_info("loc", TensorProto.FLOAT, ["n", 4, height // 2, width // 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_tensorflow_style_ops_become_plain_ones_with_the_same_outputs():
    width, height = 32, 24
    model = tensorflow_like(width, height)
    images = np.random.default_rng(1).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": RGB.apply(images)})[0]
    graph = make_shapes_static(add_preprocessing(gs.import_onnx(model), width, height, RGB))
    graph, said = plain_ops(graph)
    assert "1 SAME paddings made explicit, 1 Pad ops folded into convolutions, 1 half-pixel nearest resizes" in said
    ops = {node.op for node in graph.nodes}
    assert "Pad" not in ops and "Gather" in ops  # the channels reversed in-graph for an RGB network
    assert all(node.attrs.get("auto_pad", "NOTSET") == "NOTSET" for node in graph.nodes if node.op == "Conv")
    assert all(node.attrs["coordinate_transformation_mode"] == "asymmetric" for node in graph.nodes if node.op == "Resize")
    found = ort.InferenceSession(gs.export_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": images})[0]
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-4)


def test_an_onnx_file_needs_its_input_convention_said_or_recorded(tmp_path):
    path = tmp_path / "export.onnx"
    path.write_bytes(load_source_model().data)
    with pytest.raises(ModelSourceError, match="ONNX_INPUT: bgr-mean .* rgb"):
        load_source_model(path=path)
    assert load_source_model(path=path, stated_input="bgr-mean").convention == BGR_MEAN
    model = onnx.load(str(path))
    helper.set_model_props(model, {networks.INPUT_KEY: "rgb"})
    onnx.save(model, str(path))
    source = load_source_model(path=path)
    assert (source.network, source.convention) == ("onnx", RGB)


def test_a_wheel_without_the_graph_fails_in_one_line_and_leaves_the_repository_as_it_was(tmp_path, monkeypatch, engine):
    monkeypatch.setattr(networks, "CACHE", tmp_path / "models")
    (tmp_path / "models").mkdir()
    with zipfile.ZipFile(tmp_path / "models" / "retinaface-1.1.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("retinaface/__init__.py", "")
    before = {p: p.stat().st_mtime_ns for p in engine.repository.rglob("*") if p.is_file()}
    with pytest.raises(ModelSourceError, match="MODEL=mnv2: retinaface-1.1.1-py3-none-any.whl holds no retinaface/src/frozen_graph.pb") as caught:
        build(BuildSettings(network="mnv2", backend="onnxruntime", repository=engine.repository))
    assert "\n" not in str(caught.value)
    assert {p: p.stat().st_mtime_ns for p in engine.repository.rglob("*") if p.is_file()} == before


def test_the_detector_config_says_which_network_it_serves():
    for backend in ("onnxruntime", "tensorrt", "torch"):
        detector = configs(BuildSettings(network="mnv2"), backend)[repository.DETECTOR]
        assert detector.parameters["network"].string_value == "mnv2"


@pytest.fixture(scope="module")
def mnv2(tmp_path_factory):
    """RetinaFace-MobileNetV2 converted (the converter's environment made with pip where it can be)
    and built for onnxruntime into a scratch repository."""
    try:
        source = load_source_model("mnv2")
    except ModelSourceError as exc:
        pytest.skip(f"the MobileNetV2 conversion cannot run here: {exc}")
    settings = BuildSettings(network="mnv2", backend="onnxruntime",
                             repository=repository.copy_model_code(tmp_path_factory.mktemp("mnv2") / "repo"))
    build(settings)
    return settings, source


def test_mobilenet_v2_is_converted_once_and_recorded(mnv2):
    settings, source = mnv2
    stored = record.read(settings.repository)
    assert (stored["network"], stored["input_convention"], source.network) == ("mnv2", "rgb", "mnv2")
    assert {p.key: p.value for p in onnx.load_from_string(source.data).metadata_props}[networks.INPUT_KEY] == "rgb"
    assert load_source_model("mnv2").sha256 == source.sha256  # the cached conversion, by the wheel's hash


def test_mobilenet_v2_is_served_equal_to_its_own_reference(mnv2, tmp_path):
    from rtface_client import Client

    from tools.evaluation.parity import RewrittenGraph, compare_served, parity_images
    from tools.evaluation.served import engine_info
    from tools.serve import private_server

    settings, source = mnv2
    with private_server(settings.repository, tmp_path / "server.log") as server:
        engine = engine_info(server.grpc_url)
        with Client(server.grpc_url) as client:
            assert client.network == engine.network == "mnv2"
        graph = RewrittenGraph.from_source(source, engine.width, engine.height, engine.topk)
        summary = compare_served(server.grpc_url, engine, graph, parity_images(canvases=2), 0.5, 0.95)
    assert summary["reference_faces"] >= 1 + 2 * 4 and summary["matched_rate"] >= 0.995, summary


def test_the_torch_detectors_program_runs_mobilenet_v2_as_onnxruntime_does(mnv2):
    """The graph program (the torch detector's interpreter of the rewritten graph) on PyTorch's CPU
    build, float32: the same faces as onnxruntime within a hundredth of a pixel."""
    torch = pytest.importorskip("torch", reason="needs PyTorch (its CPU build will do)")
    from rtface_client.letterbox import letterbox

    from tools.engine.backends.pytorch import program_from_onnx, server_module
    from tools.engine.detections import compare_detections
    from tools.sample_images import astronaut, face_canvas

    settings, _ = mnv2
    model = onnx.load(str(settings.repository / repository.DETECTOR / "1" / "model.onnx"))
    frames = np.stack([letterbox(image, 1280, 960)[0] for image in (astronaut(), face_canvas(3, 1600, 1200, 6).image)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": frames})[0]
    program = server_module("graph_program").GraphProgram(program_from_onnx(model, half=False), device="cpu", half=False)
    with torch.inference_mode():
        (found,) = program(torch.from_numpy(frames))
    for e, f in zip(expected, found.numpy()):
        agreement = compare_detections(e, f)
        assert agreement.missing == agreement.extra == 0 and agreement.expected >= 1
        assert agreement.box_px < 0.01 and agreement.landmark_px < 0.01
