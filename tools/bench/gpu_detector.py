"""The torch detector alone, in-process on the GPU: images/s of CUDA-graph replays per batch size.

What the served GPU path can reach at best: the rewritten graph as the graph program that
``make engine BACKEND=torch`` writes, run by the model repository's own runner
(``graph_program.GraphReplay``), on letterboxed real face images already on the GPU. Variants
side by side in one run: float16 network (the default build) and float32 in eager mode, and float16 under
``torch.compile`` with cuDNN's depthwise convolutions and with them written as fused taps (what
the served detector runs). Part of ``make bench`` when PyTorch sees a GPU; alone:
``python -m tools.bench.gpu_detector`` (``BENCH_BATCHES``, ``BENCH_SIZES``, ``BENCH_REPEATS``,
``BENCH_COMPILE=0`` to skip the compiled variants).
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
from tools.engine.torch_backend import load_runner_module, program_from_onnx, torch_status
from tools.sample_images import astronaut, face_canvas, selfie
from tools.settings import MODEL_REPOSITORY, BuildSettings, env_int, env_text, parse_input_size

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


def measure_gpu_detector(width: int, height: int, batches: list[int], repeats: int = 50,
                         compiled: bool = True) -> list[GpuRow]:
    """Rows for every variant and batch size at engine size ``width`` x ``height`` (the default
    build's TOPK at that size)."""
    import torch

    topk = BuildSettings(input_width=width, input_height=height).topk
    model, _ = rewrite(load_source_model(None).load(), width, height, topk)
    runner = load_runner_module(MODEL_REPOSITORY / repository.DETECTOR / "1")
    frames = torch.from_numpy(_frames(width, height, max(batches))).cuda()
    rows = []
    variants = [("fp16", True, False, False), ("fp32", False, False, False)]
    if compiled:
        variants += [("fp16 compiled, cuDNN depthwise", True, True, False),
                     ("fp16 compiled (served default)", True, True, True)]
    torch.backends.cudnn.benchmark = True
    for name, half, compile_it, taps in variants:
        program = program_from_onnx(model, half=half)
        start = time.perf_counter()
        module = runner.GraphProgram(program, device="cuda", depthwise_taps=taps)
        if compile_it:
            module = torch.compile(module, dynamic=False)
        replay = runner.GraphReplay(module, height, width, batches, torch.device("cuda"))
        setup = time.perf_counter() - start
        for batch in batches:
            part = frames[:batch]
            for _ in range(5):
                replay.run([part])
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                replay.run([part])
                torch.cuda.synchronize()
                times.append(time.perf_counter() - begin)
            ms = statistics.median(times) * 1e3
            rows.append(GpuRow(name, batch, ms, batch / ms * 1e3, setup))
        del replay, module
        torch.cuda.empty_cache()
    return rows


def gpu_table(rows: list[GpuRow], card: str) -> str:
    """Markdown table of ``rows`` for ``card``."""
    lines = [f"GPU detector alone ({card}), median of replays, input already on the GPU:", "",
             "| variant | batch | ms per batch | images/s | setup s (capture, compile) |", "|---|---|---|---|---|"]
    lines += [f"| {r.variant} | {r.batch} | {r.ms:.2f} | {r.images_per_s:,.0f} | {r.setup_s:.1f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    """Entry point for ``python -m tools.bench.gpu_detector``."""
    available, why = torch_status()
    if not available:
        print(f"gpu detector bench: skipped: {why}")
        return 0
    import torch

    batches = [int(b) for b in env_text("BENCH_BATCHES", "1,8,16,32,64").split(",")]
    for size in env_text("BENCH_SIZES", "1280x960").split(","):
        width, height = parse_input_size(size)
        rows = measure_gpu_detector(width, height, batches, env_int("BENCH_REPEATS", 50, 1, 10_000),
                                    compiled=env_text("BENCH_COMPILE", "1") == "1")
        print(f"\n{width}x{height}")
        print(gpu_table(rows, torch.cuda.get_device_name(0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
