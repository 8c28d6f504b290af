"""The JPEG decoders of the encoded ensemble alone, in this process: OpenCV on one CPU core (the
CPU build's preprocess, and the GPU build's for PNG and the like) and nvJPEG through
``torchvision.io.decode_jpeg(..., device="cuda")`` (the GPU build's), on 1280x960 camera-like
frames (:func:`tools.sample_images.photo_frame`) encoded as the SDK encodes arrays.

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


def measure(batches=BATCHES, repeats: int = REPEATS) -> list[dict]:
    """One row per decoder and batch size: images/s and CPU ms per image."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [encode_image(photo_frame(seed).image) for seed in range(FRAMES)]
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


def table(rows: list[dict], card: str, mean_bytes: float) -> str:
    """Markdown of :func:`measure`'s rows."""
    lines = [f"### JPEG decoding alone, {card}: 1280x960 frames, {mean_bytes / 1e3:.0f} kB each (quality {JPEG_QUALITY})",
             "", "| decoder | batch | images/s | CPU ms per image |", "|---|---|---|---|"]
    lines += [f"| {r['decoder']} | {r['batch']} | {r['images_per_s']:,.0f} | {r['cpu_ms_per_image']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    """Entry point for ``python -m tools.bench.jpeg_decode``."""
    import torch

    if not torch.cuda.is_available():
        print("jpeg_decode: PyTorch sees no CUDA GPU", file=sys.stderr)
        return 1
    mean_bytes = statistics.mean(len(encode_image(photo_frame(seed).image)) for seed in range(FRAMES))
    print(table(measure(), torch.cuda.get_device_name(0), mean_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
