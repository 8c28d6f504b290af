"""Reliability: overload, server faults, corrupt artifacts, safe defaults, fuzzed input, soak."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rtface_client import Client, InvalidImageError, ServerUnavailableError, detect
from tritonclient.utils import InferenceServerException

from tests.conftest import infer_raw, kill_hard
from tests.test_client import as_detections, registered_regions
from tools.engine import record, repository
from tools.matching import match_boxes
from tools.operations.overload import run_overload
from tools.sample_images import astronaut, face_canvas
from tools.serve import ServeError, _command, find_triton, free_ports, start_server
from tools.settings import REPO_ROOT, ServeSettings
from tools.operations.soak import run_soak

W, H = 1280, 960


def _settings(engine, shm_token=None) -> ServeSettings:
    grpc_port, http_port, metrics_port = free_ports(3)
    return ServeSettings(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                         repository=engine.repository, shm_token=shm_token)


@pytest.fixture
def own_server(engine, tmp_path):
    """A server of this test's own (it may be killed), stopped at the end whatever happened."""
    started = []

    def start(settings=None):
        settings = settings or (started[-1].settings if started else _settings(engine))
        log = open(tmp_path / f"server{len(started)}.log", "w")
        started.append(start_server(settings, log_file=log))
        return started[-1]

    yield start
    for server in started:
        server.stop()


# -- overload ---------------------------------------------------------------------------------
def test_a_burst_beyond_capacity_is_answered_or_rejected_fast_never_dropped(grpc_url):
    report = run_overload(grpc_url, burst=20, rounds=2, unloaded=3, timeout=20)
    assert report.other_errors == []
    assert len(report.accepted) + len(report.rejected) == 40
    assert report.rejected, "the queue policy should reject part of a 20-request burst"
    assert max(report.accepted + report.rejected) < report.timeout
    assert len(detect(astronaut(), url=grpc_url)) == 1


def test_detect_stream_backs_off_under_overload_and_loses_nothing(grpc_url):
    canvases = [face_canvas(300 + i, 640, 480, count=1 + i % 3) for i in range(40)]
    with Client(grpc_url, transport="system_shm", score_threshold=0.9) as client:
        results = list(client.detect_stream((c.image for c in canvases), concurrency=16))
    for canvas, faces in zip(canvases, results, strict=True):
        boxes = as_detections(faces).boxes
        assert len(boxes) == len(canvas.faces) and (match_boxes(canvas.faces, boxes, 0.5) >= 0).all()


# -- faults -----------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_server_killed_mid_stream_makes_the_client_raise_promptly(own_server):
    server = own_server()
    images = (face_canvas(400 + i).image for i in range(10_000))
    with Client(server.grpc_url, transport="system_shm", timeout=30) as client:
        with pytest.raises(ServerUnavailableError):
            for n, _ in enumerate(client.detect_stream(images, concurrency=4)):
                if n == 5:
                    kill_hard(server)
                    killed = time.monotonic()
    assert time.monotonic() - killed < 10, "the client should fail fast, not wait for its timeout"


@pytest.mark.timeout(300)
def test_with_retries_the_stream_survives_a_server_restart_without_duplicates(own_server):
    server = own_server()
    canvases = [face_canvas(500 + i, 640, 480, count=1 + i % 3) for i in range(30)]

    def restart():
        kill_hard(server)
        own_server(server.settings)

    results, restarter = [], threading.Thread(target=restart)
    with Client(server.grpc_url, transport="system_shm", timeout=120, retries=3, score_threshold=0.9) as client:
        for n, faces in enumerate(client.detect_stream((c.image for c in canvases), concurrency=4)):
            results.append(faces)
            if n == 8:
                restarter.start()
        restarter.join()
    assert len(results) == len(canvases)
    for canvas, faces in zip(canvases, results):
        boxes = as_detections(faces).boxes
        assert len(boxes) == len(canvas.faces) and (match_boxes(canvas.faces, boxes, 0.5) >= 0).all()


