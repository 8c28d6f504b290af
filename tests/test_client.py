"""The SDK against a real server: transports, image kinds and sizes, streaming, errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import rtface_client
from rtface_client import (CapReachedWarning, Client, Face, InvalidImageError, RequestRejectedError, RequestTimeoutError,
                           ServerUnavailableError, TransportError, detect)
from rtface_client.letterbox import letterbox
from rtface_client.transport import cuda_unavailable_reason
from tools.serve import free_ports
from tests.test_serving import assert_same_faces
from tools.matching import match_boxes
from tools.engine.reference import Detections, clip_to_image
from tools.sample_images import astronaut, face_canvas, selfie
from tools.settings import REPO_ROOT


def as_detections(faces: list[Face]) -> Detections:
    return Detections(np.array([f.box for f in faces], np.float32).reshape(-1, 4),
                      np.array([f.score for f in faces], np.float32),
                      np.array([f.landmarks for f in faces], np.float32).reshape(-1, 5, 2))


def shm_segments(prefix: str) -> set[str]:
    """Shared-memory segments in /dev/shm whose names start with ``prefix``."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


def registered_regions(url: str) -> list[str]:
    status = grpcclient.InferenceServerClient(url).get_system_shared_memory_status(as_json=True)
    return [name for name in status.get("regions", {}) if name.startswith("rtface-")]


TRANSPORTS = ["grpc", "system_shm",
              pytest.param("cuda_shm", marks=pytest.mark.skipif(cuda_unavailable_reason() is not None,
                                                                reason=f"cuda_shm needs a GPU: {cuda_unavailable_reason()}"))]


def test_public_api_is_exported():
    assert {"detect", "Client", "Face", "RtfaceError"} <= set(rtface_client.__all__)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", ["astronaut", "selfie"])
def test_results_are_identical_over_every_transport(grpc_url, transport, name):
    image = astronaut() if name == "astronaut" else selfie()
    if image is None:
        pytest.skip("../shared/data/selfie/selfie.jpg is not present")
    baseline = detect(image, url=grpc_url, transport="grpc")
    with Client(grpc_url, transport=transport) as client:
        assert client.transport == transport
        faces = client.detect(image)
    assert len(faces) == len(baseline) >= 1
    assert len(faces) == 1 or name == "selfie"
    for face, expected in zip(faces, baseline):
        assert face.box == expected.box and face.score == expected.score
        np.testing.assert_array_equal(face.landmarks, expected.landmarks)


def test_auto_transport_picks_shared_memory_for_a_local_server(grpc_url):
    with Client(grpc_url) as client:
        assert client.transport in ("system_shm", "cuda_shm")


@pytest.mark.parametrize("name", ["selfie", "canvas"])
def test_sdk_results_equal_the_reference_pipeline(grpc_url, reference, name):
    image = selfie() if name == "selfie" else face_canvas(41, 1920, 1080, count=8).image
    if image is None:
        pytest.skip("../shared/data/selfie/selfie.jpg is not present")
    pixels, placement = letterbox(image, reference.width, reference.height)
    (expected,) = reference.detect(pixels[None], [placement.scale])
    with Client(grpc_url, transport="system_shm") as client:
        faces = client.detect(image)
    assert_same_faces(as_detections(faces), clip_to_image(expected, image.shape[1], image.shape[0]))
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def _pasted(width: int, height: int, step: int, gray: bool) -> tuple[np.ndarray, float, int]:
    """The astronaut pasted into a ``width`` x ``height`` canvas so that, once letterboxed, it
    looks exactly like the astronaut letterboxed alone, shifted right by ``step`` strides of 32."""
    base = astronaut()
    scale = min(1280 / width, 960 / height)
    k = (960 / 512) / scale
    x = round(32 * step / scale)
    canvas = np.full((height, width, 3), 127, np.uint8)
    canvas[:round(512 * k), x:x + round(512 * k)] = cv2.resize(base, (round(512 * k), round(512 * k)))
    if gray:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_BGR2GRAY)
    return canvas, k, x


