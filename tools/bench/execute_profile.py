"""Where one request's time goes inside the torch detector's ``execute``, in-process on the GPU.

The torch build in the model repository (``make engine BACKEND=torch``) loaded and captured as the
server captures it (its AOTInductor packages, or with ``TORCH_COMPILE=0`` its program run eagerly;
the trim layout and the GPU postprocess; one CUDA graph per bucket), then driven the way ``model_torch.py`` drives it for a request whose images
are already on the GPU (CUDA shared memory), phase by phase, on letterboxed real face images:

- ``options``: the request's options and letterbox rows read and checked (the numpy postprocess's
  own checks);
- ``fill``: the images copied into the graph's input (queued);
- ``parameters``: each image's options written to page-locked memory;
- ``replay``: the graph launched;
- ``wait``: the host waiting for the GPU (what the graph costs beyond the launch);
- ``outputs``: the faces read from page-locked memory into the output arrays.

Beside it, on the GPU clock (CUDA events): the same graph's replay, and the network alone (its
packages captured without the postprocess), so the postprocess's share is their difference; and
the postprocess alone on the same candidates, its kernels captured as served beside the same
module under ``torch.compile`` (fused kernels: what compiling it with the network would save, and
whether the bits stay the same). A crowd (an image with more candidates than the graph's postprocess holds) adds the numpy
postprocess on its copied-out candidates: timed on the crowd photo when it is present. Then
``torch.profiler``'s table of the GPU kernels of the batch-1 replays (``PROFILE_TRACE``: also a
Chrome trace there). The parts of ``execute`` Triton's Python backend owns (reading the request,
building the response tensors) are not here: Triton's per-model statistics and trace show them
(``gpu_figures.sh trace``).

``python -m tools.bench.execute_profile`` (``BENCH_BATCHES``, default ``1,16``; ``BENCH_REPEATS``,
default 300).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from rtface_client.letterbox import letterbox

from tools.bench.gpu_detector import _frames
from tools.engine.backends import pytorch
from tools.engine.configs import postprocess_parameters
from tools.engine.plan import Plan
from tools.engine.record import COMPILED
from tools.engine.repository import DETECTOR, artifact_name
from tools.sample_images import selfie
from tools.settings import BuildSettings, env_int, env_text

__all__ = ["PHASES", "main"]

PHASES = ("options", "fill", "parameters", "replay", "wait", "outputs")
REQUEST = json.dumps({"score_threshold": 0.5, "iou_threshold": 0.4})


class Detector:
    """The build's packages as the server serves them: graphs of network + postprocess, and of the
    network alone, each per bucket; the numpy postprocess with the build's parameters."""

    def __init__(self, plan: Plan):
        import torch

        buckets = list(plan.buckets)
        version_dir = plan.settings.repository / DETECTOR / "1"
        self.width, self.height = plan.settings.input_width, plan.settings.input_height
        params = {key: str(value) for key, value in postprocess_parameters(plan).items()}
        pytorch.server_module("gpu_options", version_dir).choose_cudnn_algorithms(plan.settings.cudnn_algorithms)
        self.trim = pytorch.server_module("trim_layout", version_dir)
        if plan.settings.torch_compile == "0":  # the network run eagerly into the graphs, as the server does
            self.network_kind = "the graph program run eagerly (TORCH_COMPILE=0)"
            layout = self.trim.TrimLayout(pytorch.program_module(version_dir / artifact_name("torch")), plan.chunks)
            packages = {batch: layout for batch in buckets}
        else:
            self.network_kind = "the AOTInductor packages of make engine"
            metadata, version_dir = pytorch.servable_build(plan.settings.repository, buckets)
            torch.compile(lambda x: x * 2)(torch.ones(2, device="cuda"))  # see capture_cost.py: before loading
            packages = pytorch.load_packages(metadata[COMPILED], version_dir, buckets)
        shared = pytorch.server_module("shared_postprocess", version_dir.parent.parent)
        self.gpu = pytorch.server_module("gpu_detections", version_dir)
        self.post = shared.Postprocess(params)
        replay = pytorch.server_module("graph_replay", version_dir).GraphReplay
        device = torch.device("cuda")
        self.detections = self.gpu.GpuDetections(self.width, self.height).to(device)
        finished = {batch: self.gpu.Finished(package, self.detections) for batch, package in packages.items()}
        shape = (self.height, self.width, 3)
        self.replay_class, self.shape = replay, shape
        self.served = replay(finished, shape, buckets, device, per_image=[(len(self.gpu.PARAMETERS),)], to_host=[1])
        self.network = replay(packages, shape, buckets, device)
        self.stream = torch.cuda.current_stream()

    def request(self, images, placement, clock):
        """One request of ``images`` (uint8 on the GPU) as ``model_torch.py`` serves it; each
        phase's seconds added to ``clock``; the faces' outputs."""
        mark = time.perf_counter()

        def lap(phase):
            nonlocal mark
            now = time.perf_counter()
            clock[phase].append(now - mark)
            mark = now

        options = self.post.options(REQUEST)
        rows = self.post.placement(placement, len(images))
        lap("options")
        total = self.served.fill([images])
        lap("fill")
        (parameters,) = self.served.host_inputs(total)
        self.gpu.write_parameters(parameters, options, rows)
        lap("parameters")
        by_position, _ = self.served.replay(total)
        lap("replay")
        self.stream.synchronize()
        lap("wait")
        (packed,) = self.served.host_outputs(total)
        found = [self.gpu.unpack(row) for row in packed]
        outputs = self.gpu.faces_outputs(found) if not any(f.unsettled for f in found) else None
        lap("outputs")
        return outputs, by_position, rows, options

    def gpu_ms(self, replay, images, repeats):
        """Median GPU milliseconds of ``replay``'s graph for ``images`` (CUDA events around it)."""
        import torch

        total = replay.fill([images])
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay.replay(total)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def phase_table(detector: Detector, frames, placement, batches: list[int], repeats: int) -> str:
    """Median milliseconds of each phase per request at each batch size, and the GPU's own."""
    lines = ["| batch | " + " | ".join(PHASES) + " | sum of medians | GPU: network + postprocess graph "
             "| GPU: network alone | postprocess share |", "|---" * (len(PHASES) + 5) + "|"]
    for batch in batches:
        images, rows = frames[:batch], placement[:batch]
        clock = {phase: [] for phase in PHASES}
        for _ in range(10):
            detector.request(images, rows, {phase: [] for phase in PHASES})
        for _ in range(repeats):
            detector.request(images, rows, clock)
        ms = {phase: statistics.median(clock[phase]) * 1e3 for phase in PHASES}
        served = detector.gpu_ms(detector.served, images, repeats)
        network = detector.gpu_ms(detector.network, images, repeats)
        lines.append(f"| {batch} | " + " | ".join(f"{ms[p]:.3f}" for p in PHASES)
                     + f" | {sum(ms.values()):.3f} | {served:.3f} | {network:.3f} | {served - network:.3f} |")
    return "\n".join(lines)


