"""The torch detector (BACKEND=torch) on a GPU: its build-time validation, and the served
ensemble over every transport against the onnxruntime detector on the same images.

Marked ``gpu``: these run where PyTorch sees a CUDA GPU and skip elsewhere with the reason. The
CPU-only checks of the torch path (its configuration, its one-line refusal without a GPU) run
everywhere, in ``test_engine_pipeline.py``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from rtface_client import Client, detect
from rtface_client.letterbox import letterbox

from tools.engine import record, repository
from tools.engine.backends import pytorch
from tools.engine.backends.pytorch import program_from_onnx, program_module, servable_build, server_module
from tools.engine.detections import compare_detections
from tools.engine.plan import Plan
from tools.engine.source import load_source_model
from tools.engine.surgery import rewrite
from tools.evaluation.cli import GPU_PARITY
from tools.evaluation.parity import RewrittenGraph, compare_served, parity_images
from tools.evaluation.served import engine_info
from tools.matching import match_boxes
from tools.sample_images import astronaut, face_canvas, selfie

from tests.conftest import SERVER_LOGS

AVAILABLE, WHY = pytorch.status()
# The same image through different batch buckets or detector instances: float16 kernels differ per
# bucket and per instance (cuDNN autotuning; docs/accuracy.md, "Backend parity"); a candidate
# overwritten in flight would move a face by far more, or drop, add or cap one. Half the build's
# torch-vs-onnxruntime tolerance (0.5 px).
BUCKET_PX = 0.25
INSTANCE_SCORE = 1e-3  # the same, for scores: a tenth of the parity goal's |score difference| (0.01)
PARITY_FACES = 200  # faces the parity rate is taken over: one disagreement is 0.5 % of them
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=f"needs PyTorch on a CUDA GPU: {WHY}")]


def test_graph_program_in_float32_matches_onnxruntime_to_a_hundredth_of_a_pixel():
    import torch

    model, _ = rewrite(load_source_model().load(), 1280, 960, 1000)
    program = program_from_onnx(model, half=False)
    frames = np.stack([letterbox(image, 1280, 960)[0] for image in (astronaut(), face_canvas(3, 1600, 1200, 6).image)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": frames})[0]
    GraphProgram = server_module("graph_program").GraphProgram
    with torch.inference_mode():
        (found,) = GraphProgram(program, device="cuda", half=False)(torch.from_numpy(frames).cuda())
    for e, f in zip(expected, found.cpu().numpy()):
        agreement = compare_detections(e, f)
        assert agreement.missing == agreement.extra == 0 and agreement.expected >= 1
        assert agreement.box_px < 0.05 and agreement.landmark_px < 0.05 and agreement.score < 1e-4


def test_torch_build_writes_a_validated_float16_program(torch_engine):
    metadata = record.read(torch_engine.repository)
    artifact = torch_engine.repository / repository.DETECTOR / "1" / "model.pt"
    assert metadata["backend"] == "torch" and metadata["precision"] == torch_engine.precision
    assert metadata["artifact_sha256"] == record.file_sha256(artifact)
    module = program_module(artifact)
    assert any(half for *_, half in module._steps) and not all(half for *_, half in module._steps)
    config = (torch_engine.repository / repository.DETECTOR / "config.pbtxt").read_text()
    assert "KIND_GPU" in config and 'FORCE_CPU_ONLY_INPUT_TENSORS' in config and "model_torch.py" in config


def test_torch_build_compiles_one_package_per_bucket_for_this_gpu(torch_engine):
    """TORCH_COMPILE=engine (the default): build.json records packages the server's own check
    accepts on this machine."""
    if torch_engine.torch_compile != "engine":
        pytest.skip(f"TORCH_COMPILE={torch_engine.torch_compile}: nothing compiled at make engine")
    buckets = list(Plan.resolve(torch_engine, "torch").buckets)
    stored, _ = servable_build(torch_engine.repository, buckets)  # LookupError saying why, where they would not serve
    assert sorted(int(b) for b in stored[record.COMPILED]["files"]) == buckets


def test_the_torch_server_loads_the_packages_and_logs_each_loading_step(torch_engine, torch_url):
    log = SERVER_LOGS[torch_url].read_text()
    loaded = [line for line in log.splitlines() if "retinaface_detector" in line and ": loaded in " in line]
    assert len(loaded) == Plan.resolve(torch_engine, "torch").detector_instances, log[-3000:]
    for line in loaded:
        assert "torch imported" in line and "CUDA graphs captured" in line
        assert f"(cuDNN {torch_engine.cudnn_algorithms}; batch 1 " in line
        if torch_engine.torch_compile == "engine":
            assert "AOTInductor packages loaded" in line and "torch.compile ran here" not in line
    assert "compiling at load" not in log


def test_served_torch_detector_matches_onnxruntime_face_by_face(torch_url):
    """The agreeing rate over at least PARITY_FACES faces: with fewer, one face that a float16
    network places differently from the float32 reference would fail a rate of 99.5 % alone.
    Without the crowd photo (about 340 faces at 0.5), canvases of six faces make up the count."""
    engine = engine_info(torch_url)
    assert engine.backend == "torch"
    graph = RewrittenGraph.from_source(load_source_model(), engine.width, engine.height, engine.topk)
    images = parity_images(canvases=6 if selfie() is not None else 40)  # 40 x 6 faces, and the astronaut
    for threshold in (0.5, 0.02):
        s = compare_served(torch_url, engine, graph, images, threshold, GPU_PARITY["iou"])
        assert s["reference_faces"] >= PARITY_FACES, s
        assert s["agreeing_rate"] >= GPU_PARITY["agreeing_rate"], s


@pytest.mark.parametrize("transport", ["grpc", "system_shm", "cuda_shm"])
def test_every_transport_gives_the_same_faces_from_the_gpu_detector(torch_url, transport):
    """The same faces over every transport. Requests land on either detector instance, and each
    instance's cuDNN autotuning picks its own float16 kernels (a few thousandths of a pixel apart):
    boxes agree within ``BUCKET_PX``, scores within ``INSTANCE_SCORE``, and two of the selfie's
    faces whose scores differ by less than that may trade places in the score order, so faces are
    paired by box, one to one."""
    image = selfie() if selfie() is not None else face_canvas(5, 1920, 1080, 8).image
    baseline = detect(image, url=torch_url, transport="grpc")
    with Client(torch_url, transport=transport) as client:
        assert client.transport == transport
        faces = client.detect(image)
    assert len(faces) == len(baseline) >= 6
    pairs = match_boxes(np.array([f.box for f in baseline]), np.array([f.box for f in faces]), 0.95)
    assert sorted(pairs) == list(range(len(faces)))
    for expected, index in zip(baseline, pairs):
        np.testing.assert_allclose(faces[index].box, expected.box, atol=BUCKET_PX)
        assert abs(faces[index].score - expected.score) < INSTANCE_SCORE


def test_auto_transport_picks_cuda_shared_memory_for_the_gpu_detector(torch_url):
    with Client(torch_url) as client:
        assert client.transport == "cuda_shm"
        assert len(client.detect(astronaut())) == 1


def test_mixed_batches_on_the_gpu_equal_single_requests(torch_url):
    images = [face_canvas(seed, 1280, 960, 4).image for seed in range(5)] + [astronaut()]
    with Client(torch_url, transport="cuda_shm") as client:
        singles = [client.detect(image) for image in images]
        batched = client.detect_batch(images)
        streamed = list(client.detect_stream(images * 4, concurrency=8))
    for one, many in zip(singles * 5, batched + streamed):
        assert len(one) == len(many)
        for a, b in zip(one, many):
            np.testing.assert_allclose(a.box, b.box, atol=BUCKET_PX)
    assert sum(len(faces) for faces in singles) == 5 * 4 + 1


def test_bad_requests_to_the_gpu_detector_get_an_error_and_it_keeps_serving(torch_url):
    client = grpcclient.InferenceServerClient(torch_url)
    wrong = grpcclient.InferInput("images", [1, 960, 1280, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 960, 1280, 3), np.float32))
    with pytest.raises(Exception, match="(?i)data type|datatype|FP32"):
        client.infer(repository.DETECTOR, [wrong])
    assert len(detect(astronaut(), url=torch_url)) == 1


def test_crowds_served_by_the_gpu_detector_equal_the_cpu_build_face_by_face(torch_url, grpc_url):
    """The selfie (or a canvas of 40 faces), more than 512 candidates above 0.5 and 0.02, which the
    detector gives the numpy postprocess, against the onnxruntime build: the same faces within the
    float16 network's tolerance."""
    crowd = selfie() if selfie() is not None else face_canvas(6, 1920, 1080, 40).image
    for threshold in (0.5, 0.02):
        gpu_faces = detect(crowd, url=torch_url, transport="grpc", score_threshold=threshold)
        cpu_faces = detect(crowd, url=grpc_url, transport="grpc", score_threshold=threshold)
        pairs = match_boxes(np.array([f.box for f in cpu_faces]), np.array([f.box for f in gpu_faces]), 0.9)
        assert (pairs >= 0).mean() >= 0.99 and abs(len(gpu_faces) - len(cpu_faces)) <= 0.01 * len(cpu_faces) + 1


