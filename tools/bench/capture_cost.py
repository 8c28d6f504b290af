"""What a torch detector instance spends on its CUDA graphs, with cuDNN's benchmark on (what the
server does) and off: the AOTInductor packages of the torch build in the model repository
(``make engine BACKEND=torch``) loaded and captured as the server does, once per setting, each in
a new process (cuDNN keeps what it benchmarked for the life of a process); then the median
milliseconds per replay at each bucket on letterboxed real face images.

``python -m tools.bench.capture_cost`` (``BENCH_REPEATS``, default 200 replays per bucket).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tools.bench.gpu_detector import _frames, _timed
from tools.engine import repository
from tools.engine.torch_backend import COMPILED, load_packages, load_runner_module, packages_refusal, torch_status
from tools.settings import BuildSettings, env_int

__all__ = ["measure", "main"]

SETTINGS = ("on", "off")


def measure(benchmark: bool, repeats: int) -> dict:
    """Seconds to load and to capture the build's packages with cuDNN's benchmark ``benchmark``,
    and the median milliseconds per replay at each bucket, in this process."""
    import torch

    settings = BuildSettings()
    metadata = repository.read_metadata(settings) or {}
    version_dir = settings.repository / repository.DETECTOR / "1"
    buckets = repository.cuda_graph_batches(settings)
    why = packages_refusal(metadata.get(COMPILED), version_dir, buckets)
    if metadata.get("backend") != "torch" or why:
        raise SystemExit(f"capture cost: needs the default torch build in {settings.repository} "
                         f"(make engine BACKEND=torch){': ' + why if why else ''}")
    width, height = (int(side) for side in metadata["input_size"].split("x"))
    # On the H200 (torch 2.11), loading a package in a process where Inductor has never run
    # crashed with a segmentation fault; one small compiled function first avoids it. The build
    # and Triton's stub load them without this.
    torch.compile(lambda x: x * 2)(torch.ones(2, device="cuda"))
    torch.backends.cudnn.benchmark = benchmark
    runner = load_runner_module(version_dir)
    start = time.perf_counter()
    packages = load_packages(runner, metadata[COMPILED], version_dir, buckets)
    loaded = time.perf_counter()
    replay = runner.GraphReplay(packages, height, width, buckets, torch.device("cuda"), per_image_inputs=[torch.float32])
    captured = time.perf_counter()
    frames = torch.from_numpy(_frames(width, height, max(buckets))).cuda()
    thresholds = torch.zeros(max(buckets), device="cuda")
    rows = _timed("packages", replay, frames, buckets, repeats, captured - loaded, thresholds)
    ms = {row.batch: row.ms for row in rows}
    return {"load_s": loaded - start, "capture_s": captured - loaded, "ms": ms,
            "card": torch.cuda.get_device_name(0)}


def table(results: dict[str, dict]) -> str:
    """Markdown table of :func:`measure`'s results per setting, with the off/on ratio of images/s."""
    on, off = results["on"], results["off"]
    lines = [f"Capture and replay of the build's packages ({on['card']}), cuDNN benchmark on and off:", "",
             "| | benchmark on (served) | benchmark off | images/s off / on |", "|---|---:|---:|---:|",
             f"| packages loaded | {on['load_s']:.2f} s | {off['load_s']:.2f} s | |",
             f"| CUDA graphs captured | {on['capture_s']:.2f} s | {off['capture_s']:.2f} s | |"]
    for batch in on["ms"]:
        a, b = on["ms"][batch], off["ms"][batch]
        lines.append(f"| batch {batch}: ms per replay (images/s) | {a:.3f} ({int(batch) / a * 1e3:,.0f}) | "
                     f"{b:.3f} ({int(batch) / b * 1e3:,.0f}) | {a / b:.3f} |")
    return "\n".join(lines)


def main() -> int:
    """Entry point: one child process per setting, then the table."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2] == "on", env_int("BENCH_REPEATS", 200, 1, 100_000))))
        return 0
    available, why = torch_status()
    if not available:
        print(f"capture cost: skipped: {why}")
        return 0
    results = {}
    for setting in SETTINGS:
        child = subprocess.run([sys.executable, "-m", "tools.bench.capture_cost", "--child", setting],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"capture cost, cuDNN benchmark {setting}: the child failed:\n{child.stderr[-3000:]}")
        results[setting] = json.loads(child.stdout.strip().splitlines()[-1])
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
