"""Triton Python model: RetinaFace on a GPU with PyTorch (BACKEND=torch), images in, faces out.

The torch build serves each request in this one step: the network, then the postprocess that the
other builds run as a second, numpy step (``retinaface_postprocess``): score threshold, greedy
NMS, the ``max_detections`` cap, the letterbox undone. ``model.pt`` beside this file is the graph
program written by ``make engine BACKEND=torch``; ``graph_program.py`` runs it (float16 network,
float32 decode and top-K) and ``gpu_detections.py`` the postprocess behind it, in the same
captured CUDA graph, one per batch bucket (config parameter ``batch_buckets``). A request costs
one graph replay and one wait: the graph reads each image's options and letterbox row from
page-locked host memory and writes its faces there. An image with more candidates above its
threshold than that graph's postprocess holds (a crowd), or whose NMS has not settled, gets the
numpy postprocess on its candidates copied out (``shared_postprocess.py`` at the repository's
top, which the ``retinaface_postprocess`` step runs: the same results, bit for bit). What the graph captures depends on the parameter ``torch_compile``:

- ``engine``: the AOTInductor packages ``make engine`` compiled, ``model.b<batch>.pt2``, one per
  bucket, if ``build.json`` says they were compiled for this torch, CUDA and GPU
  (``compiled_packages.py``); otherwise a warning in the server log says why, and ``load`` follows;
- ``load``: the program under ``torch.compile``, compiled here, in every instance (slow start);
- ``0``: the program run eagerly (fast start, slow replays).

Before the capture, cuDNN is told how to pick each convolution's algorithm (config parameter
``cudnn_algorithms``, :func:`graph_program.choose_cudnn_algorithms`). The server log gets one
line per instance with the time of each loading step. The instance's threads sleep while they
wait for the GPU (config parameter ``cuda_waits``, default ``block``; ``spin`` keeps a core busy).

Inputs: ``images`` (uint8 NHWC, letterboxed) with ``letterbox`` rows, as the ensemble
``retinaface`` sends them; images sent through CUDA shared memory arrive on the GPU
(``FORCE_CPU_ONLY_INPUT_TENSORS: "no"``) and are read through DLPack, the others are copied up
once. Where it decodes (``PREPROCESS=detector``), the optional input ``image`` (BYTES, one JPEG
or PNG per batch row) from ``retinaface_encoded``: decoded by ``GpuDecoder`` of the preprocess
model's ``model_torch.py`` (loaded by path: header checks, nvJPEG in one batch, OpenCV for the
rest) and letterboxed straight into the graph's input rows; the outputs then add
``image_size``. Triton batches only requests with the same inputs, so an ``execute`` call holds
pixels or encoded images, never both. Requests with a bad option, letterbox row or image get
INVALID_ARGUMENT naming it; the others batched with them are served.

Imports torch and numpy; where it decodes, the preprocess's decoder adds torchvision and OpenCV. No
project code.
"""

import json
import os
import sys
import time
from dataclasses import dataclass

# torch.compile's worker pool starts sys.executable, which in Triton's stub is the stub binary,
# not Python: compile in this process instead.
if not os.path.basename(sys.executable).startswith("python"):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

IMPORTING = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
IMPORT_S = time.perf_counter() - IMPORTING
import triton_python_backend_utils as pb_utils  # noqa: E402
import compiled_packages  # noqa: E402
import gpu_detections as gpu  # noqa: E402
from gpu_options import choose_cudnn_algorithms, wait_for_gpu  # noqa: E402
from graph_program import GraphProgram  # noqa: E402
from graph_replay import GraphReplay  # noqa: E402
from trim_layout import TrimLayout, chunk_major  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.join(HERE, os.pardir, os.pardir)
sys.dont_write_bytecode = True  # no __pycache__ beside the models: Triton would take it for one
sys.path.append(REPOSITORY)  # shared_*.py: the numpy postprocess (options, checks, what the GPU hands back)
from shared_backend import config_parameters, failed, invalid_argument  # noqa: E402
from shared_postprocess import Postprocess, RequestError  # noqa: E402


def gpu_decoder_class():
    """The preprocess's :class:`GpuDecoder`, for a detector that decodes encoded images itself.

    The one import from another model's folder: the detector runs the preprocess's GPU decoding
    (``retinaface_preprocess/1/gpu_decoding.py`` and its ``decoding.py``) in its own process."""
    sys.path.append(os.path.join(REPOSITORY, "retinaface_preprocess", "1"))
    from gpu_decoding import GpuDecoder

    return GpuDecoder


