"""The encoded ensemble (``retinaface_encoded``) against a real tritonserver: JPEG and PNG bytes,
decoded and letterboxed by the server, give exactly the faces the pixel ensemble gives on the
same decoded pixels; bad bytes get INVALID_ARGUMENT naming the row while the rest is served; and
the SDK's ``encoded`` transport on top of it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rtface_client import Client, InvalidImageError, ModelNotReadyError, detect
from rtface_client.images import JPEG_QUALITY, encode_image
from rtface_client.letterbox import letterbox
from tritonclient.utils import InferenceServerException

from tests.conftest import infer_raw
from tools.engine import repository
from tools.sample_images import astronaut, face_canvas, selfie
from tools.serve import private_server

W, H = 1280, 960
OUTPUTS = ("num_detections", "boxes", "scores", "landmarks", "capped")


def encoded(image: np.ndarray, ext: str = ".jpg", *params: int) -> bytes:
    return cv2.imencode(ext, image, list(params))[1].tobytes()


def pil_encoded(image: np.ndarray, form: str, **options) -> bytes:
    """``image`` (BGR) written by Pillow: CMYK JPEGs and EXIF tags, which OpenCV does not write."""
    pil = Image.fromarray(np.ascontiguousarray(image[..., ::-1]))
    buffer = io.BytesIO()
    (pil.convert("CMYK") if options.pop("cmyk", False) else pil).save(buffer, form, **options)
    return buffer.getvalue()


def exif_rotated(image: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_encoded(image, "JPEG", quality=95, exif=exif)


def infer_encoded(url: str, rows: list[bytes], parameters: dict | None = None) -> dict[str, np.ndarray]:
    """One raw tritonclient request of encoded images to the encoded ensemble; outputs by name."""
    tensor = grpcclient.InferInput("image", [len(rows), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(rows, dtype=np.object_).reshape(-1, 1))
    result = grpcclient.InferenceServerClient(url).infer(repository.ENCODED, [tensor], parameters=parameters)
    return {name: result.as_numpy(name) for name in (*OUTPUTS, "image_size")}


def pixel_path(url: str, data: bytes) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """``data`` decoded as the SDK decodes it (OpenCV), letterboxed by the SDK, through the pixel
    ensemble: the outputs and the decoded (width, height)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    pixels, placement = letterbox(image, W, H)
    return infer_raw(url, pixels[None], placement.as_row()[None]), (image.shape[1], image.shape[0])


def assert_same_outputs(got: dict, expected: dict, index: int = 0) -> None:
    for name in ("num_detections", "boxes", "scores", "landmarks"):
        count = int(expected["num_detections"][0, 0])
        np.testing.assert_array_equal(got[name][index][:count], expected[name][0][:count], err_msg=name)
    assert got["num_detections"][index, 0] == expected["num_detections"][0, 0]


def real_images() -> dict[str, np.ndarray]:
    images = {"astronaut": astronaut(), "canvas": face_canvas(31).image,
              "canvas-wide": face_canvas(32, 1920, 1080, count=6).image, "canvas-small": face_canvas(33, 400, 300).image}
    if selfie() is not None:
        images["selfie"] = selfie()
    return images


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("name", list(real_images()))
def test_jpeg_and_png_give_the_faces_of_the_pixel_ensemble_on_the_same_decoded_pixels(grpc_url, name, ext):
    image = real_images()[name]
    data = encoded(image, ext)
    expected, size = pixel_path(grpc_url, data)
    got = infer_encoded(grpc_url, [data])
    assert_same_outputs(got, expected)
    assert tuple(got["image_size"][0]) == size == (image.shape[1], image.shape[0])
    assert got["num_detections"][0, 0] >= 1


