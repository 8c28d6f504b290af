"""The torch detector alone, in-process on the GPU: images/s of CUDA-graph replays per batch size.

What the served GPU path can reach at best: the rewritten graph as the graph program that
``make engine BACKEND=torch`` writes, run by the model repository's own runner
(``graph_replay.GraphReplay``), on letterboxed real face images already on the GPU. Variants
side by side in one run (``BENCH_VARIANTS``, default all): ``eager``, the float16 network (the
default build) and float32; ``compiled``, float16 under ``torch.compile`` with cuDNN's depthwise
convolutions and with them written as fused taps; ``served``, what the torch build in the model
repository serves (fused taps and the trim layout) compiled at load (``TORCH_COMPILE=load``) and
its AOTInductor packages from ``make engine`` (``TORCH_COMPILE=engine``), with the build's cuDNN
choice or ``CUDNN_ALGORITHMS``. Part of ``make bench`` (eager and compiled) when PyTorch sees a
GPU; alone: ``python -m tools.bench.gpu_detector`` (``BENCH_BATCHES``, ``BENCH_SIZES``,
``BENCH_REPEATS``, ``BENCH_VARIANTS``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
from rtface_client.letterbox import letterbox

from tools.engine import repository
from tools.engine.source import load_source_model
from tools.engine.surgery import rewrite
from tools.engine.backends import pytorch
from tools.engine.backends.pytorch import program_from_onnx, server_module
from tools.sample_images import astronaut, face_canvas, selfie
from tools.settings import MODEL_REPOSITORY, BuildSettings, env_int, env_text, parse_input_size, topk_plan

__all__ = ["GpuRow", "measure_gpu_detector", "gpu_table", "main"]


@dataclass(frozen=True)
class GpuRow:
    """One variant at one batch size: median milliseconds per replay and images/s."""

    variant: str
    batch: int
    ms: float
    images_per_s: float
    setup_s: float


def _frames(width: int, height: int, count: int) -> np.ndarray:
    images = [astronaut()] + [face_canvas(seed, 1600, 1200, count=8).image for seed in range(3)]
    crowd = selfie()
    if crowd is not None:
        images.append(crowd)
    boxed = [letterbox(image, width, height)[0] for image in images]
    return np.stack([boxed[i % len(boxed)] for i in range(count)])


VARIANTS = ("eager", "compiled", "served")


def _timed(variant: str, replay, frames, batches: list[int], repeats: int, setup: float) -> list[GpuRow]:
    """Median milliseconds per replay of ``replay`` at each batch size."""
    import torch

    rows = []
    for batch in batches:
        parts = [frames[:batch]]
        for _ in range(5):
            replay.run(parts)
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            replay.run(parts)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - begin)
        ms = statistics.median(times) * 1e3
        rows.append(GpuRow(variant, batch, ms, batch / ms * 1e3, setup))
    return rows


def _served_rows(width: int, height: int, frames, batches: list[int], repeats: int) -> list[GpuRow]:
    """What the torch build in the model repository serves (``make engine BACKEND=torch``, the
    default ``TORCH_COMPILE=engine``): its program in the trim layout with fused depthwise taps,
    compiled at load by ``torch.compile`` (``TORCH_COMPILE=load``) and its AOTInductor packages
    (``TORCH_COMPILE=engine``), each captured as the server captures it. Setup is the capture (and
    the compile, at load), not ``make engine``'s compile. cuDNN picks as the build says
    (``cudnn_algorithms``), or as ``CUDNN_ALGORITHMS`` says, when this variant runs alone
    (``BENCH_VARIANTS=served``); after other variants, it keeps what it picked for them."""
    import torch

    from tools.engine.record import COMPILED

    try:
        metadata, version_dir = pytorch.servable_build(MODEL_REPOSITORY, batches)
    except LookupError as exc:
        raise SystemExit(f"BENCH_VARIANTS=served measures the torch build in the model repository: {exc}") from None
    if metadata.get("input_size") != f"{width}x{height}":
        raise SystemExit(f"BENCH_VARIANTS=served: the build is {metadata.get('input_size')}, not {width}x{height}: "
                         f"run make engine BACKEND=torch INPUT_SIZE={width}x{height} first")
    chunks = topk_plan(metadata["topk"])[0]
    GraphReplay = server_module("graph_replay", version_dir).GraphReplay
    cudnn = env_text("CUDNN_ALGORITHMS", metadata.get("cudnn_algorithms", "benchmark"))  # builds before it: benchmark
    server_module("gpu_options", version_dir).choose_cudnn_algorithms(cudnn)
    start = time.perf_counter()
    program = torch.load(version_dir / repository.artifact_name("torch"), map_location="cpu", weights_only=True)
    detector = server_module("graph_program", version_dir).GraphProgram(program, device="cuda", depthwise_taps=True)
    layout = server_module("trim_layout", version_dir).TrimLayout(detector, chunks)
    replay = GraphReplay(torch.compile(layout, dynamic=False), (height, width, 3), batches,
                         torch.device("cuda"))
    rows = _timed(f"served, compiled at load (TORCH_COMPILE=load), cuDNN {cudnn}", replay, frames, batches,
                  repeats, time.perf_counter() - start)
    del replay, layout
    start = time.perf_counter()
    packages = pytorch.load_packages(metadata[COMPILED], version_dir, batches)
    replay = GraphReplay(packages, (height, width, 3), batches, torch.device("cuda"))
    rows += _timed(f"served, compiled at make engine (TORCH_COMPILE=engine), cuDNN {cudnn}", replay, frames, batches,
                   repeats, time.perf_counter() - start)
    del replay, packages
    torch.cuda.empty_cache()
    return rows


def measure_gpu_detector(width: int, height: int, batches: list[int], repeats: int = 50,
                         variants: tuple[str, ...] = VARIANTS) -> list[GpuRow]:
    """Rows for the ``variants`` (of :data:`VARIANTS`) at each batch size at engine size ``width``
    x ``height`` (the default build's TOPK at that size): ``eager`` float16 and float32 programs,
    ``compiled`` float16 with cuDNN's depthwise convolutions and with fused taps, ``served``
    what the torch build in the model repository serves, compiled at load and at ``make engine``."""
    import torch

    GraphProgram = server_module("graph_program").GraphProgram
    GraphReplay = server_module("graph_replay").GraphReplay
    frames = torch.from_numpy(_frames(width, height, max(batches))).cuda()
    rows = []
    programs = [("fp16", True, False, False), ("fp32", False, False, False)] if "eager" in variants else []
    if "compiled" in variants:
        programs += [("fp16 compiled, cuDNN depthwise", True, True, False),
                     ("fp16 compiled, fused depthwise taps", True, True, True)]
    torch.backends.cudnn.benchmark = True
    if programs:
        topk = BuildSettings(input_width=width, input_height=height).topk
        model, _ = rewrite(load_source_model().load(), width, height, topk)
    for name, half, compile_it, taps in programs:
        program = program_from_onnx(model, half=half)
        start = time.perf_counter()
        module = GraphProgram(program, device="cuda", depthwise_taps=taps)
        if compile_it:
            module = torch.compile(module, dynamic=False)
        replay = GraphReplay(module, (height, width, 3), batches, torch.device("cuda"))
        rows += _timed(name, replay, frames, batches, repeats, time.perf_counter() - start)
        del replay, module
        torch.cuda.empty_cache()
    if "served" in variants:
        rows += _served_rows(width, height, frames, batches, repeats)
    return rows


def gpu_table(rows: list[GpuRow], card: str) -> str:
    """Markdown table of ``rows`` for ``card``."""
    lines = [f"GPU detector alone ({card}), median of replays, input already on the GPU:", "",
             "| variant | batch | ms per batch | images/s | setup s (capture, compile) |", "|---|---|---|---|---|"]
    lines += [f"| {r.variant} | {r.batch} | {r.ms:.2f} | {r.images_per_s:,.0f} | {r.setup_s:.1f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    """Entry point for ``python -m tools.bench.gpu_detector``."""
    available, why = pytorch.status()
    if not available:
        print(f"gpu detector bench: skipped: {why}")
        return 0
    import torch

    batches = [int(b) for b in env_text("BENCH_BATCHES", "1,8,16,32,64").split(",")]
    for size in env_text("BENCH_SIZES", "1280x960").split(","):
        width, height = parse_input_size(size)
        variants = tuple(env_text("BENCH_VARIANTS", ",".join(VARIANTS)).split(","))
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"BENCH_VARIANTS: unknown {', '.join(sorted(unknown))}; use some of {', '.join(VARIANTS)}")
        rows = measure_gpu_detector(width, height, batches, env_int("BENCH_REPEATS", 50, 1, 10_000), variants)
        print(f"\n{width}x{height}")
        print(gpu_table(rows, torch.cuda.get_device_name(0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
