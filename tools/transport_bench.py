"""Transport alone: how fast the SDK's transports move 1-frame requests, with no detector.

The requests go to the frame sink (``tools/frame_sink_model.py``), which has the ensemble's inputs
and outputs but does no detection. Each request is timed from a letterboxed frame already in
the transport's buffer to the outputs in hand. The SDK letterboxes straight into that buffer, so
the frame is written once either way. What is timed is the SDK's own path:
``Slot.attach`` → ``infer`` → ``Slot.read``. Over gRPC that path serialises the frame into the
request and the outputs into the response. Over system shared memory it passes region offsets
only. Over CUDA shared memory it adds the copy to the GPU. Every answer carries a checksum of
its frame, which is checked, so a request that did not move its bytes cannot count.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from rtface_client.transport import SlotPool

from tools import repository
from tools.frame_sink_model import sample_checksum

__all__ = ["TransportRow", "measure_transport", "transport_table"]


@dataclass
class TransportRow:
    """One transport at concurrency 1: frames/s and MB/s (median of repeats), request p50."""

    transport: str
    frames_per_s: float
    mb_per_s: float
    p50_ms: float
    requests: int


def _timed_requests(pool: SlotPool, conn: grpcclient.InferenceServerClient, frames: list[np.ndarray],
                    count: int) -> tuple[float, list[float]]:
    """Send ``count`` one-frame requests in turn; return the elapsed seconds and each latency."""
    letterbox_row = grpcclient.InferInput("letterbox", [1, 3], "FP32")
    letterbox_row.set_data_from_numpy(np.array([[1.0, 0.0, 0.0]], np.float32))
    latencies, elapsed = [], 0.0
    for i in range(count):
        frame = frames[i % len(frames)]
        with pool.acquire(1) as slot:
            slot.images[0] = frame
            start = time.perf_counter()
            images = grpcclient.InferInput("images", [1, *frame.shape], "UINT8")
            slot.attach(images, 1)
            result = conn.infer(repository.FRAME_SINK, [images, letterbox_row], outputs=slot.outputs(1))
            checksum = slot.read(result, 1)["num_detections"][0, 0]
            took = time.perf_counter() - start
        if checksum != sample_checksum(frame[None])[0, 0]:
            raise RuntimeError(f"the frame sink saw other pixels than were sent over {pool.transport}")
        latencies.append(took)
        elapsed += took
    return elapsed, latencies


def measure_transport(url: str, frames: list[np.ndarray], transports: list[str], requests: int,
                      repeats: int, max_detections: int) -> list[TransportRow]:
    """Each of ``transports`` (SDK names: grpc, system_shm, cuda_shm) in turn, ``repeats`` runs
    of ``requests`` sequential one-frame requests to the frame sink at ``url``."""
    conn = grpcclient.InferenceServerClient(url)
    frame_mb = frames[0].nbytes / 1e6
    rows = []
    for transport in transports:
        pool = SlotPool(transport, frames[0].shape[:2], conn, max_detections=max_detections)
        try:
            _timed_requests(pool, conn, frames, 5)  # warm-up: connection, regions, first-call costs
            rates, medians = [], []
            for _ in range(repeats):
                elapsed, latencies = _timed_requests(pool, conn, frames, requests)
                rates.append(requests / elapsed)
                medians.append(statistics.median(latencies) * 1000)
        finally:
            pool.close()
        rate = statistics.median(rates)
        rows.append(TransportRow(transport, round(rate, 1), round(rate * frame_mb, 1),
                                 round(statistics.median(medians), 3), requests * repeats))
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