@pytest.mark.parametrize("backend, artifact", [("onnxruntime", "model.onnx"), ("tensorrt", "model.plan")])
def test_a_corrupt_detector_artifact_stops_make_serve_with_the_fix(engine, tmp_path, backend, artifact):
    repo = tmp_path / "repo"
    shutil.copytree(engine.repository, repo)
    version = repo / repository.DETECTOR / "1"
    data = (version / "model.onnx").read_bytes()
    if backend == "tensorrt":  # a plan recorded by a TensorRT build, then damaged
        metadata = {**record.read(engine.repository), "backend": "tensorrt"}
        (version / "model.plan").write_bytes(data)
        metadata["artifact_sha256"] = record.file_sha256(version / "model.plan")
        (version / "build.json").write_text(json.dumps(metadata))
    (version / artifact).write_bytes(data[: len(data) // 2])
    with pytest.raises(ServeError, match=rf"{artifact} does not match its build record.*make engine"):
        start_server(ServeSettings(repository=repo, grpc_port=free_ports(1)[0]))
    result = subprocess.run([sys.executable, "-m", "tools.serve"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "MODEL_REPOSITORY": str(repo)}, timeout=120)
    assert result.returncode == 1 and artifact in result.stderr and "make engine" in result.stderr
    assert result.stderr.strip().count("\n") == 0


# -- safe defaults ----------------------------------------------------------------------------
def test_defaults_bind_loopback_with_no_remote_model_control(engine):
    settings = ServeSettings()
    assert settings.host == "127.0.0.1" and settings.metrics_host == "127.0.0.1"
    command = _command(find_triton(), settings, token=None)
    assert "--model-control-mode=none" in command
    assert "--grpc-address=127.0.0.1" in command and "--metrics-address=127.0.0.1" in command
    assert not any(flag.startswith("--grpc-restricted-protocol") for flag in command)
    restricted = _command(find_triton(), ServeSettings(host="0.0.0.0"), token="t0ken")
    assert "--grpc-restricted-protocol=shared-memory,model-repository:rtface-shm-token=t0ken" in restricted


def test_shared_memory_registration_requires_the_local_token(engine, own_server, monkeypatch, tmp_path):
    server = own_server(_settings(engine, shm_token=True))
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        raw.register_system_shared_memory("intruder", "/intruder", 64)
    with Client(server.grpc_url) as client:  # same user, same host: reads the token file
        assert client.transport == "system_shm" and len(client.detect(astronaut())) == 1
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "elsewhere"))  # as if on another host
    with Client(server.grpc_url) as client:
        assert client.transport == "grpc" and len(client.detect(astronaut())) == 1


# -- fuzzed input -----------------------------------------------------------------------------
RAW_DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT8": np.int8, "FP16": np.float16}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(0, 18), height=st.sampled_from([H, 1, 480]), width=st.sampled_from([W, 3, 640]),
       dtype=st.sampled_from(list(RAW_DTYPES)), rows=st.integers(0, 19),
       row=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=3, max_size=3),
       params=st.dictionaries(st.sampled_from(["score_threshold", "iou_threshold", "max_detections", "x"]),
                              st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 10_000),
                                        st.text(max_size=5)), max_size=2))
def test_fuzzed_raw_requests_get_an_answer_or_an_error_and_never_kill_the_server(
        grpc_url, batch, height, width, dtype, rows, row, params):
    images = np.zeros((batch, height, width, 3), RAW_DTYPES[dtype])
    placement = np.tile(np.array(row, np.float32), (rows, 1))
    try:
        out = infer_raw(grpc_url, images, placement, params or None, images_dtype=dtype)
    except InferenceServerException as exc:
        assert exc.message()
    else:
        assert out["num_detections"].shape == (batch, 1) and (out["num_detections"] >= 0).all()
    assert grpcclient.InferenceServerClient(grpc_url).is_server_ready()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=64),
    st.sampled_from(["png", "jpg"]).flatmap(lambda ext: st.integers(1, 400).map(lambda cut: (ext, cut))),
    st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from([None, 1, 2, 3, 4]),
              st.sampled_from([np.uint8, np.float32, np.uint16, np.bool_]))))
def test_fuzzed_sdk_input_gives_faces_or_an_invalid_image_error(grpc_url, data):
    if isinstance(data, tuple) and isinstance(data[0], str):  # truncated encoded image
        ext, cut = data
        data = cv2.imencode(f".{ext}", astronaut())[1].tobytes()[:cut]
    elif isinstance(data, tuple):  # a random array
        h, w, c, dtype = data
        data = np.zeros((h, w) if c is None else (h, w, c), dtype)
    try:
        faces = detect(data, url=grpc_url, transport="grpc")
    except InvalidImageError as exc:
        assert str(exc)
    else:
        assert isinstance(faces, list)


def test_a_100_megapixel_image_is_refused_before_it_costs_memory(grpc_url):
    huge = np.broadcast_to(np.uint8(0), (10_000, 10_000, 3))  # no memory behind it
    with pytest.raises(InvalidImageError, match="MP limit"):
        detect(huge, url=grpc_url)


# -- soak -------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_a_20_second_soak_of_8_mixed_clients_loses_and_mixes_up_nothing(server):
    baseline = len(registered_regions(server.grpc_url))
    report = run_soak(server.grpc_url, seconds=20, clients=8, server_pid=server.process.pid)
    print(report.summary())
    assert report.sent > 0 and report.errors == []
    assert report.lost == 0 and report.mismatched == 0
    warm = report.regions[len(report.regions) // 4:]
    assert max(warm) == min(warm), f"registered regions changed during the soak: {report.regions}"
    assert len(registered_regions(server.grpc_url)) == baseline
