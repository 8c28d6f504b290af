"""The transport-alone benchmark against the frame sink on the session's real server."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from rtface_client.letterbox import letterbox

from tools.bench.frame_sink import sample_checksum
from tools.sample_images import astronaut, face_canvas
from tools.bench.transport import FRAME_SINK, measure_transport, transport_table

W, H = 1280, 960


def _sink_checksum(url: str, frame: np.ndarray) -> int:
    client = grpcclient.InferenceServerClient(url)
    images = grpcclient.InferInput("images", [1, *frame.shape], "UINT8")
    images.set_data_from_numpy(frame[None])
    row = grpcclient.InferInput("letterbox", [1, 3], "FP32")
    row.set_data_from_numpy(np.array([[1.0, 0.0, 0.0]], np.float32))
    return int(client.infer(FRAME_SINK, [images, row]).as_numpy("num_detections")[0, 0])


def test_frame_sink_answers_with_the_checksum_of_the_pixels_it_received(grpc_url):
    frame = letterbox(astronaut(), W, H)[0]
    assert _sink_checksum(grpc_url, frame) == sample_checksum(frame[None])[0, 0]
    changed = frame.copy()
    changed[61, 67, 0] ^= 0xFF  # a sampled pixel
    assert _sink_checksum(grpc_url, changed) == sample_checksum(changed[None])[0, 0] != sample_checksum(frame[None])[0, 0]


def test_transport_benchmark_measures_every_transport_it_is_given(grpc_url, engine):
    frames = [letterbox(image, W, H)[0] for image in (astronaut(), face_canvas(3).image)]
    rows = measure_transport(grpc_url, frames, ["grpc", "system_shm"], requests=4, repeats=2,
                             max_detections=engine.max_detections)
    assert [row.transport for row in rows] == ["grpc", "system_shm"]
    for row in rows:
        assert row.frames_per_s > 0 and row.p50_ms > 0 and row.requests == 8
        assert abs(row.mb_per_s - row.frames_per_s * frames[0].nbytes / 1e6) < 0.5
    assert "| system_shm |" in transport_table("1280x960", rows)
