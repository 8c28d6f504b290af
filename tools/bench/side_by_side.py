"""``make bench``: side-by-side throughput and latency, one run, the same images, medians.

Rows (per engine size, default 1280x960 and 640x640):

  forward   bare onnxruntime forward pass of the original graph (no decode, no NMS)
  a         reference in-process: original graph + numpy decode + OpenCV NMS
  b         rewritten graph in-process on onnxruntime (+ the same NMS)
  c         served, SDK over gRPC          (latency at concurrency 1, throughput at the best one)
  d         served, SDK over system shm    (same)
  e         served, SDK over CUDA shm      (only where a GPU and cuda-bindings are present)
  h         served, SDK encoded images over gRPC: the same images as JPEG bytes (quality 95),
            decoded and letterboxed by the server (``retinaface_encoded``)
  f, g, i   served torch detector on the GPU (default build), SDK over CUDA shm, over gRPC, and
            encoded images over gRPC (where PyTorch sees a GPU; concurrency up to 64;
            ``GPU_FRAMES`` camera-like frames of the engine's size per run, photographs with
            real faces and the crowd photo: f and g send the pixels of the JPEG files row i sends),
            beside the GPU detector alone in-process (:mod:`tools.bench.gpu_detector`)
  j         as i, ``detect_stream(batch=8)``: eight images per request in the throughput runs

In-process rows run one image at a time. Each figure is the median of ``BENCH_REPEATS`` runs
over ``BENCH_IMAGES`` images (real faces: astronaut, selfie, canvases). For served rows the
transport overhead is client latency minus the server's own time for the request (Triton's
statistics), its bytes/s is the bytes an image sends over that overhead, and bytes/image is what
one image puts in the request (the letterboxed frame, or the JPEG file). A second table per size
measures each transport alone, against a frame sink with no detector (:mod:`tools.bench.transport`).
Writes ``results/bench/bench-<size>.json`` and ``results/bench/bench.md``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from rtface_client import Client
from rtface_client.images import encode_image
from rtface_client.letterbox import letterbox
from rtface_client.transport import cuda_unavailable_reason

from tools.engine import repository
from tools.engine.build import build_scratch
from tools.engine.source import load_source_model
from tools.engine.reference import ReferencePipeline, nms_reference
from tools.sample_images import astronaut, face_canvas, photo_frame, selfie
from tools.serve import private_server
from tools.settings import REPO_ROOT, BuildSettings, env_int, parse_input_size
from tools.engine.surgery import rewrite
from tools.engine.backends import pytorch
from tools.bench.gpu_detector import gpu_table, measure_gpu_detector
from tools.bench.transport import TransportRow, measure_transport, transport_table, write_frame_sink

__all__ = ["Row", "bench_size", "gpu_rows", "main"]

OUT = REPO_ROOT / "results" / "bench"
CONCURRENCIES = (1, 2, 4, 8)
GPU_CONCURRENCIES = (1, 8, 16, 32, 64)  # a GPU detector needs more requests in flight to batch
GPU_FRAMES = 480  # frames per run for the GPU rows (BENCH_IMAGES are too few to fill its batches)
GPU_STREAM_BATCH = 8  # row j: images per request of detect_stream (one request's Python and round trip per 8 images)
GPU_BATCHES = (1, 16)  # the GPU detector alone: one image, and a full default batch
TRANSPORT_REQUESTS = 100  # per repeat, for the transport-alone rows


@dataclass
class Row:
    """One pipeline's figures: images/s (best concurrency), latency percentiles at concurrency 1."""

    name: str
    images_per_s: float
    p50_ms: float
    p99_ms: float
    concurrency: int = 1
    transport_overhead_ms: float | None = None
    transport_mb_per_s: float | None = None
    bytes_per_image: int | None = None


def _images(count: int) -> list[np.ndarray]:
    pool = [astronaut()] + ([selfie()] if selfie() is not None else [])
    pool += [face_canvas(seed, count=4).image for seed in range(count)]
    return pool[:count]


def _latencies(fn, images) -> list[float]:
    out = []
    for image in images:
        start = time.perf_counter()
        fn(image)
        out.append(time.perf_counter() - start)
    return out


def _row(name: str, runs: list[list[float]]) -> Row:
    """Median over runs of each run's throughput and percentiles (sequential, concurrency 1)."""
    rate = statistics.median(len(r) / sum(r) for r in runs)
    p50 = statistics.median(float(np.percentile(r, 50)) for r in runs) * 1000
    p99 = statistics.median(float(np.percentile(r, 99)) for r in runs) * 1000
    return Row(name, round(rate, 2), round(p50, 1), round(p99, 1))