@pytest.mark.parametrize("width, height", [(640, 480), (1280, 960), (2000, 1500), (4000, 3000), (3000, 3000)])
@pytest.mark.parametrize("gray", [False, True], ids=["bgr", "gray"])
def test_a_face_pasted_in_a_canvas_is_found_at_its_place(grpc_url, width, height, gray):
    alone = astronaut() if not gray else cv2.cvtColor(astronaut(), cv2.COLOR_BGR2GRAY)
    canvas, k, x = _pasted(width, height, 3 if width >= 1.3 * height else 0, gray)
    with Client(grpc_url, transport="system_shm") as client:
        (expected,) = client.detect(alone)
        faces = client.detect(canvas)
    assert len(faces) == 1
    want = np.array(expected.box) * k + [x, 0, x, 0]
    np.testing.assert_allclose(faces[0].box, want, atol=2.0)
    np.testing.assert_allclose(faces[0].landmarks, expected.landmarks * k + [x, 0], atol=2.0)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (5, 7, 3), (3000, 4000, 3), (4000, 30, 3)])
def test_any_image_size_is_accepted(grpc_url, shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    faces = detect(image, url=grpc_url)
    assert isinstance(faces, list)
    for face in faces:
        assert 0 <= face.box[0] <= face.box[2] <= shape[1] and 0 <= face.box[1] <= face.box[3] <= shape[0]


def test_paths_png_and_jpeg_bytes_give_the_array_result(grpc_url, tmp_path):
    image = face_canvas(51, 1000, 800, count=3).image
    png = cv2.imencode(".png", image)[1].tobytes()
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    (tmp_path / "canvas.png").write_bytes(png)
    with Client(grpc_url) as client:
        from_array = as_detections(client.detect(image))
        for source, tolerance in ((str(tmp_path / "canvas.png"), 0.95), (tmp_path / "canvas.png", 0.95),
                                  (png, 0.95), (jpeg, 0.85)):
            got = as_detections(client.detect(source))
            assert len(got.boxes) == len(from_array.boxes) == 3
            assert (match_boxes(from_array.boxes, got.boxes, tolerance) >= 0).all()


def test_a_list_of_images_gives_a_list_of_results_in_order(grpc_url):
    canvases = [face_canvas(60 + i, count=1 + i % 3) for i in range(20)]
    results = detect([c.image for c in canvases], url=grpc_url)
    assert [len(r) for r in results] == [len(c.faces) for c in canvases]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((10, 10, 3), np.float32), "dtype"), (np.zeros((10, 10, 4), np.uint8), "shape"),
    (np.zeros((0, 10, 3), np.uint8), "no pixels"), (b"", "empty"), (b"\x89PNG\r\n\x1a\n trunc", "not a readable"),
    ("/no/such/file.jpg", "cannot read"), (12345, "cannot read an image from int"),
    (np.zeros((1, 11_000, 6_000), np.uint8)[0], "MP limit")])
def test_bad_images_raise_invalid_image_error(grpc_url, bad, message):
    with pytest.raises(InvalidImageError, match=message):
        detect(bad, url=grpc_url)


def test_truncated_jpeg_is_rejected_clearly(grpc_url):
    jpeg = cv2.imencode(".jpg", astronaut())[1].tobytes()
    with pytest.raises(InvalidImageError):
        detect(jpeg[:200], url=grpc_url)


