"""The encoded ensemble of the GPU build: JPEGs decoded by nvJPEG and letterboxed on the GPU give
the faces the pixel ensemble gives on the same images decoded by OpenCV; other formats go through
OpenCV; bad bytes get INVALID_ARGUMENT; many requests in flight stay right. Each test runs on both
layouts: the default, where the torch detector decodes in its own process (``torch_url``), and
``PREPROCESS=torch``, a GPU preprocess step of its own (``torch_step_url``: the same build, its
configs rewritten), whose frames can be read alone.

Marked ``gpu``: these run where PyTorch sees a CUDA GPU and skip elsewhere with the reason.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from rtface_client import Client
from rtface_client.letterbox import letterbox
from tritonclient.utils import InferenceServerException

from tests.conftest import config_variant, serve_build
from tests.test_encoded import BAD, VARIANTS, encoded, infer_encoded, mixed_plan, preprocessed
from tools.engine import repository
from tools.engine.backends import pytorch
from tools.matching import match_boxes
from tools.sample_images import astronaut, face_canvas, selfie

AVAILABLE, WHY = pytorch.status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=f"needs PyTorch on a CUDA GPU: {WHY}")]
MATCH_IOU, MATCH_RATE = 0.95, 0.995  # the goal: the raw path's faces, found again at IoU >= 0.95


@pytest.fixture(scope="session")
def torch_step_engine(torch_engine, tmp_path_factory):
    """:func:`torch_engine` with ``PREPROCESS=torch``: nvJPEG in a GPU step of its own."""
    return config_variant(torch_engine, tmp_path_factory, "torch-step", preprocess="torch")


@pytest.fixture(scope="session")
def torch_step_url(torch_step_engine, tmp_path_factory):
    yield from serve_build(torch_step_engine, tmp_path_factory, "triton-torch-step")


@pytest.fixture(params=["detector", "step"])
def gpu_url(request):
    """Each GPU layout of encoded images in turn: decoded in the detector, or in a step of its own."""
    return request.getfixturevalue("torch_url" if request.param == "detector" else "torch_step_url")


def pixel_faces(client: Client, data: bytes):
    """The faces of ``data`` decoded by OpenCV on this host and sent as pixels."""
    return client.detect(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


def matched(reference, found) -> tuple[int, int]:
    """(reference faces found again at IoU >= MATCH_IOU, reference faces)."""
    pairs = match_boxes(np.array([f.box for f in reference]).reshape(-1, 4),
                        np.array([f.box for f in found]).reshape(-1, 4), MATCH_IOU)
    return int((pairs >= 0).sum()), len(reference)


def jpeg_frames() -> dict[str, bytes]:
    """JPEG files of real faces as the SDK would send them: 1280x960 frames, and other sizes the
    GPU resizes."""
    frames = {f"canvas-{seed}": encoded(face_canvas(seed).image) for seed in range(80, 86)}
    frames["astronaut-512"] = encoded(astronaut())
    frames["canvas-1920x1080"] = encoded(face_canvas(86, 1920, 1080, count=8).image)
    frames["canvas-640x480-progressive"] = encoded(face_canvas(87, 640, 480).image, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    if selfie() is not None:
        frames["selfie-2048x1150"] = encoded(selfie())
        frames["selfie-1280x960"] = encoded(letterbox(selfie(), 1280, 960)[0])
    return frames


def test_jpegs_decoded_on_the_gpu_give_the_pixel_paths_faces(gpu_url):
    found = total = 0
    with Client(gpu_url, transport="encoded") as gpu, Client(gpu_url, transport="cuda_shm") as pixels:
        for name, data in jpeg_frames().items():
            hit, count = matched(pixel_faces(pixels, data), gpu.detect(data))
            print(f"{name}: {hit} of {count} faces matched at IoU >= {MATCH_IOU}")
            found, total = found + hit, total + count
    print(f"all: {found} of {total} ({found / total:.2%})")
    assert total >= 60 and found / total >= MATCH_RATE


def test_gpu_frames_are_the_sdk_letterbox_of_the_decoded_image_within_rounding(torch_step_url):
    """The GPU preprocess step alone (the detector runs the same decoder): PNG (the same OpenCV
    decoding on both sides) resized on the GPU is the SDK's OpenCV letterbox within one level of
    rounding; an image of the engine's size is copied exactly; JPEG adds nvJPEG's own IDCT and
    chroma upsampling (printed)."""
    canvas = face_canvas(90, 1600, 1200).image
    for data, tolerance in ((encoded(canvas, ".png"), 1), (encoded(canvas[:960, :1280], ".png"), 0),
                            (encoded(canvas), None)):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        expected, placement = letterbox(decoded, 1280, 960)
        out = preprocessed(torch_step_url, data)
        difference = np.abs(out["images"][0].astype(np.int16) - expected)
        print(f"{len(data)} bytes: max {difference.max()}, mean {difference.mean():.3f} levels")
        assert np.isclose(out["letterbox"][0, 0], placement.scale)
        assert tuple(out["image_size"][0]) == (decoded.shape[1], decoded.shape[0])
        if tolerance is not None:
            assert difference.max() <= tolerance
        else:
            assert difference.mean() < 2.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_formats_nvjpeg_does_not_take_are_decoded_by_opencv_in_the_gpu_build(gpu_url, variant):
    data = VARIANTS[variant](astronaut())
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    got = infer_encoded(gpu_url, [data])
    assert tuple(got["image_size"][0]) == (decoded.shape[1], decoded.shape[0])
    with Client(gpu_url, transport="encoded") as gpu, Client(gpu_url, transport="cuda_shm") as pixels:
        hit, count = matched(pixel_faces(pixels, data), gpu.detect(data))
    assert hit == count >= 1


@pytest.mark.parametrize("name", list(BAD))
def test_bad_bytes_get_invalid_argument_from_the_gpu_decoder(gpu_url, name):
    data, words = BAD[name]
    good = encoded(astronaut())
    with pytest.raises(InferenceServerException) as caught:
        infer_encoded(gpu_url, [good, data])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "image row 1 of 2" in caught.value.message() and words in caught.value.message()
    assert infer_encoded(gpu_url, [good])["num_detections"][0, 0] == 1


def test_a_jpeg_nvjpeg_cannot_decode_falls_back_to_opencv_or_fails_alone(gpu_url):
    good = encoded(face_canvas(91, 800, 600, count=3).image)
    corrupt = bytearray(good)
    scan = corrupt.index(b"\xff\xda")
    corrupt[scan + 40:scan + 4000] = bytes(range(256)) * 15 + bytes(100)  # entropy-coded data scrambled
    answers = [infer_encoded(gpu_url, [good, bytes(corrupt), good])]
    with ThreadPoolExecutor(4) as pool:
        answers += list(pool.map(lambda _: infer_encoded(gpu_url, [good]), range(8)))
    for answer in answers:
        assert answer["num_detections"][0, 0] == answers[0]["num_detections"][0, 0] >= 3


def test_bad_requests_batched_with_good_ones_on_the_gpu_fail_alone(torch_step_url):
    """The GPU preprocess step: each good request's frames, batched with bad ones, are the frames
    it gets alone, bit for bit."""
    good = [encoded(face_canvas(92 + i).image) for i in range(4)]
    expected = {data: preprocessed(torch_step_url, data) for data in good}
    plan = mixed_plan(good, 96)
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda item: preprocessed(torch_step_url, item[1]), plan))
    for (ok, data), answer in zip(plan, answers):
        if ok:
            np.testing.assert_array_equal(answer["images"], expected[data]["images"])
        else:
            assert answer.status() == "StatusCode.INVALID_ARGUMENT"


def answered(url: str, data: bytes) -> dict[str, np.ndarray] | InferenceServerException:
    """The encoded ensemble's outputs for one image, or the error it answered."""
    try:
        return infer_encoded(url, [data])
    except InferenceServerException as exc:
        return exc


