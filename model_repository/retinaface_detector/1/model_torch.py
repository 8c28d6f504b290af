"""Triton Python model: the rewritten RetinaFace graph on a GPU with PyTorch (BACKEND=torch).

``model.pt`` beside this file is the graph program written by ``make engine BACKEND=torch``;
``graph_program.py`` runs it (float16 network, float32 decode and top-K). At load, each instance
captures one CUDA graph per batch bucket (config parameter ``batch_buckets``), so a request costs
one graph replay. What it captures depends on the parameter ``torch_compile``:

- ``engine``: the AOTInductor packages ``make engine`` compiled, ``model.b<batch>.pt2``, one per
  bucket, if ``build.json`` says they were compiled for this torch, CUDA and GPU
  (``compiled_packages.py``); otherwise a warning in the server log says why, and ``load`` follows;
- ``load``: the program under ``torch.compile``, compiled here, in every instance (slow start);
- ``0``: the program run eagerly (fast start, slow replays).

Before the capture, cuDNN is told how to pick each convolution's algorithm (config parameter
``cudnn_algorithms``, :func:`graph_program.choose_cudnn_algorithms`; default ``heuristics_b``, the
same choice on every start). The server log gets one line per instance with the time of each
loading step, the cuDNN choice and each bucket's capture. The instance's threads sleep while they
wait for the GPU (config parameter ``cuda_waits``, default ``block``; ``spin``, CUDA's own choice
here, keeps a core busy per waiting instance and served no more images, docs/benchmarks.md).

Input stays on the GPU: with ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"``, images sent through CUDA
shared memory arrive as GPU tensors and are read through DLPack; images sent as gRPC bytes or
system shared memory arrive on the CPU and are copied up once. The requests Triton's dynamic
batcher hands over together run as one replay of the smallest bucket that holds them (rows past
them are left over from earlier batches and ignored).

Encoded images (``PREPROCESS=detector``, the torch build's default): the config then has a
second, optional input ``image`` (BYTES, one JPEG or PNG per batch row) and the outputs
``letterbox`` and ``image_size``; the ensemble ``retinaface_encoded`` sends its rows here. Triton
batches only requests with the same inputs, so an ``execute`` call holds pixels or encoded images,
never both. The encoded images are decoded by ``GpuDecoder`` of the preprocess model's
``model_torch.py`` (same repository, loaded by path: its header checks, nvJPEG in one batch, OpenCV
for the rest) and letterboxed straight into the CUDA graph's input rows, in this process: no
frames cross between processes, and a request with a row that cannot be read gets the
preprocess's INVALID_ARGUMENT while the others batched with it are served.

The captured graph also lays the candidates out for the trim (:class:`TrimLayout`): each request's
top-K chunks are cut after the last row some image of the request scores above the request's
threshold, :func:`model.trimmed`'s rule (``model.py``, whose helpers this file loads), and the
graph counts those rows per image on the GPU, so the host never scans candidates. Then, with the
postprocess on the CPU (config parameter ``candidates_on_gpu`` 0), one copy to pinned host memory
brings the counts and the first ``HEAD_ROWS`` rows of every chunk, and the host waits once;
ordinary frames keep far fewer rows (the astronaut 55, a canvas of faces ~100 at score 0.02), and
a batch where some image keeps more (a crowd) copies all of its rows in a second round. With the
postprocess on the GPU (``candidates_on_gpu`` 1), each request's rows are copied out of the
graph's buffer on the GPU and handed on through DLPack.

Imports torch and numpy; where it decodes, the preprocess's decoder adds torchvision and OpenCV. No
project code.
"""

import ctypes
import importlib.util
import json
import os
import sys
import time

# torch.compile's worker pool starts sys.executable, which in Triton's stub is the stub binary,
# not Python: compile in this process instead.
if not os.path.basename(sys.executable).startswith("python"):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