def _in_process_rows(width: int, height: int, images, repeats: int) -> list[Row]:
    source = load_source_model()
    reference = ReferencePipeline(source, width, height)
    engine = BuildSettings(input_width=width, input_height=height)  # the defaults at this size
    model, _ = rewrite(source.load(), width, height, engine.topk, source.convention)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    boxed = [letterbox(image, width, height) for image in images]

    def forward(item):
        reference.forward(item[0][None])

    def pipeline_a(item):
        reference.detect(item[0][None], [item[1].scale], topk=engine.topk, max_detections=engine.max_detections)

    def pipeline_b(item):
        (candidates,) = session.run(None, {"images": item[0][None]})
        nms_reference(candidates[0], 0.5, 0.4, engine.max_detections)

    rows = []
    for name, fn in (("forward: original graph, onnxruntime", forward),
                     ("a: reference in-process", pipeline_a),
                     ("b: rewritten graph in-process", pipeline_b)):
        fn(boxed[0])  # warm-up
        rows.append(_row(name, [_latencies(fn, boxed) for _ in range(repeats)]))
    return rows


def _server_time_ms(control: grpcclient.InferenceServerClient, model: str) -> tuple[int, float]:
    stats = control.get_inference_statistics(model, as_json=True)["model_stats"][0]
    success = stats["inference_stats"]["success"]
    return int(success.get("count", 0)), int(success.get("ns", 0)) / 1e6


def _served_row(name: str, url: str, transport: str, images, repeats: int, frame_bytes: int,
                concurrencies: tuple[int, ...] = CONCURRENCIES, batch: int = 1) -> Row:
    """One served row: ``images`` (arrays, or JPEG bytes for ``encoded``) through the SDK, each
    putting ``frame_bytes`` into its request on average; the throughput runs send ``batch``
    images per request (``detect_stream(batch=...)``), the latency run one."""
    control = grpcclient.InferenceServerClient(url)
    model = repository.ENCODED if transport == "encoded" else repository.ENSEMBLE
    with Client(url, transport=transport, timeout=120) as client:
        client.detect(images[0])
        runs, overheads = [], []
        for _ in range(repeats):
            count0, ns0 = _server_time_ms(control, model)
            runs.append(_latencies(client.detect, images))
            count1, ns1 = _server_time_ms(control, model)
            server_ms = (ns1 - ns0) / max(1, count1 - count0)
            overheads.append(statistics.mean(runs[-1]) * 1000 - server_ms)
        row = _row(name, runs)
        best = row.images_per_s, 1
        for concurrency in concurrencies[1:]:
            rates = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in client.detect_stream(images, concurrency=concurrency, batch=batch):
                    pass
                rates.append(len(images) / (time.perf_counter() - start))
            best = max(best, (round(statistics.median(rates), 2), concurrency))
    overhead = statistics.median(overheads)
    row.images_per_s, row.concurrency = best
    row.transport_overhead_ms = round(overhead, 2)
    row.transport_mb_per_s = round(frame_bytes / 1e6 / (overhead / 1000), 1) if overhead > 0 else None
    row.bytes_per_image = round(frame_bytes)
    return row


def _jpegs(images) -> tuple[list[bytes], float]:
    """``images`` as the JPEG files the SDK makes of arrays, and their mean size in bytes."""
    jpegs = [encode_image(image) for image in images]
    return jpegs, statistics.mean(len(j) for j in jpegs)


def _gpu_frames(width: int, height: int, count: int) -> tuple[list[np.ndarray], list[bytes], float]:
    """``count`` camera-like frames of exactly ``width`` x ``height`` (photographs with real faces,
    :func:`photo_frame`, and the crowd photo letterboxed; 24 distinct, cycled) as JPEG files, their
    pixels as OpenCV decodes them, and their mean size: enough requests in flight to keep a GPU
    detector's batches full, the same content for every transport."""
    crowd = selfie()
    distinct = [letterbox(crowd, width, height)[0]] if crowd is not None else []
    distinct += [photo_frame(seed, width, height).image for seed in range(24 - len(distinct))]
    jpegs, mean_bytes = _jpegs(distinct)
    decoded = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    return ([decoded[i % len(decoded)] for i in range(count)], [jpegs[i % len(jpegs)] for i in range(count)],
            mean_bytes)


def gpu_rows(url: str, width: int, height: int, repeats: int) -> list[Row]:
    """Rows f, g and i against the GPU server at ``url`` (engine ``width`` x ``height``), fed
    ``GPU_FRAMES`` frames per run (:func:`_gpu_frames`)."""
    frames, jpegs, jpeg_bytes = _gpu_frames(width, height, env_int("GPU_FRAMES", GPU_FRAMES, 2, 100_000))
    rows = [("f: served torch detector (GPU), SDK over CUDA shm", "cuda_shm", frames, width * height * 3, 1),
            ("g: served torch detector (GPU), SDK over gRPC", "grpc", frames, width * height * 3, 1),
            ("i: served torch detector (GPU), SDK encoded JPEG over gRPC", "encoded", jpegs, jpeg_bytes, 1),
            (f"j: as i, {GPU_STREAM_BATCH} images per request", "encoded", jpegs, jpeg_bytes, GPU_STREAM_BATCH)]
    return [_served_row(name, url, transport, images, repeats, size, GPU_CONCURRENCIES, batch)
            for name, transport, images, size, batch in rows]