def postprocess_table(detector: Detector, frames, batches: list[int], repeats: int) -> str:
    """The GPU postprocess alone, captured as the detector captures it, on the network's real
    candidates for ``frames``: run eagerly into the graph (what the detector serves) beside the same
    module under ``torch.compile`` (fewer, fused kernels; Inductor may round differently):
    GPU milliseconds per replay and whether the two give the same bits."""
    import torch

    compiled = torch.compile(detector.detections, dynamic=False)
    lines = ["| batch | eager kernels, GPU ms | torch.compile, GPU ms | ratio | same bits |", "|---|---|---|---|---|"]
    count = len(detector.gpu.PARAMETERS)
    for batch in batches:
        (by_position,) = detector.network.run([frames[:batch]])
        by_position = by_position.clone()
        parameters = np.tile(np.array([0.5, 0.4, 3000, 1.0, 0.0, 0.0], dtype=np.float32), (batch, 1))
        ms, packed = [], []
        for module in (detector.detections, compiled):
            replay = detector.replay_class(lambda images, values, run=module: run(by_position[:len(images)], values),
                                           detector.shape, [batch], torch.device("cuda"), per_image=[(count,)],
                                           to_host=[0])
            replay.host_inputs(batch)[0][...] = parameters
            ms.append(detector.gpu_ms(replay, frames[:batch], repeats))
            torch.cuda.synchronize()
            packed.append(replay.host_outputs(batch)[0].copy())
            del replay
        difference = np.abs(packed[0] - packed[1]).max()
        same = "yes" if np.array_equal(packed[0], packed[1]) else f"no (largest difference {difference:g})"
        lines.append(f"| {batch} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f} | {same} |")
    return "\n".join(lines)