def test_server_errors_map_to_sdk_errors(grpc_url):
    (port,) = free_ports(1)
    with pytest.raises(ServerUnavailableError, match="make serve"):
        Client(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(RequestRejectedError, match="score_threshold"):
        detect(astronaut(), url=grpc_url, score_threshold=5)
    with pytest.raises(RequestTimeoutError):  # in the set-up calls or in the request itself
        with Client(grpc_url, timeout=0.001) as client:
            client.detect(face_canvas(1).image)
    with pytest.raises(ValueError, match="transport"):
        Client(grpc_url, transport="carrier-pigeon")


def test_per_request_options_override_client_defaults(grpc_url):
    image = face_canvas(31, count=6).image
    with Client(grpc_url, max_detections=2) as client:
        with pytest.warns(CapReachedWarning, match="max_detections=2"):
            assert len(client.detect(image)) == 2
        with pytest.warns(CapReachedWarning, match="max_detections=5"):
            assert len(client.detect(image, max_detections=5)) == 5
        assert len(client.detect(image, score_threshold=0.9999999)) == 0


def test_a_cap_that_binds_is_reported_and_ordinary_images_are_not(grpc_url):
    """Score threshold 0 lets every candidate through, so every top-K chunk is full: the
    response says so and the SDK warns, naming TOPK; the same image at the default threshold,
    or the whole selfie at 0.02, reaches no cap."""
    import warnings

    image = face_canvas(32, count=3).image
    with Client(grpc_url) as client:
        with pytest.warns(CapReachedWarning, match="TOPK"):
            client.detect(image, score_threshold=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CapReachedWarning)
            assert len(client.detect(image)) == 3
            crowd = selfie()
            if crowd is not None:
                assert len(client.detect(crowd, score_threshold=0.02)) > 2000


def test_detect_stream_of_1000_images_keeps_order_and_leaves_no_regions(grpc_url):
    canvases = (face_canvas(1000 + i, 480, 360, count=1 + i % 3) for i in range(1000))
    expected = (face_canvas(1000 + i, 480, 360, count=1 + i % 3).faces for i in range(1000))
    with Client(grpc_url, transport="system_shm") as client:
        for faces, truth in zip(client.detect_stream((c.image for c in canvases), concurrency=8,
                                                                  score_threshold=0.9), expected):
            boxes = as_detections(faces).boxes
            assert len(boxes) == len(truth) and (match_boxes(truth, boxes, 0.5) >= 0).all()
        prefix = client._pool._prefix
        assert registered_regions(grpc_url) and shm_segments(prefix)
    assert registered_regions(grpc_url) == []
    # this client's segments only: another process on the host (a second test run) may have its own
    assert shm_segments(prefix) == set()


KILLED_CLIENT = textwrap.dedent("""
    import os, signal, sys
    from rtface_client import Client
    from tools.sample_images import face_canvas
    client = Client(sys.argv[1], transport="system_shm")
    for n, _ in enumerate(client.detect_stream((face_canvas(i).image for i in range(10_000)), concurrency=4)):
        if n == 5:
            print("streaming", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_client_killed_mid_stream_leaves_nothing_a_new_client_cannot_reclaim(grpc_url):
    result = subprocess.run([sys.executable, "-c", KILLED_CLIENT, grpc_url], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -9 and "streaming" in result.stdout
    assert registered_regions(grpc_url), "the killed client's regions should still be registered"
    with Client(grpc_url, transport="system_shm") as client:
        assert len(client.detect(astronaut())) == 1
        assert all(name.startswith(client._pool._prefix) for name in registered_regions(grpc_url))
    assert registered_regions(grpc_url) == []
    assert not any(name.startswith(f"rtface-") and not Path("/dev/shm", name).exists()
                   for name in registered_regions(grpc_url))


def test_cli_prints_json_and_draws_faces(grpc_url, tmp_path):
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), astronaut())
    result = subprocess.run([sys.executable, "-m", "rtface_client.cli", "detect", str(path), "--url", grpc_url,
                             "--json", "--draw", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["image"] == str(path) and len(record["faces"]) == 1
    assert len(record["faces"][0]["landmarks"]) == 5
    drawn = cv2.imread(str(tmp_path / "out" / "astronaut.jpg"))
    assert drawn.shape == (512, 512, 3) and not np.array_equal(drawn, astronaut())


def test_cli_fails_with_one_line_error(grpc_url, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    result = subprocess.run([sys.executable, "-m", "rtface_client.cli", "detect", str(tmp_path / "junk.jpg"),
                             "--url", grpc_url], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "not a readable image" in result.stderr


def test_transport_that_cannot_register_raises_transport_error(grpc_url):
    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is present: cuda_shm registers")
    with pytest.raises(TransportError, match="cuda_shm"):
        Client(grpc_url, transport="cuda_shm")