def test_bad_requests_batched_with_good_ones_fail_alone_where_the_detector_decodes(torch_url):
    """The detector's frames are not visible outside it, so each good request's faces are compared
    with its faces alone: the same count and decoded size; boxes within 0.05 px, since a batch of
    another size replays another bucket's graph, whose float rounding differs (0.003 px seen)."""
    good = [encoded(face_canvas(92 + i).image) for i in range(4)]
    expected = {data: infer_encoded(torch_url, [data]) for data in good}
    plan = mixed_plan(good, 96)
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda item: answered(torch_url, item[1]), plan))
    for (ok, data), answer in zip(plan, answers):
        if ok:
            for name in ("num_detections", "image_size"):
                np.testing.assert_array_equal(answer[name], expected[data][name], err_msg=name)
            np.testing.assert_allclose(answer["boxes"], expected[data]["boxes"], atol=0.05, err_msg="boxes")
        else:
            assert answer.status() == "StatusCode.INVALID_ARGUMENT"


def test_results_stay_right_with_many_encoded_requests_in_flight(gpu_url):
    """1,000 JPEG frames at concurrency 48, each against the same frame sent alone: a frame
    overwritten before the detector read it (a GPU buffer reused by the next batch) would show as
    other faces."""
    frames = [encoded(face_canvas(seed).image) for seed in range(100, 108)] + [encoded(astronaut())]
    with Client(gpu_url, transport="encoded") as client:
        expected = [client.detect(data) for data in frames]
        stream = client.detect_stream((frames[i % len(frames)] for i in range(1000)), concurrency=48)
        for index, faces in enumerate(stream):
            alone = expected[index % len(frames)]
            hit, count = matched(alone, faces)
            assert hit == count == len(faces), index


def test_the_gpu_build_decodes_on_the_gpu(torch_engine, torch_step_engine):
    detector = (torch_engine.repository / repository.DETECTOR / "config.pbtxt").read_text()
    ensemble = (torch_engine.repository / repository.ENCODED / "config.pbtxt").read_text()
    assert 'name: "image"' in detector and repository.PREPROCESS not in ensemble
    step = (torch_step_engine.repository / repository.PREPROCESS / "config.pbtxt").read_text()
    assert "model_torch.py" in step and "KIND_GPU" in step
