"""Transport alone: how fast the SDK's transports move 1-frame requests, with no detector.

The requests go to the frame sink (``tools/bench/frame_sink.py``), which has the ensemble's inputs
and outputs but does no detection. Each request is timed from a letterboxed frame already in
the transport's buffer to the outputs in hand. The SDK letterboxes straight into that buffer, so
the frame is written once either way. What is timed is the SDK's own path:
``Slot.attach`` → ``infer`` → ``Slot.read``. Over gRPC that path serialises the frame into the
request and the outputs into the response. Over system shared memory it passes region offsets
only. Over CUDA shared memory it adds the copy to the GPU. Every answer carries a checksum of
its frame, which is checked, so a request that did not move its bytes cannot count.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from rtface_client.transport import SlotPool

from tools.engine.configs import ensemble_interface
from tools.bench.frame_sink import sample_checksum
from tools.settings import BuildSettings

__all__ = ["FRAME_SINK", "TransportRow", "write_frame_sink", "measure_transport", "transport_table"]

FRAME_SINK = "frame_sink"  # the frame sink's model name, only in the benchmark's scratch repositories


def write_frame_sink(s: BuildSettings) -> Path:
    """Add the benchmark's frame sink (``frame_sink.py`` beside this file: the ensemble's inputs and
    outputs, no detection) to the scratch repository ``s.repository``; return its directory."""
    directory = s.repository / FRAME_SINK
    (directory / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("frame_sink.py"), directory / "1" / "model.py")
    (directory / "config.pbtxt").write_text(f"""name: "{FRAME_SINK}"
backend: "python"
{ensemble_interface(s)}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
""")
    return directory



@dataclass
class TransportRow:
    """One transport at concurrency 1: frames/s and MB/s (median of repeats), request p50."""

    transport: str
    frames_per_s: float
    mb_per_s: float
    p50_ms: float
    requests: int


def _timed_requests(pool: SlotPool, conn: grpcclient.InferenceServerClient, frames: list[np.ndarray],
                    checksums: list[int], count: int) -> list[float]:
    """Send ``count`` one-frame requests in turn; return each one's latency in seconds."""
    letterbox_row = grpcclient.InferInput("letterbox", [1, 3], "FP32")
    letterbox_row.set_data_from_numpy(np.array([[1.0, 0.0, 0.0]], np.float32))
    latencies = []
    for i in range(count):
        frame, expected = frames[i % len(frames)], checksums[i % len(frames)]
        with pool.acquire(1) as slot:
            slot.images[0] = frame
            start = time.perf_counter()
            images = grpcclient.InferInput("images", [1, *frame.shape], "UINT8")
            slot.attach(images, 1)
            result = conn.infer(FRAME_SINK, [images, letterbox_row], outputs=slot.outputs(1))
            checksum = slot.read(result, 1)["num_detections"][0, 0]
            latencies.append(time.perf_counter() - start)
        if checksum != expected:
            raise RuntimeError(f"the frame sink saw other pixels than were sent over {pool.transport}")
    return latencies


def measure_transport(url: str, frames: list[np.ndarray], transports: list[str], requests: int,
                      repeats: int, max_detections: int) -> list[TransportRow]:
    """Each of ``transports`` (SDK names: grpc, system_shm, cuda_shm) in turn, ``repeats`` runs
    of ``requests`` sequential one-frame requests to the frame sink at ``url``."""
    conn = grpcclient.InferenceServerClient(url)
    checksums = [int(sample_checksum(frame[None])[0, 0]) for frame in frames]
    frame_mb = frames[0].nbytes / 1e6
    rows = []
    for transport in transports:
        pool = SlotPool(transport, frames[0].shape[:2], conn, max_detections=max_detections)
        try:
            _timed_requests(pool, conn, frames, checksums, 5)  # warm-up: connection, regions, first calls
            runs = [_timed_requests(pool, conn, frames, checksums, requests) for _ in range(repeats)]
        finally:
            pool.close()
        rate = statistics.median(requests / sum(latencies) for latencies in runs)
        p50_ms = statistics.median(statistics.median(latencies) for latencies in runs) * 1000
        rows.append(TransportRow(transport, round(rate, 1), round(rate * frame_mb, 1), round(p50_ms, 3),
                                 requests * repeats))
    return rows


def transport_table(size: str, rows: list[TransportRow]) -> str:
    """Markdown: one line per transport, with its ratio to the first row (gRPC)."""
    base = rows[0]
    lines = [f"### {size}: transport alone (frame sink, concurrency 1)", "",
             "| transport | frames/s | MB/s | x gRPC | p50 ms per request | requests |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.transport} | {row.frames_per_s} | {row.mb_per_s} | "
                     f"{row.mb_per_s / base.mb_per_s:.2f} | {row.p50_ms} | {row.requests} |")
    return "\n".join(lines)
