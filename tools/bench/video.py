"""``make bench-video``: ``rtface detect`` on a clip against the SDK on the same frames in memory.

One run, one server, the same frames:

  decode     OpenCV decoding the clip alone (frames/s): the client's extra cost for video
  sdk        ``Client.detect_stream`` over the clip's frames already decoded in memory (what
             ``make bench``'s served rows measure)
  cli        ``rtface detect CLIP --output /dev/null``: decode, send, JSON lines, in order

``VIDEO`` names a clip to use; without it a ``VIDEO_SIZE`` (1280x720) clip of ``VIDEO_FRAMES``
(96) frames panning across face canvases is written once into ``build/bench/`` (MPEG-4 part 2,
the codec every OpenCV wheel writes; H.264 where the wheel's FFmpeg has an encoder for it; for
an H.264 file from that clip: ``ffmpeg -i CLIP -c:v libx264 -pix_fmt yuv420p OUT.mp4``). ``URL`` (a running
server) or a server started on free ports over ``MODEL_REPOSITORY``. ``CONCURRENCY`` (4, the
CLI's default) requests in flight for both sdk and cli. Median of ``BENCH_REPEATS`` (3) runs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from rtface_client import Client
from rtface_client.cli import main as cli_main
from rtface_client.video import open_video

from tools.sample_images import face_canvas
from tools.serve import private_server
from tools.settings import REPO_ROOT, ServeSettings, SettingsError, env_int, env_text

__all__ = ["write_clip", "measure", "main"]

CODECS = ("avc1", "mp4v")  # H.264 when the wheel can encode it, else MPEG-4 part 2


def write_clip(path: Path, width: int, height: int, frames: int, fps: float = 30.0) -> str:
    """Write a ``frames``-frame clip at ``path``: a camera panning across face canvases one and a
    half times the frame's size (two scenes, whole pixels per frame, so faces move as in real
    footage and the clip compresses like it); return the codec used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scenes = [face_canvas(300 + k, width * 3 // 2, height * 3 // 2, count=3 + k).image for k in range(2)]
    per_scene = -(-frames // len(scenes))

    def frame(i: int) -> np.ndarray:
        scene, step = scenes[i // per_scene], (i % per_scene) / max(per_scene - 1, 1)
        x, y = round(step * (scene.shape[1] - width)), round(step * (scene.shape[0] - height))
        return scene[y:y + height, x:x + width]

    for codec in CODECS:
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        if writer.isOpened():
            for i in range(frames):
                writer.write(np.ascontiguousarray(frame(i)))
            writer.release()
            if open_video(str(path)).frame_count == frames:
                return codec
    raise RuntimeError(f"OpenCV cannot write a {width}x{height} clip here with {' or '.join(CODECS)}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(url: str, clip: Path, concurrency: int, repeats: int) -> dict:
    """Frames/s of decoding alone, the SDK on decoded frames, and the CLI on the clip."""
    decoded = [frame.image for frame in open_video(str(clip)).frames()]
    count = len(decoded)

    def decode():
        for _ in open_video(str(clip)).frames():
            pass

    with Client(url) as client:
        transport = client.transport
        list(client.detect_stream(decoded[:concurrency], concurrency=concurrency))  # warm-up

        def sdk():
            for _ in client.detect_stream(decoded, concurrency=concurrency):
                pass

        rates = {"decode": [], "sdk": [], "cli": []}
        for _ in range(repeats):
            rates["decode"].append(count / _timed(decode))
            rates["sdk"].append(count / _timed(sdk))
            rates["cli"].append(count / _timed(lambda: cli_main(
                ["detect", str(clip), "--url", url, "--output", os.devnull, "--concurrency", str(concurrency)])))
    result = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    return {"frames": count, "transport": transport, **result, "cli_over_sdk": round(result["cli"] / result["sdk"], 3)}


def main() -> int:
    """Entry point for ``python -m tools.bench.video``."""
    try:
        width, height = (int(side) for side in env_text("VIDEO_SIZE", "1280x720").lower().split("x"))
    except ValueError:
        raise SettingsError("VIDEO_SIZE: write it as WIDTHxHEIGHT, e.g. 1280x720") from None
    frames = env_int("VIDEO_FRAMES", 96, 8, 100_000)
    concurrency, repeats = env_int("CONCURRENCY", 4, 1, 256), env_int("BENCH_REPEATS", 3, 1, 100)
    given = env_text("VIDEO", "")
    clip = Path(given) if given else REPO_ROOT / "build" / "bench" / f"clip-{width}x{height}-{frames}.mp4"
    codec = "given" if given else write_clip(clip, width, height, frames)
    url = env_text("URL", "")
    if url:
        result = measure(url, clip, concurrency, repeats)
    else:
        with private_server(ServeSettings.from_env().repository, REPO_ROOT / "build" / "bench" / "server-video.log") as server:
            result = measure(server.grpc_url, clip, concurrency, repeats)
    print(f"clip {clip} ({codec}, {result['frames']} frames), transport {result['transport']}, "
          f"concurrency {concurrency}, median of {repeats}:")
    print("| step | frames/s |\n|---|---|")
    for name in ("decode", "sdk", "cli"):
        print(f"| {name} | {result[name]:,} |")
    print(f"cli / sdk = {result['cli_over_sdk']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