VARIANTS = {
    "gray JPEG": lambda image: encoded(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)),
    "CMYK JPEG": lambda image: pil_encoded(image, "JPEG", quality=95, cmyk=True),
    "progressive JPEG": lambda image: encoded(image, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
    "4:4:4 JPEG": lambda image: pil_encoded(image, "JPEG", quality=90, subsampling=0),
    "EXIF-rotated JPEG": lambda image: exif_rotated(image[:, :400], 6),
    "EXIF-mirrored JPEG": lambda image: exif_rotated(image[:, :400], 2),
    "gray PNG": lambda image: encoded(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), ".png"),
    "16-bit PNG": lambda image: encoded(image.astype(np.uint16) * 257, ".png"),
    "PNG with alpha": lambda image: encoded(cv2.cvtColor(image, cv2.COLOR_BGR2BGRA), ".png"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gray_cmyk_progressive_16_bit_and_exif_rotated_images_decode_as_opencv_reads_them(grpc_url, variant):
    data = VARIANTS[variant](astronaut())
    expected, size = pixel_path(grpc_url, data)
    got = infer_encoded(grpc_url, [data])
    assert_same_outputs(got, expected)
    assert tuple(got["image_size"][0]) == size
    if "rotated" in variant:
        assert size == (512, 400)  # stored 400 wide, 512 high, shown turned a quarter
    assert got["num_detections"][0, 0] >= 1


def test_a_request_of_mixed_formats_and_sizes_gives_each_image_its_own_faces(grpc_url):
    rows = [encoded(astronaut()), encoded(face_canvas(34, 1600, 1200).image, ".png"),
            encoded(face_canvas(35, 640, 480, count=2).image), encoded(astronaut()[:, ::-1].copy(), ".png")]
    got = infer_encoded(grpc_url, rows)
    for index, data in enumerate(rows):
        expected, size = pixel_path(grpc_url, data)
        assert_same_outputs(got, expected, index)
        assert tuple(got["image_size"][index]) == size


def forged_jpeg(width: int, height: int) -> bytes:
    """A real JPEG whose frame header declares ``width`` x ``height``."""
    data = bytearray(encoded(astronaut()))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def forged_png(width: int, height: int) -> bytes:
    data = bytearray(encoded(astronaut()[:64, :64], ".png"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


JPEG = encoded(astronaut())
BAD = {  # what is sent -> words the error must contain
    "truncated JPEG": (JPEG[:len(JPEG) // 2], "truncated JPEG"),
    "JPEG cut inside its header": (JPEG[:200], "truncated JPEG"),
    "truncated PNG": (encoded(astronaut(), ".png")[:5000], "truncated PNG"),
    "not an image": (b"GIF89a" + bytes(200), "not a JPEG or PNG"),
    "text": (b"hello, world", "not a JPEG or PNG"),
    "0 bytes": (b"", "0 bytes"),
    "decompression bomb (PNG, 400 MP)": (forged_png(20_000, 20_000), "over the server's limit of 50 MP"),
    "decompression bomb (JPEG, 60 MP)": (forged_jpeg(10_000, 6_000), "over the server's limit of 50 MP"),
    "JPEG declaring no pixels": (forged_jpeg(0, 512), "no pixels"),
    "JPEG with no frame header": (JPEG[:2] + JPEG[JPEG.index(b"\xff\xda"):], "no frame header"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_bytes_get_invalid_argument_naming_the_row_and_the_server_keeps_serving(grpc_url, name):
    data, words = BAD[name]
    with pytest.raises(InferenceServerException) as caught:
        infer_encoded(grpc_url, [JPEG, data, JPEG])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "image row 1 of 3" in caught.value.message() and words in caught.value.message()
    assert infer_encoded(grpc_url, [JPEG])["num_detections"][0, 0] == 1


def preprocess_counts(url: str) -> tuple[int, int]:
    """The preprocess's (requests, executions) so far: fewer executions than requests means
    Triton's dynamic batcher handed it several requests at once."""
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(repository.PREPROCESS, as_json=True)
    model = stats["model_stats"][0]
    return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))


def preprocessed(url: str, data: bytes) -> dict[str, np.ndarray] | InferenceServerException:
    """The preprocess model alone on one encoded image: its outputs, or the error it answered."""
    tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_).reshape(1, 1))
    try:
        result = grpcclient.InferenceServerClient(url).infer(repository.PREPROCESS, [tensor])
    except InferenceServerException as exc:
        return exc
    return {name: result.as_numpy(name) for name in ("images", "letterbox", "image_size")}


def mixed_plan(good: list[bytes], count: int = 48) -> list[tuple[bool, bytes]]:
    """``count`` one-image requests, every third one bad."""
    bad = [data for data, _ in BAD.values()]
    return [(True, good[i % len(good)]) if i % 3 else (False, bad[i % len(bad)]) for i in range(count)]


def test_bad_requests_batched_with_good_ones_fail_alone_and_the_good_ones_are_served(grpc_url):
    good = [encoded(face_canvas(40 + i, 800, 600, count=2).image) for i in range(4)]
    expected = {data: preprocessed(grpc_url, data) for data in good}
    plan = mixed_plan(good)
    requests0, executions0 = preprocess_counts(grpc_url)
    with ThreadPoolExecutor(16) as pool:  # all in flight at once: the batcher groups them
        answers = list(pool.map(lambda item: preprocessed(grpc_url, item[1]), plan))
    for (ok, data), answer in zip(plan, answers):
        if ok:
            for name, array in expected[data].items():
                np.testing.assert_array_equal(answer[name], array)
        else:
            assert answer.status() == "StatusCode.INVALID_ARGUMENT" and "image row 0" in answer.message()
    requests1, executions1 = preprocess_counts(grpc_url)
    assert requests1 - requests0 == len(plan)
    assert executions1 - executions0 < len(plan), "no execution held more than one request: nothing was batched"


def test_through_the_ensemble_a_bad_request_never_costs_a_good_one_its_faces(grpc_url):
    good = [encoded(face_canvas(45 + i, 800, 600, count=2).image) for i in range(3)]
    expected = {data: infer_encoded(grpc_url, [data]) for data in good}

    def send(data):
        try:
            return infer_encoded(grpc_url, [data])
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda item: send(item[1]), mixed_plan(good, 24)))
    for (ok, data), answer in zip(mixed_plan(good, 24), answers):
        if not ok:
            assert answer.status() == "StatusCode.INVALID_ARGUMENT" and "image row 0" in answer.message()
        elif isinstance(answer, InferenceServerException):  # the CPU detector sheds what it cannot take
            assert answer.status() == "StatusCode.UNAVAILABLE" and "overloaded" in answer.message()
        else:
            for name in OUTPUTS:
                np.testing.assert_array_equal(answer[name], expected[data][name])
    assert grpcclient.InferenceServerClient(grpc_url).is_server_ready()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([".jpg", ".png"]), st.integers(0, 30_000)).map(
        lambda cut: encoded(astronaut()[:200, :200], cut[0])[:cut[1]]),
    st.tuples(st.integers(0, 20_000), st.integers(0, 255)).map(  # one byte of a JPEG replaced
        lambda hit: JPEG[:hit[0] % len(JPEG)] + bytes([hit[1]]) + JPEG[hit[0] % len(JPEG) + 1:])))