class Steps:
    """How long each step of an instance's loading took, for one line in the server log."""

    def __init__(self, name):
        self.name, self.compiling, self.parts = name, False, [f"torch imported {IMPORT_S:.1f} s"]
        self.last = time.perf_counter()

    def done(self, what):
        now = time.perf_counter()
        self.parts.append(f"{what} {now - self.last:.1f} s")
        self.last = now

    def log(self, total):
        pb_utils.Logger.log_info(f"{self.name}: loaded in {total:.1f} s after the import: " + "; ".join(self.parts))


@dataclass
class Request:
    """One accepted request of an ``execute`` call: its index there, its images' count, their
    letterbox rows, its options, and (encoded) its images' decoded sizes."""

    index: int
    count: int
    placement: np.ndarray
    options: dict
    sizes: np.ndarray | None = None


class TritonPythonModel:
    """uint8 ``images [N, H, W, 3]`` (CPU or GPU) and ``letterbox [N, 3]``, or, where it decodes,
    ``image`` BYTES [N, 1] -> ``num_detections``, ``boxes``, ``scores``, ``landmarks``, ``capped``
    (and ``image_size`` for encoded images), in original pixels."""

    def initialize(self, args):
        started = time.perf_counter()
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(self.device)
        waits = params.get("cuda_waits", "")  # absent: CUDA's own choice (spin, on a host of many cores)
        if waits:
            torch.cuda.synchronize(self.device)  # the context exists and is current: its flag can be set
            why = wait_for_gpu(waits)
            if why:
                pb_utils.Logger.log_warn(f"{args['model_instance_name']}: CUDA waits stay as they were: {why}")
        cudnn = params.get("cudnn_algorithms", "heuristics_b")
        choose_cudnn_algorithms(cudnn)
        self.post = Postprocess(params)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        height, width, _ = (int(d) for d in next(i for i in config["input"] if i["name"] == "images")["dims"])
        buckets = [int(b) for b in params.get("batch_buckets", "1").split(",")]
        steps = Steps(args["model_instance_name"])
        mode = params.get("torch_compile", "0")  # engine, load or 0
        layout = self._packages(version_dir, buckets, steps) if mode == "engine" else None
        if layout is None:
            layout = self._program(version_dir, params.get("program_file", "model.pt"), mode != "0", steps)
        detections = gpu.GpuDetections(width, height).to(self.device)
        finished = ({batch: gpu.Finished(package, detections) for batch, package in layout.items()}
                    if isinstance(layout, dict) else gpu.Finished(layout, detections))
        parameters = [(len(gpu.PARAMETERS),)]
        self.replay = GraphReplay(finished, (height, width, 3), buckets, self.device, per_image=parameters, to_host=[1])
        per_bucket = ", ".join(f"batch {b} {took:.1f} s" for b, took in sorted(self.replay.seconds.items()))
        steps.done(f"CUDA graphs captured for batches {','.join(map(str, buckets))}"
                   + (" (torch.compile ran here)" if steps.compiling else "") + f" (cuDNN {cudnn}; {per_bucket})")
        steps.log(time.perf_counter() - started)
        self.stream = torch.cuda.current_stream(self.device)
        self.decoder = None
        if any(i["name"] == "image" for i in config["input"]):  # encoded images decoded here
            self.decoder = gpu_decoder_class()(self.device, height, width, int(params.get("max_pixels", "0")))

    def _packages(self, version_dir, buckets, steps):
        """The AOTInductor packages of ``make engine`` (``torch_compile`` engine), one per bucket,
        or None (and a log line saying why) when they cannot serve here."""
        record = compiled_packages.read_record(version_dir)
        why = compiled_packages.refusal(record, compiled_packages.running_platform(torch, self.device.index), buckets,
                                        version_dir)
        if why:
            pb_utils.Logger.log_warn(f"{steps.name}: compiling at load, not using the engine's packages: {why}")
            return None
        loaded = compiled_packages.load_packages(compiled_packages.package_paths(record, buckets, version_dir),
                                                 self.device.index)
        steps.done(f"{len(loaded)} AOTInductor packages loaded (compiled at make engine)")
        return loaded

    def _program(self, version_dir, program_file, compiled, steps):
        """The graph program in the trim layout, to be compiled when the first capture runs it
        (``compiled``) or run eagerly."""
        program = torch.load(os.path.join(version_dir, program_file), map_location="cpu", weights_only=True)
        module = GraphProgram(program, device=self.device, depthwise_taps=compiled)
        layout = TrimLayout(module, self.post.chunks)
        steps.done("graph program loaded")
        if compiled:  # with the layout: one compiled unit, fewer kernels per replay
            steps.compiling = True
            return torch.compile(layout, dynamic=False)
        return layout

    def _placement(self, request, count):
        """The request's ``letterbox`` rows, checked; rows of an unscaled frame when it sends none
        (a client of this model alone)."""
        tensor = pb_utils.get_input_tensor_by_name(request, "letterbox")
        if tensor is None:
            return np.tile(np.array([1.0, 0.0, 0.0], dtype=np.float32), (count, 1))
        rows = tensor.as_numpy() if tensor.is_cpu() else torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()
        return self.post.placement(rows, count)

    def _pixels(self, requests, responses):
        """Requests with ``images``: their frames copied into the graph's input; the accepted ones."""
        accepted, parts = [], []
        for index, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "images")
                if tensor is None:
                    raise RequestError("send images (uint8 [N, H, W, 3]) with letterbox rows, or image (encoded)")
                images = (torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu()
                          else torch.from_dlpack(tensor.to_dlpack()))  # CUDA shm: read in place
                options = self.post.options(request.parameters())
                accepted.append(Request(index, len(images), self._placement(request, len(images)), options))
                parts.append(images)
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(error=invalid_argument(str(exc)))
        if accepted:
            self.replay.fill(parts)
        return accepted

    def _encoded(self, requests, responses):
        """Requests with ``image``: decoded and letterboxed into the graph's input; the accepted ones."""
        options = {}
        for index, request in enumerate(requests):
            try:
                options[index] = self.post.options(request.parameters())
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(error=invalid_argument(str(exc)))
        indices = list(options)
        errors, decoded = self.decoder.decode_requests(
            [pb_utils.get_input_tensor_by_name(requests[index], "image").as_numpy() for index in indices])
        for position, error in errors.items():
            responses[indices[position]] = pb_utils.InferenceResponse(error=invalid_argument(str(error)))
        if not decoded:
            return []
        images = [image for _, mine in decoded for image in mine]
        placement, sizes = self.decoder.letterbox(images, self.replay.inputs(len(images)))
        accepted, start = [], 0
        for position, mine in decoded:
            index, end = indices[position], start + len(mine)
            accepted.append(Request(index, len(mine), placement[start:end], options[index], sizes[start:end]))
            start = end
        return accepted

    def _detect(self, accepted, responses):
        """One replay for the ``accepted`` requests, whose images fill the graph's input rows in
        order; each one's response. A request with an image the graph flagged (a crowd, or NMS
        not settled) gets the numpy postprocess on all its candidates."""
        total = sum(r.count for r in accepted)
        (parameters,) = self.replay.host_inputs(total)
        start = 0
        for r in accepted:
            gpu.write_parameters(parameters[start:start + r.count], r.options, r.placement)
            start += r.count
        by_position, _ = self.replay.replay(total)
        self.stream.synchronize()  # the one wait: the graph has written every image's faces to the host
        (packed,) = self.replay.host_outputs(total)
        found = [gpu.unpack(row) for row in packed]
        start = 0
        for r in accepted:
            end = start + r.count
            if any(f.unsettled for f in found[start:end]):  # the numpy postprocess, on all the candidates
                outputs = self.post.detect(chunk_major(by_position[start:end]).cpu().numpy(), r.placement, r.options)
            else:
                outputs = gpu.faces_outputs(found[start:end])
            if r.sizes is not None:
                outputs["image_size"] = r.sizes
            responses[r.index] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()])
            start = end

    def execute(self, requests):
        responses = [None] * len(requests)
        encoded = self.decoder is not None and pb_utils.get_input_tensor_by_name(requests[0], "image") is not None
        try:
            with torch.inference_mode():
                accepted = (self._encoded if encoded else self._pixels)(requests, responses)
                if accepted:
                    self._detect(accepted, responses)
        except Exception as exc:  # e.g. out of memory: each request still gets its one response
            responses = [response or pb_utils.InferenceResponse(error=failed(f"detector failed: {exc}"))
                         for response in responses]
        return responses
