"""One camera stream through the SDK: ``Client.detect`` on one 1280x960 frame at a time, per transport.

For each transport (``SDK_TRANSPORTS``, default ``cuda_shm,encoded``) a :class:`rtface_client.Client`
sends ``SDK_CALLS`` (300) frames one after another, after 30 untimed ones: photo frames of the
engine's size (:func:`tools.sample_images.photo_frame`), as arrays over the pixel transports and
as the JPEG files a camera would give (quality 95) over ``encoded``. It prints the median and 90th
percentile of a call and the frames per second of the stream. ``SDK_PROFILE=1`` adds the top of a
cProfile of the calls (where the client's own time goes).

``URL=127.0.0.1:8001 python -m tools.bench.sdk_latency`` against a running server on this host.
The ``rtface_client`` on ``PYTHONPATH`` is measured, so another version of the SDK can be put first.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

import cv2
import rtface_client
from rtface_client import Client

from tools.sample_images import photo_frame
from tools.server_info import engine_size
from tools.settings import env_int, env_text

__all__ = ["measure", "main"]

FRAMES = 8  # distinct frames, sent in turn
WARM_CALLS = 30


def measure(url: str, transport: str, calls: int, profile: bool = False) -> dict:
    """Milliseconds per ``Client.detect`` call over ``transport``: p50, p90, frames/s (and a profile)."""
    width, height = engine_size(url)
    frames = [photo_frame(seed, width, height).image for seed in range(FRAMES)]
    if transport == "encoded":
        frames = [bytes(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]) for frame in frames]
    with Client(url, transport=transport) as client:
        for index in range(WARM_CALLS):
            client.detect(frames[index % FRAMES])
        profiler = cProfile.Profile() if profile else None
        times, started = [], time.perf_counter()
        if profiler:
            profiler.enable()
        for index in range(calls):
            begin = time.perf_counter()
            client.detect(frames[index % FRAMES])
            times.append(time.perf_counter() - begin)
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - started
    times.sort()
    report = {"transport": transport, "p50": statistics.median(times) * 1e3,
              "p90": times[int(0.9 * (len(times) - 1))] * 1e3, "fps": calls / elapsed}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        report["profile"] = text.getvalue()
    return report


def main() -> int:
    url = env_text("URL", "127.0.0.1:8001")
    calls = env_int("SDK_CALLS", 300, 10, 100_000)
    profile = env_text("SDK_PROFILE", "0") == "1"
    print(f"SDK ({rtface_client.__file__}) against {url}: Client.detect, one 1280x960 frame per call, {calls} calls")
    print("| transport | p50 ms | p90 ms | frames/s |\n|---|---:|---:|---:|")
    transports = env_text("SDK_TRANSPORTS", "cuda_shm,encoded").split(",")
    reports = [measure(url, transport, calls, profile) for transport in transports]
    for r in reports:
        print(f"| {r['transport']} | {r['p50']:.2f} | {r['p90']:.2f} | {r['fps']:,.0f} |")
    for r in reports:
        if "profile" in r:
            print(f"\ncProfile, {r['transport']}:\n{r['profile']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