def test_fuzzed_encoded_bytes_get_an_answer_or_invalid_argument_and_never_kill_the_server(grpc_url, data):
    try:
        out = infer_encoded(grpc_url, [data])
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT" and "image row 0" in exc.message()
    else:
        assert out["num_detections"][0, 0] >= 0 and (out["image_size"] > 0).all()
    assert grpcclient.InferenceServerClient(grpc_url).is_server_ready()


# -- the SDK's encoded transport --------------------------------------------------------------
def test_sdk_sends_jpeg_and_png_as_they_are_and_encodes_anything_else_once(tmp_path):
    png = encoded(astronaut(), ".png")
    (tmp_path / "a.jpg").write_bytes(JPEG)
    cv2.imwrite(str(tmp_path / "a.bmp"), astronaut())
    assert encode_image(tmp_path / "a.jpg") == JPEG and encode_image(png) == png
    for other in (tmp_path / "a.bmp", astronaut()):
        sent = encode_image(other)
        assert sent[:2] == b"\xff\xd8"
        assert sent == encoded(astronaut(), ".jpg", cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY)
    gray = encode_image(cv2.cvtColor(astronaut(), cv2.COLOR_BGR2GRAY))
    assert cv2.imdecode(np.frombuffer(gray, np.uint8), cv2.IMREAD_UNCHANGED).ndim == 2


def test_sdk_encoded_transport_gives_the_pixel_transports_faces_on_the_same_decoded_pixels(grpc_url, tmp_path):
    path = tmp_path / "canvas.png"
    cv2.imwrite(str(path), face_canvas(50, 1024, 768, count=5).image)
    inputs = {"path": path, "jpeg bytes": JPEG, "array": face_canvas(51).image}
    with Client(grpc_url, transport="encoded") as enc, Client(grpc_url, transport="grpc") as pixels:
        assert enc.transport == "encoded"
        for name, image in inputs.items():
            sent = encode_image(image)
            got, expected = enc.detect(image), pixels.detect(sent)  # the pixels the server decodes
            assert len(got) == len(expected) >= 1, name
            for a, b in zip(got, expected):
                assert a.box == b.box and a.score == b.score and np.array_equal(a.landmarks, b.landmarks), name