IMPORTING = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
IMPORT_S = time.perf_counter() - IMPORTING
import triton_python_backend_utils as pb_utils  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_sibling(name, filename):
    """A module of this directory, loaded by path (whatever the stub puts on sys.path) and
    registered by ``name``, where ``torch.compile`` looks up the globals of the code it traces."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cpu_model = load_sibling("rtface_detector_onnxruntime", "model.py")
runner = load_sibling("rtface_graph_program", "graph_program.py")
packages = load_sibling("rtface_compiled_packages", "compiled_packages.py")
parameter = cpu_model.parameter
PREPROCESS_MODEL = "retinaface_preprocess"  # its model_torch.py holds the GPU decoder of encoded images


def gpu_decoder_module(model_dir):
    """``model_torch.py`` of the preprocess model beside this model (``model_dir`` is this model's
    directory in the repository), loaded by path."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), PREPROCESS_MODEL, "1", "model_torch.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: encoded images are decoded by its GpuDecoder; "
                                "copy the whole model repository (`make engine` writes it)")
    spec = importlib.util.spec_from_file_location("rtface_gpu_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CUDA_WAITS = {"block": 0x04, "spin": 0x01}  # CU_CTX_SCHED_BLOCKING_SYNC, CU_CTX_SCHED_SPIN


def wait_for_gpu(how):
    """How this process's threads wait for the GPU from now on (config parameter ``cuda_waits``):
    ``block`` (the thread sleeps until the GPU is done, its core free for the server's other work)
    or ``spin`` (a core busy while it waits: CUDA's own choice on a host with more cores than
    contexts). Sets the current CUDA context's scheduling flag through the driver API; returns
    None, or why it could not be set."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no CUDA driver library ({exc})"
    set_flags, get_flags = getattr(driver, "cuCtxSetFlags", None), getattr(driver, "cuCtxGetFlags", None)
    if set_flags is None or get_flags is None:
        return "this CUDA driver has no cuCtxSetFlags (CUDA 12.1 or later has)"
    flags = ctypes.c_uint()
    if get_flags(ctypes.byref(flags)) != 0:
        return "cuCtxGetFlags failed: no current CUDA context"
    status = set_flags(ctypes.c_uint((flags.value & ~0x07) | CUDA_WAITS[how]))
    return None if status == 0 else f"cuCtxSetFlags returned CUresult {status}"


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


def chunk_major(rows):
    """Rows ``[n, keep, chunks, 15]`` of :class:`TrimLayout` as the postprocess takes them,
    ``[n, chunks * keep, 15]``: each chunk's rows in order, one chunk after another (a copy)."""
    n, keep, chunks, width = rows.shape
    if isinstance(rows, torch.Tensor):
        out = rows.new_empty((n, chunks, keep, width))
        return out.copy_(rows.transpose(1, 2)).view(n, chunks * keep, width)
    return np.array(rows.transpose(0, 2, 1, 3), order="C").reshape(n, chunks * keep, width)


class TritonPythonModel:
    """uint8 ``images [N, H, W, 3]`` (CPU or GPU) -> trimmed ``candidates [N, R, 15]``; or, where it
    decodes, ``image`` BYTES [N, 1] -> ``candidates``, ``letterbox`` [N, 3] and ``image_size`` [N, 2]."""

    def initialize(self, args):
        started = time.perf_counter()
        config = json.loads(args["model_config"])
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(self.device)
        waits = parameter(config, "cuda_waits", "")  # absent: CUDA's own choice (spin, on a host of many cores)
        if waits:
            if waits not in CUDA_WAITS:
                raise ValueError(f"config parameter cuda_waits is {waits!r}: use one of {', '.join(CUDA_WAITS)}")
            torch.cuda.synchronize(self.device)  # the context exists and is current: its flag can be set
            why = wait_for_gpu(waits)
            if why:
                pb_utils.Logger.log_warn(f"{args['model_instance_name']}: CUDA waits stay as they were: {why}")
        cudnn = parameter(config, "cudnn_algorithms", "heuristics_b")
        runner.choose_cudnn_algorithms(cudnn)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        height, width, _ = (int(d) for d in next(i for i in config["input"] if i["name"] == "images")["dims"])
        buckets = [int(b) for b in parameter(config, "batch_buckets", "1").split(",")]
        self.chunks = int(parameter(config, "topk_chunks", "1"))
        steps = Steps(args["model_instance_name"])
        mode = parameter(config, "torch_compile", "0")  # engine, load or 0
        layout = self._packages(version_dir, buckets, steps) if mode == "engine" else None
        if layout is None:
            layout = self._program(version_dir, parameter(config, "program_file", "model.pt"), mode != "0", steps)
        self.replay = runner.GraphReplay(layout, height, width, buckets, self.device, per_image_inputs=[torch.float32])
        per_bucket = ", ".join(f"batch {b} {took:.1f} s" for b, took in sorted(self.replay.seconds.items()))
        steps.done(f"CUDA graphs captured for batches {','.join(map(str, buckets))}"
                   + (" (torch.compile ran here)" if steps.compiling else "") + f" (cuDNN {cudnn}; {per_bucket})")
        steps.log(time.perf_counter() - started)
        self.default_threshold = float(parameter(config, "score_threshold", "0"))
        self.on_gpu = parameter(config, "candidates_on_gpu", "0") == "1"
        # pinned host buffers for the largest batch: thresholds out; counts and rows back (CPU postprocess)
        pinned = lambda tensor: torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # noqa: E731
        by_position, head, kept = self.replay.largest_outputs()
        self.per_chunk = by_position.shape[1]
        self.host_thresholds = torch.empty(kept.shape, dtype=torch.float32, pin_memory=True)
        if not self.on_gpu:
            self.host_kept, self.host_head, self.host_rows = pinned(kept), pinned(head), pinned(by_position)
        self.decoder = None
        if any(i["name"] == "image" for i in config["input"]):  # encoded images decoded here
            decoding = gpu_decoder_module(args["model_repository"])
            self.decoder = decoding.GpuDecoder(self.device, height, width, int(parameter(config, "max_pixels", "0")))

    def _packages(self, version_dir, buckets, steps):
        """The AOTInductor packages of ``make engine`` (``torch_compile`` engine), one per bucket,
        or None (and a log line saying why) when they cannot serve here."""
        record = packages.read_record(version_dir)
        why = packages.refusal(record, packages.running_platform(torch, self.device.index), buckets, version_dir)
        if why:
            pb_utils.Logger.log_warn(f"{steps.name}: compiling at load, not using the engine's packages: {why}")
            return None
        loaded = runner.load_packages(packages.package_paths(record, buckets, version_dir), self.device.index)
        steps.done(f"{len(loaded)} AOTInductor packages loaded (compiled at make engine)")
        return loaded

    def _program(self, version_dir, program_file, compiled, steps):
        """The graph program in the trim layout, to be compiled when the first capture runs it
        (``compiled``) or run eagerly."""
        program = torch.load(os.path.join(version_dir, program_file), map_location="cpu", weights_only=True)
        module = runner.GraphProgram(program, device=self.device, depthwise_taps=compiled)
        layout = runner.TrimLayout(module, self.chunks)
        steps.done("graph program loaded")
        if compiled:  # with the layout: one compiled unit (92 kernels per batch-1 replay instead of 98)
            steps.compiling = True
            return torch.compile(layout, dynamic=False)
        return layout

    def _images(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "images")
        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy())
        return torch.from_dlpack(tensor.to_dlpack())

    def _keeps(self, thresholds, counts, kept):
        """Rows per chunk each request (of ``counts`` images) keeps: the most any of its images
        keeps (at least one); all of them where the request's threshold is invalid (the
        postprocess answers it)."""
        keeps, start = [], 0
        for threshold, count in zip(thresholds, counts):
            mine = kept[start:start + count]
            keeps.append(self.per_chunk if threshold is None else max(1, int(max(mine))))
            start += count
        return keeps

    def _on_host(self, thresholds, counts, outputs):
        """Each request's trimmed rows as numpy arrays: the counts and the head rows copied to
        pinned memory behind the replay, one wait; all rows in a second round when a request
        keeps more than the head."""
        by_position, head, kept = outputs
        total = len(kept)
        self.host_kept[:total].copy_(kept, non_blocking=True)
        self.host_head[:total].copy_(head, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        keeps = self._keeps(thresholds, counts, self.host_kept[:total].tolist())
        rows = self.host_head[:total].numpy()
        if max(keeps) > head.shape[1]:
            self.host_rows[:total].copy_(by_position, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            rows = self.host_rows[:total].numpy()
        trimmed, start = [], 0
        for keep, count in zip(keeps, counts):
            trimmed.append(chunk_major(rows[start:start + count, :keep]))
            start += count
        return trimmed

    def _on_gpu(self, thresholds, counts, outputs):
        """Each request's trimmed rows as GPU tensors, copied out of the graph's buffer."""
        by_position, _, kept = outputs
        keeps = self._keeps(thresholds, counts, kept.tolist())
        trimmed, start = [], 0
        for keep, count in zip(keeps, counts):
            trimmed.append(chunk_major(by_position[start:start + count, :keep]))
            start += count
        torch.cuda.current_stream(self.device).synchronize()  # the postprocess reads them from another process
        return trimmed

    def _thresholds(self, requests, counts):
        """Each request's score threshold (None: invalid), and the per-image values the graph
        reads (2.0 for an invalid one: no row passes)."""
        thresholds = [cpu_model.score_threshold(r, self.default_threshold) for r in requests]
        per_image = self.host_thresholds[:sum(counts)]
        per_image.numpy()[:] = np.repeat([2.0 if t is None else t for t in thresholds], counts)
        return thresholds, per_image

    def _candidates(self, counts, outputs, thresholds):
        """The trimmed candidates of each request (of ``counts`` images), out of the graph's ``outputs``."""
        return (self._on_gpu if self.on_gpu else self._on_host)(thresholds, counts, outputs)

    def _tensor(self, rows):
        """One request's ``candidates`` output (GPU rows through DLPack, host rows as numpy)."""
        return pb_utils.Tensor.from_dlpack("candidates", rows) if self.on_gpu else pb_utils.Tensor("candidates", rows)

    def _pixels(self, requests):
        """Requests with ``images``: their frames copied into the graph's input, one replay."""
        parts = [self._images(r) for r in requests]
        counts = [len(part) for part in parts]
        thresholds, per_image = self._thresholds(requests, counts)
        candidates = self._candidates(counts, self.replay.run(parts, per_image), thresholds)
        return [pb_utils.InferenceResponse(output_tensors=[self._tensor(rows)]) for rows in candidates]

    def _encoded(self, requests):
        """Requests with ``image``: decoded and letterboxed into the graph's input, one replay;
        a request with a row that cannot be read gets its INVALID_ARGUMENT."""
        errors, accepted = self.decoder.decode_requests(requests)
        responses = [errors.get(index) for index in range(len(requests))]
        if not accepted:
            return responses
        counts = [len(images) for _, images in accepted]
        frames = self.replay.inputs(sum(counts))
        placement, sizes = self.decoder.letterbox([image for _, images in accepted for image in images], frames)
        thresholds, per_image = self._thresholds([requests[index] for index, _ in accepted], counts)
        outputs = self.replay.replay(sum(counts), per_image)
        candidates = self._candidates(counts, outputs, thresholds)
        start = 0
        for (index, _), count, rows in zip(accepted, counts, candidates):
            responses[index] = pb_utils.InferenceResponse(output_tensors=[
                self._tensor(rows), pb_utils.Tensor("letterbox", placement[start:start + count]),
                pb_utils.Tensor("image_size", sizes[start:start + count])])
            start += count
        return responses

    def execute(self, requests):
        encoded = self.decoder is not None and pb_utils.get_input_tensor_by_name(requests[0], "image") is not None
        try:
            with torch.inference_mode():
                return self._encoded(requests) if encoded else self._pixels(requests)
        except Exception as exc:  # e.g. out of memory: each request still gets its one response
            error = f"detector failed: {exc}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(error)) for _ in requests]