def _gpu_rows(width: int, height: int, repeats: int) -> list[Row]:
    """:func:`gpu_rows` of the torch detector (default build) built into ``build/bench`` and served
    on free ports."""
    settings = build_scratch(REPO_ROOT / "build" / "bench" / f"torch-{width}x{height}", backend="torch",
                             input_width=width, input_height=height)
    with private_server(settings.repository, settings.repository / "server.log") as server:
        return gpu_rows(server.grpc_url, width, height, repeats)


def bench_size(width: int, height: int, images, repeats: int) -> tuple[list[Row], list[TransportRow]]:
    """All rows for one engine size, and the transport-alone rows: builds that engine (plus the
    frame sink) into ``build/bench``, serves it on free ports for the served rows, and always
    stops the server; then the GPU rows where PyTorch sees a GPU."""
    settings = build_scratch(REPO_ROOT / "build" / "bench" / f"{width}x{height}", backend="onnxruntime",
                             input_width=width, input_height=height)
    repo = settings.repository
    write_frame_sink(settings)
    rows = _in_process_rows(width, height, images, repeats)
    with private_server(repo, repo / "server.log") as server:
        transports = [("c: served, SDK over gRPC", "grpc"), ("d: served, SDK over system shm", "system_shm")]
        if cuda_unavailable_reason() is None:
            transports.append(("e: served, SDK over CUDA shm", "cuda_shm"))
        for name, transport in transports:
            rows.append(_served_row(name, server.grpc_url, transport, images, repeats, width * height * 3))
        jpegs, jpeg_bytes = _jpegs(images)
        rows.append(_served_row("h: served, SDK encoded JPEG over gRPC", server.grpc_url, "encoded", jpegs,
                                repeats, jpeg_bytes))
        frames = [letterbox(image, width, height)[0] for image in images[:4]]
        alone = measure_transport(server.grpc_url, frames, [t for _, t in transports], TRANSPORT_REQUESTS,
                                  repeats, settings.max_detections)
    if pytorch.status()[0]:
        rows += _gpu_rows(width, height, repeats)
    return rows, alone


def _machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("onnxruntime", "numpy", "tritonclient", "nvidia-pytriton", "opencv-python"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


def _table(size: str, rows: list[Row]) -> str:
    base = rows[1]  # the reference pipeline (a)
    lines = [f"### {size}", "",
             "| pipeline | images/s | x ref (a) | p50 ms | p99 ms | x ref p50 | best concurrency | transport overhead ms | transport MB/s | bytes/image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.images_per_s} | {row.images_per_s / base.images_per_s:.2f} | "
                     f"{row.p50_ms} | {row.p99_ms} | {row.p50_ms / base.p50_ms:.2f} | {row.concurrency} | "
                     f"{row.transport_overhead_ms if row.transport_overhead_ms is not None else ''} | "
                     f"{row.transport_mb_per_s if row.transport_mb_per_s is not None else ''} | "
                     f"{f'{row.bytes_per_image:,}' if row.bytes_per_image is not None else ''} |")
    return "\n".join(lines)


def main() -> int:
    """Entry point for ``python -m tools.bench.side_by_side``: ``BENCH_SIZES`` (comma list of WxH),
    ``BENCH_IMAGES`` (images per run), ``BENCH_REPEATS`` (runs per figure)."""
    sizes = [parse_input_size(text) for text in os.environ.get("BENCH_SIZES", "1280x960,640x640").split(",")]
    count, repeats = env_int("BENCH_IMAGES", 24, 2, 10_000), env_int("BENCH_REPEATS", 3, 1, 100)
    images = _images(count)
    OUT.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    tables = [f"machine: {machine['cpu']}, {machine['cores']} cores; {json.dumps(machine['versions'])}", ""]
    for width, height in sizes:
        rows, alone = bench_size(width, height, images, repeats)
        size = f"{width}x{height}"
        (OUT / f"bench-{size}.json").write_text(json.dumps(
            {"size": size, "machine": machine, "images": count, "repeats": repeats,
             "rows": [asdict(r) for r in rows], "transport_alone": [asdict(r) for r in alone]}, indent=2))
        size_tables = [_table(size, rows), transport_table(size, alone)]
        if pytorch.status()[0]:
            import torch

            detector_rows = measure_gpu_detector(width, height, list(GPU_BATCHES), variants=("eager", "compiled"))
            size_tables.append(gpu_table(detector_rows, torch.cuda.get_device_name(0)))
        tables += [part for table in size_tables for part in (table, "")]
        print("\n\n".join(size_tables), flush=True)
    (OUT / "bench.md").write_text("\n".join(tables))
    print(f"wrote {OUT / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
