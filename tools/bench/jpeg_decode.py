"""The JPEG decoders of the encoded ensemble alone, in this process: OpenCV on one CPU core (the
CPU build's preprocess, and the GPU build's for PNG and the like) and nvJPEG through
``torchvision.io.decode_jpeg(..., device="cuda")`` (the GPU build's), on two sets of 1280x960
frames encoded as the SDK encodes arrays: camera-like photo frames (:func:`tools.sample_images.photo_frame`,
what ``make bench``'s GPU rows send) and ``make perf``'s frames (the astronaut, the crowd and two
noisy canvases: larger files, as noise is the worst case for JPEG).

For each batch size: images/s (median of ``REPEATS`` timed batches, the GPU synchronised after
each), and the CPU time this process spent per image, which tells the GPU's hardware decoder
(next to none) from nvJPEG's hybrid decoder (Huffman decoding on the CPU). Prints a markdown table.

Usage: ``python -m tools.bench.jpeg_decode`` (on a machine where PyTorch sees a CUDA GPU).
"""

from __future__ import annotations

import statistics
import sys
import time

import cv2
import numpy as np
from rtface_client.images import JPEG_QUALITY, encode_image

from tools.bench.perf_inputs import jpeg_frame, sample_frames
from tools.sample_images import photo_frame

__all__ = ["measure", "main"]

BATCHES = (1, 4, 16, 64)
REPEATS = 30
FRAMES = 16


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and mean CPU seconds of ``fn()`` over ``repeats`` calls, after a warm-up."""
    fn()
    walls, cpu = [], time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), (time.process_time() - cpu) / repeats


def frame_sets() -> dict[str, list[bytes]]:
    """The JPEG files measured, by name."""
    return {"photo frames": [encode_image(photo_frame(seed).image) for seed in range(FRAMES)],
            "make perf frames": [jpeg_frame(frame) for frame in sample_frames(1280, 960)]}


def measure(jpegs: list[bytes], batches=BATCHES, repeats: int = REPEATS) -> list[dict]:
    """One row per decoder and batch size on ``jpegs``: images/s and CPU ms per image."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    rows = []
    wall, cpu = _timed(lambda: [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs], 3)
    rows.append({"decoder": "OpenCV, 1 CPU thread", "batch": 1, "images_per_s": len(jpegs) / wall,
                 "cpu_ms_per_image": cpu / len(jpegs) * 1000})
    for batch in batches:
        data = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(batch)]

        def gpu():
            decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.synchronize()

        wall, cpu = _timed(gpu, repeats)
        rows.append({"decoder": "nvJPEG (torchvision, GPU)", "batch": batch, "images_per_s": batch / wall,
                     "cpu_ms_per_image": cpu / batch * 1000})
    return rows


def table(rows: list[dict], card: str, name: str, mean_bytes: float) -> str:
    """Markdown of :func:`measure`'s rows."""
    lines = [f"### JPEG decoding alone, {card}: {name}, 1280x960, {mean_bytes / 1e3:.0f} kB each (quality {JPEG_QUALITY})",
             "", "| decoder | batch | images/s | CPU ms per image |", "|---|---|---|---|"]
    lines += [f"| {r['decoder']} | {r['batch']} | {r['images_per_s']:,.0f} | {r['cpu_ms_per_image']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    """Entry point for ``python -m tools.bench.jpeg_decode``."""
    import torch

    if not torch.cuda.is_available():
        print("jpeg_decode: PyTorch sees no CUDA GPU", file=sys.stderr)
        return 1
    for name, jpegs in frame_sets().items():
        mean_bytes = statistics.mean(len(j) for j in jpegs)
        print(table(measure(jpegs), torch.cuda.get_device_name(0), name, mean_bytes), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