def test_auto_sends_encoded_images_to_a_replica_set_and_shared_memory_to_a_local_server(grpc_url):
    with Client(f"ipv4:{grpc_url}") as remote, Client(grpc_url) as local:
        assert remote.transport == "encoded"
        assert local.transport == "system_shm"
        assert len(remote.detect(JPEG)) == 1


def test_sdk_names_the_image_the_server_cannot_read_and_keeps_working(grpc_url):
    with Client(grpc_url, transport="encoded") as client:
        with pytest.raises(InvalidImageError, match="truncated JPEG") as caught:
            client.detect(JPEG[:3000])
        assert caught.value.index == 0
        images = [JPEG] * 20 + [BAD["truncated PNG"][0]] + [JPEG] * 3
        with pytest.raises(InvalidImageError, match="image 20 of the batch") as caught:
            client.detect_batch(images)
        assert caught.value.index == 20
        assert client.max_image_pixels == 50_000_000
        with pytest.raises(InvalidImageError, match="over the 50 MP limit"):  # refused before sending
            client.detect(forged_png(8_000, 8_000))
        assert len(client.detect(JPEG)) == 1


def test_detect_stream_over_encoded_images_keeps_order(grpc_url):
    images = [encoded(face_canvas(60 + i % 6, 640, 480, count=1 + i % 3).image) for i in range(36)]
    with Client(grpc_url, transport="encoded") as client:
        one_by_one = [client.detect(image) for image in images[:6]]
        streamed = list(client.detect_stream(images, concurrency=8))
    assert [len(faces) for faces in streamed] == [len(faces) for faces in one_by_one] * 6
    assert all(a.box == b.box for got, want in zip(streamed, one_by_one * 6) for a, b in zip(got, want))


def test_detect_stream_in_batches_gives_each_image_its_faces_in_order(grpc_url):
    images = [encoded(face_canvas(60 + i % 6, 640, 480, count=1 + i % 3).image) for i in range(23)]
    with Client(grpc_url, transport="encoded") as client:
        one_by_one = [client.detect(image) for image in images[:6]]
        executions0 = preprocess_counts(grpc_url)[1]
        batched = list(client.detect_stream(iter(images), concurrency=2, batch=5))  # 4 requests of 5, one of 3
        assert preprocess_counts(grpc_url)[1] - executions0 <= 5
        for bad in (0, client.max_batch + 1):
            with pytest.raises(ValueError, match="batch="):
                next(client.detect_stream(images, batch=bad))
    assert len(batched) == len(images)
    assert all([a.box for a in got] == [b.box for b in one_by_one[i % 6]] for i, got in enumerate(batched))


def test_cli_detects_over_the_encoded_transport(grpc_url, tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "b.png"]
    paths[0].write_bytes(JPEG)
    cv2.imwrite(str(paths[1]), face_canvas(70, 800, 600, count=3).image)
    done = subprocess.run([sys.executable, "-m", "rtface_client.cli", "detect", *map(str, paths), "--url", grpc_url,
                           "--transport", "encoded", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [len(line["faces"]) for line in lines] == [len(detect(str(p), url=grpc_url, transport="grpc")) for p in paths]


def test_a_server_without_the_encoded_ensemble_gets_pixels_and_a_clear_error(engine, tmp_path):
    """A repository built before the encoded ensemble existed: ``auto`` falls back to pixels over
    gRPC, ``transport="encoded"`` says what to rebuild."""
    older = tmp_path / "repo"
    shutil.copytree(engine.repository, older, ignore=shutil.ignore_patterns(repository.ENCODED, repository.PREPROCESS))
    with private_server(older, tmp_path / "server.log") as server:
        with Client(f"ipv4:{server.grpc_url}") as client:
            assert client.transport == "grpc" and len(client.detect(JPEG)) == 1
        with pytest.raises(ModelNotReadyError, match="make engine"):
            Client(server.grpc_url, transport="encoded")
