"""What a torch detector instance spends on its CUDA graphs for each way cuDNN may choose its
convolution algorithms (the detector's ``cudnn_algorithms``: ``benchmark``, ``benchmark:N``,
``heuristics``, ``heuristics_b``): the AOTInductor packages of the torch build in the model
repository (``make engine BACKEND=torch``) loaded and captured as the server does, once per
setting, each in a new process (cuDNN keeps its choices for the life of a process); then the
median milliseconds per replay at each bucket on letterboxed real face images.

``python -m tools.bench.capture_cost`` (``BENCH_CUDNN``: the settings, in order, default
``benchmark heuristics_b``; a setting may repeat, to show how much a benchmark's choices vary
between processes; ``BENCH_REPEATS``, default 200 replays per bucket).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tools.bench.gpu_detector import _frames, _timed
from tools.engine.backends import pytorch
from tools.engine.plan import Plan
from tools.engine.record import COMPILED
from tools.settings import BuildSettings, env_int, env_text

__all__ = ["measure", "main"]


def measure(cudnn: str, repeats: int) -> dict:
    """Seconds to load and to capture the build's packages with the detector's ``cudnn_algorithms``
    ``cudnn`` (each bucket's warm-up and capture too), and the median milliseconds per replay at
    each bucket, in this process."""
    import torch

    settings = BuildSettings()
    buckets = list(Plan.resolve(settings, "torch").buckets)
    try:
        metadata, version_dir = pytorch.servable_build(settings.repository, buckets)
    except LookupError as exc:
        raise SystemExit(f"capture cost: {exc}") from None
    width, height = (int(side) for side in metadata["input_size"].split("x"))
    # With torch 2.11, loading a package in a process where Inductor has never run
    # crashed with a segmentation fault; one small compiled function first avoids it. The build
    # and Triton's stub load them without this.
    torch.compile(lambda x: x * 2)(torch.ones(2, device="cuda"))
    pytorch.server_module("gpu_options", version_dir).choose_cudnn_algorithms(cudnn)
    start = time.perf_counter()
    packages = pytorch.load_packages(metadata[COMPILED], version_dir, buckets)
    loaded = time.perf_counter()
    replay = pytorch.server_module("graph_replay", version_dir).GraphReplay(
        packages, (height, width, 3), buckets, torch.device("cuda"))
    captured = time.perf_counter()
    frames = torch.from_numpy(_frames(width, height, max(buckets))).cuda()
    rows = _timed("packages", replay, frames, buckets, repeats, captured - loaded)
    ms = {row.batch: row.ms for row in rows}
    return {"setting": cudnn, "load_s": loaded - start, "capture_s": captured - loaded,
            "bucket_s": replay.seconds, "ms": ms, "card": torch.cuda.get_device_name(0)}


def table(results: list[dict]) -> str:
    """Markdown table of :func:`measure`'s results, one column per setting, with each bucket's
    images/s against the first setting's."""
    first = results[0]
    head = " | ".join(f"`{r['setting']}`" for r in results)
    lines = [f"Capture and replay of the build's packages ({first['card']}), one process per setting; "
             f"ratios: images/s against `{first['setting']}`:", "",
             f"| | {head} |", "|---|" + "---:|" * len(results),
             "| packages loaded | " + " | ".join(f"{r['load_s']:.2f} s" for r in results) + " |",
             "| CUDA graphs captured | " + " | ".join(f"{r['capture_s']:.2f} s" for r in results) + " |"]
    for batch in first["ms"]:
        lines.append(f"| batch {batch}: warm-up and capture | "
                     + " | ".join(f"{r['bucket_s'][batch]:.2f} s" for r in results) + " |")
    for batch in first["ms"]:
        cells = [f"{r['ms'][batch]:.3f} ms ({first['ms'][batch] / r['ms'][batch]:.3f})" for r in results]
        lines.append(f"| batch {batch}: per replay (ratio) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    """Entry point: one child process per setting, then the table."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], env_int("BENCH_REPEATS", 200, 1, 100_000))))
        return 0
    available, why = pytorch.status()
    if not available:
        print(f"capture cost: skipped: {why}")
        return 0
    results = []
    for setting in env_text("BENCH_CUDNN", "benchmark heuristics_b").split():
        child = subprocess.run([sys.executable, "-m", "tools.bench.capture_cost", "--child", setting],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"capture cost, cuDNN {setting}: the child failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