def crowd_row(detector: Detector, repeats: int) -> str:
    """The numpy postprocess a crowd gets in the detector's process, on the crowd photo."""
    import torch

    crowd = selfie()
    if crowd is None:
        return "No crowd row: the crowd photo is not here (RTFACE_SELFIE_DIR)."
    frame, placement = letterbox(crowd, detector.width, detector.height)
    image = torch.from_numpy(frame[None]).cuda()
    rows = np.asarray([placement.as_row()], dtype=np.float32)
    clock = {phase: [] for phase in PHASES}
    times = []
    for _ in range(repeats):
        outputs, by_position, checked, options = detector.request(image, rows, clock)
        begin = time.perf_counter()
        faces = detector.post.detect(detector.trim.chunk_major(by_position).cpu().numpy(), checked, options)
        times.append(time.perf_counter() - begin)
    flagged = "flagged for the numpy postprocess" if outputs is None else "served by the graph"
    return (f"Crowd photo ({int(faces['num_detections'][0, 0])} faces, {flagged}): request "
            f"{sum(statistics.median(v) for v in clock.values()) * 1e3:.3f} ms, then the numpy postprocess "
            f"on its candidates copied out {statistics.median(times) * 1e3:.3f} ms (median of {repeats}).")


def kernel_table(detector: Detector, frames, placement, requests: int = 50) -> str:
    """``torch.profiler``'s GPU kernels of ``requests`` batch-1 requests, by self device time."""
    from torch.profiler import ProfilerActivity, profile

    images, rows = frames[:1], placement[:1]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(requests):
            detector.request(images, rows, {phase: [] for phase in PHASES})
    trace = os.environ.get("PROFILE_TRACE")
    if trace:
        prof.export_chrome_trace(trace)
    return (f"torch.profiler, {requests} batch-1 requests (times are totals over them):\n\n```\n"
            + prof.key_averages().table(sort_by="self_device_time_total", row_limit=30) + "\n```")


def main() -> int:
    """Entry point: the phase table, the crowd row and the kernel table of the build in the model
    repository."""
    available, why = pytorch.status()
    if not available:
        print(f"execute profile: skipped: {why}")
        return 0
    import torch

    batches = [int(b) for b in env_text("BENCH_BATCHES", "1,16").split(",")]
    repeats = env_int("BENCH_REPEATS", 300, 1, 100_000)
    with torch.inference_mode():  # as the detector's execute runs
        try:
            detector = Detector(Plan.resolve(BuildSettings(), "torch"))
        except LookupError as exc:
            raise SystemExit(f"execute profile: {exc}") from None
        frames = _frames(detector.width, detector.height, max(batches))
        placement = np.tile(np.array([1.0, 0.0, 0.0], dtype=np.float32), (len(frames), 1))
        gpu_frames = torch.from_numpy(frames).cuda()
        print(f"One request through the torch detector's graph, in-process ({torch.cuda.get_device_name(0)}; "
              f"network: {detector.network_kind}), median ms of {repeats} requests per phase; "
              "images already on the GPU:\n")
        print(phase_table(detector, gpu_frames, placement, batches, repeats))
        print("\nThe GPU postprocess alone, eager kernels (served) beside torch.compile, on the same candidates:\n")
        print(postprocess_table(detector, gpu_frames, batches, repeats))
        print("\n" + crowd_row(detector, min(repeats, 50)) + "\n")
        print(kernel_table(detector, gpu_frames, placement))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