def test_a_bad_request_among_many_to_the_gpu_detector_gets_its_error_and_the_rest_are_served(torch_url):
    from concurrent.futures import ThreadPoolExecutor

    boxed, placement = letterbox(astronaut(), 1280, 960)
    rows = placement.as_row()[None].astype(np.float32)

    def send(index):
        client = grpcclient.InferenceServerClient(torch_url)
        inputs = [grpcclient.InferInput("images", [1, *boxed.shape], "UINT8"),
                  grpcclient.InferInput("letterbox", [1, 3], "FP32")]
        inputs[0].set_data_from_numpy(boxed[None])
        inputs[1].set_data_from_numpy(rows if index % 8 != 5 else np.full((1, 3), np.nan, np.float32))
        options = {"score_threshold": 2.0} if index % 8 == 3 else {}
        try:
            return client.infer(repository.ENSEMBLE, inputs, parameters=options).as_numpy("num_detections").item()
        except Exception as exc:  # noqa: BLE001 - the error text is what is checked
            return str(exc)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(64)))
    for index, answer in enumerate(answers):
        if index % 8 == 3:
            assert "score_threshold=2.0 is out of range" in answer
        elif index % 8 == 5:
            assert "letterbox rows must be" in answer
        else:
            assert answer == 1


def test_the_gpu_detector_alone_answers_in_network_pixels_without_letterbox_rows(torch_url):
    boxed, placement = letterbox(astronaut(), 1280, 960)
    client = grpcclient.InferenceServerClient(torch_url)
    tensor = grpcclient.InferInput("images", [1, *boxed.shape], "UINT8")
    tensor.set_data_from_numpy(boxed[None])
    result = client.infer(repository.DETECTOR, [tensor])
    (face,) = detect(astronaut(), url=torch_url)
    assert result.as_numpy("num_detections").item() == 1
    np.testing.assert_allclose(result.as_numpy("boxes")[0, 0] / placement.scale, face.box, atol=BUCKET_PX)


def test_results_stay_right_with_many_requests_in_flight(torch_url):
    """1,500 frames at concurrency 48 over CUDA shm, each checked against the same frame sent
    alone: a candidate overwritten between the detector and the postprocess (the graph's buffer,
    or the detector's pinned host buffer, reused by the next batch) would show as a wrong face or
    a reached cap (CapReachedWarning is an error here)."""
    import warnings

    from rtface_client import CapReachedWarning

    images = [face_canvas(seed, 1280, 960, 4).image for seed in range(8)] + [astronaut()]
    with Client(torch_url, transport="cuda_shm") as client, warnings.catch_warnings():
        warnings.simplefilter("error", CapReachedWarning)
        expected = [client.detect(image) for image in images]
        stream = client.detect_stream((images[i % len(images)] for i in range(1500)), concurrency=48)
        for index, faces in enumerate(stream):
            alone = expected[index % len(images)]
            assert len(faces) == len(alone), index
            for a, b in zip(faces, alone):
                np.testing.assert_allclose(a.box, b.box, atol=BUCKET_PX)
