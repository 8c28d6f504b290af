"""Build and serve settings: every default the tools use, read once from the environment.

The Makefile passes its variables through the environment (``INPUT_SIZE=640x640 make engine``);
anything unset falls back to the defaults below. This module is the only place they are named.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BuildSettings", "ServeSettings", "SettingsError", "REPO_ROOT", "MODEL_REPOSITORY",
           "env_text", "env_int", "parse_gpus", "parse_input_size", "topk_plan", "GPU_BACKENDS",
           "TOPK_MAX_K", "TOPK_LIMIT", "GPU_OPTIONS", "NETWORKS"]

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"

BACKENDS = ("auto", "tensorrt", "torch", "onnxruntime")
NETWORKS = {"mnet025": "RetinaFace-MobileNet0.25, the default", "mnv2": "RetinaFace-MobileNetV2, more accurate"}
GPU_BACKENDS = ("tensorrt", "torch")
PREPROCESSES = ("auto", "numpy", "torch", "detector")
PRECISIONS = ("fp16", "fp32")
TORCH_COMPILES = ("engine", "load", "0")  # compile at make engine (AOTInductor), at each load, or never
STRIDE_MULTIPLE = 32          # the coarsest feature map is 1/32 of the input
MIN_SIDE, MAX_SIDE = 64, 4096  # outside this, the engine is either useless or absurdly large
TOPK_MAX_K = 3840             # TensorRT's largest TopK K
TOPK_CHUNKS = (1, 3, 7, 21)   # odd divisors of every anchor count (42 anchors per 32x32 pixels), so
                              # both anchors of a location, and neighbouring locations, part ways
TOPK_LIMIT = TOPK_CHUNKS[-1] * TOPK_MAX_K


def _gpu_options():
    """The torch detector's ``gpu_options.py`` (standard library only), which validates the GPU
    settings (``CUDNN_ALGORITHMS``, ``CUDA_WAITS``) for the build and for the server alike."""
    spec = importlib.util.spec_from_file_location(
        "rtface_server_gpu_options", MODEL_REPOSITORY / "retinaface_detector" / "1" / "gpu_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_OPTIONS = _gpu_options()


class SettingsError(ValueError):
    """A build or serve setting is out of range; the message says which and what is allowed."""


def env_text(name: str, default: str) -> str:
    """The environment variable ``name``, stripped, or ``default`` when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int, low: int, high: int) -> int:
    """The environment variable ``name`` as an integer in ``low..high`` (or ``default``)."""
    raw = env_text(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range: use {low}..{high}")
    return value


def parse_gpus(text: str) -> tuple[int, ...] | None:
    """``GPUS``: ``all`` (None: every GPU the server sees) or device ids such as ``0,1``."""
    if text.strip().lower() == "all":
        return None
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SettingsError(f"GPUS={text!r}: write all, or device ids such as 0,1") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise SettingsError(f"GPUS={text!r}: device ids must be distinct and >= 0")
    return ids


def topk_plan(topk: int) -> tuple[int, int]:
    """``(chunks, k)`` for at least ``topk`` candidates per image: the fewest top-K chunks whose
    K stays within TensorRT's limit; the engine keeps ``chunks * k`` (``topk`` rounded up)."""
    for chunks in TOPK_CHUNKS:
        k = -(-topk // chunks)
        if k <= TOPK_MAX_K:
            return chunks, k
    raise SettingsError(f"TOPK={topk} is out of range: use 1..{TOPK_LIMIT}")


def parse_input_size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` (e.g. ``1280x960``) into ``(width, height)`` in pixels, checking the limits."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SettingsError(f"INPUT_SIZE={text!r}: write it as WIDTHxHEIGHT, e.g. 1280x960") from None
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise SettingsError(
                f"INPUT_SIZE={text}: {name} {side} is out of range {MIN_SIDE}..{MAX_SIDE}")
        if side % STRIDE_MULTIPLE:
            raise SettingsError(
                f"INPUT_SIZE={text}: {name} {side} is not a multiple of {STRIDE_MULTIPLE} "
                f"(the network's coarsest stride); try {round(side / STRIDE_MULTIPLE) * 32 or 32}")
    return width, height


@dataclass(frozen=True)
class BuildSettings:
    """What ``make engine`` builds: the detector's input size, batch, top-K and backend."""

    backend: str = "auto"
    input_width: int = 1280
    input_height: int = 960
    max_batch: int = 16
    topk: int = 8190                      # 3 chunks: every anchor of the crowd photo above 0.02 fits (docs/accuracy.md)
    max_detections: int = 3000            # the crowd photo's faces at score 0.02 fit (docs/accuracy.md)
    precision: str = "fp16"
    network: str = "mnet025"              # NETWORKS (make engine MODEL=...); ONNX= replaces it with a file
    onnx_path: Path | None = None
    onnx_input: str = ""                  # ONNX='s input convention (tools/engine/conventions.py); "": from the file
    repository: Path = MODEL_REPOSITORY
    overload_keep: int = 2                # CPU detector: requests it takes at once, the rest shed
    max_queue: int | None = None          # Triton queue policy for the detector; None: none
    queue_timeout_ms: int | None = None   # with max_queue: longest wait before rejection
    gpu_instances: int = 0                # GPU detectors: instances on each GPU listed in `gpus`; 0: torch 6 where it decodes, else 2; TensorRT 1
    gpus: tuple[int, ...] | None = None   # GPU detectors: device ids; None: every GPU Triton sees
    torch_compile: str = "engine"         # BACKEND=torch: compiled at make engine (AOTInductor packages), at load, or 0 (eager)
    cudnn_algorithms: str = "heuristics_b"  # BACKEND=torch: cuDNN's heuristics mode B picks (as fast as timing them, in half the load time)
    cuda_waits: str = "block"             # BACKEND=torch: the detector's threads sleep while the GPU works (spin: a core each, no faster)
    postprocess_instances: int = 0        # 0: 2 beside the CPU detector, 8 per GPU beside TensorRT, 1 beside the torch detector (which does its own)
    preprocess: str = "auto"              # encoded images: numpy (OpenCV, CPU step), torch (nvJPEG, GPU step) or detector (nvJPEG in the torch detector's process); auto: detector beside the torch detector, numpy elsewhere
    preprocess_instances: int = 0         # 0: numpy 2 beside the CPU detector, 8 per GPU beside a GPU one (1 where the detector decodes); torch 2 per GPU
    max_image_pixels: int = 50_000_000    # encoded images declaring more pixels are refused before decoding

    def __post_init__(self):
        # an input with fewer anchors than TOPK keeps every anchor (and MAX_DET at most that):
        # the default TOPK outgrows inputs below about 640x400
        from tools.engine.priors import anchor_count

        anchors = anchor_count(self.input_width, self.input_height)
        if self.topk > anchors:
            object.__setattr__(self, "topk", anchors)
        if self.max_detections > self.topk:
            object.__setattr__(self, "max_detections", self.topk)

    @classmethod
    def from_env(cls) -> "BuildSettings":
        """Read ``BACKEND``, ``INPUT_SIZE``, ``MAX_BATCH``, ``TOPK``, ``MAX_DET``, ``PRECISION``,
        ``NETWORK`` (``make engine MODEL=...``: mnet025, mnv2), ``ONNX``, ``ONNX_INPUT``, ``MODEL_REPOSITORY``, ``OVERLOAD_KEEP``, ``MAX_QUEUE``, ``QUEUE_TIMEOUT_MS``,
        ``GPU_INSTANCES``, ``GPUS`` (``all`` or a comma list of device ids), ``TORCH_COMPILE`` (engine/load/0),
        ``CUDNN_ALGORITHMS`` (benchmark, benchmark:N, heuristics, heuristics_b), ``CUDA_WAITS`` (block, spin),
        ``POSTPROCESS_INSTANCES``, ``PREPROCESS``, ``PREPROCESS_INSTANCES`` and
        ``MAX_IMAGE_PIXELS`` from the environment, with this class's defaults."""
        network = env_text("NETWORK", cls.network)
        if network not in NETWORKS:
            raise SettingsError(f"MODEL={network!r}: use " + " or ".join(f"{k} ({v})" for k, v in NETWORKS.items()))
        backend = env_text("BACKEND", cls.backend)
        if backend not in BACKENDS:
            raise SettingsError(f"BACKEND={backend!r}: use one of {', '.join(BACKENDS)}")
        preprocess = env_text("PREPROCESS", cls.preprocess)
        if preprocess not in PREPROCESSES:
            raise SettingsError(f"PREPROCESS={preprocess!r}: use one of {', '.join(PREPROCESSES)}")
        torch_compile = env_text("TORCH_COMPILE", cls.torch_compile)
        if torch_compile not in TORCH_COMPILES:
            raise SettingsError(f"TORCH_COMPILE={torch_compile!r}: use engine (compile at make engine), "
                                "load (compile when the server loads the model) or 0 (no compile)")
        cudnn = env_text("CUDNN_ALGORITHMS", cls.cudnn_algorithms)
        if problem := GPU_OPTIONS.cudnn_algorithms_problem(cudnn):
            raise SettingsError(f"CUDNN_ALGORITHMS={problem}")
        cuda_waits = env_text("CUDA_WAITS", cls.cuda_waits)
        if problem := GPU_OPTIONS.cuda_waits_problem(cuda_waits):
            raise SettingsError(f"CUDA_WAITS={problem}")
        precision = env_text("PRECISION", cls.precision)
        if precision not in PRECISIONS:
            raise SettingsError(f"PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}")
        width, height = parse_input_size(env_text("INPUT_SIZE", f"{cls.input_width}x{cls.input_height}"))
        chunks, per_chunk = topk_plan(env_int("TOPK", cls.topk, 1, TOPK_LIMIT))
        topk = chunks * per_chunk
        max_det = env_int("MAX_DET", min(cls.max_detections, topk), 1, topk)
        onnx = env_text("ONNX", "")
        return cls(
            backend=backend,
            input_width=width,
            input_height=height,
            max_batch=env_int("MAX_BATCH", cls.max_batch, 1, 256),
            topk=topk,
            max_detections=max_det,
            precision=precision,
            network=network,
            onnx_path=Path(onnx).expanduser().resolve() if onnx else None,
            onnx_input=env_text("ONNX_INPUT", ""),
            repository=Path(env_text("MODEL_REPOSITORY", str(MODEL_REPOSITORY))).resolve(),
            overload_keep=env_int("OVERLOAD_KEEP", cls.overload_keep, 1, 256),
            max_queue=env_int("MAX_QUEUE", 0, 0, 100_000) or None,
            queue_timeout_ms=env_int("QUEUE_TIMEOUT_MS", 0, 0, 3_600_000) or None,
            gpu_instances=env_int("GPU_INSTANCES", cls.gpu_instances, 0, 64),
            gpus=parse_gpus(env_text("GPUS", "all")),
            torch_compile=torch_compile,
            cudnn_algorithms=cudnn,
            cuda_waits=cuda_waits,
            postprocess_instances=env_int("POSTPROCESS_INSTANCES", cls.postprocess_instances, 0, 256),
            preprocess=preprocess,
            preprocess_instances=env_int("PREPROCESS_INSTANCES", cls.preprocess_instances, 0, 256),
            max_image_pixels=env_int("MAX_IMAGE_PIXELS", cls.max_image_pixels, 1, 1 << 30),
        )


@dataclass(frozen=True)
class ServeSettings:
    """Where ``make serve`` listens: ports and bind addresses, and who may register shared memory.

    ``shm_token``: require the local token header for the shared-memory API (see
    ``rtface_client.security``); ``None`` means "only when ``host`` is not a loopback address".
    ``cuda_pool_mb``: Triton's CUDA memory pool per GPU for GPU builds; 0 sizes it for the build
    (``tools.serve.cuda_pool_bytes``). ``trace_file``: where Triton writes a timestamp trace of
    every request when it stops (``tools.bench.trace_report`` reads it); ``None``: no tracing.
    """

    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    metrics_host: str = "127.0.0.1"
    repository: Path = MODEL_REPOSITORY
    shm_token: bool | None = None
    cuda_pool_mb: int = 0
    trace_file: Path | None = None

    @classmethod
    def from_env(cls) -> "ServeSettings":
        """Read ``HOST``, ``GRPC_PORT``, ``HTTP_PORT``, ``METRICS_PORT``, ``METRICS_HOST``,
        ``MODEL_REPOSITORY``, ``SHM_TOKEN`` (1: always require the token, 0: never),
        ``CUDA_POOL_MB`` and ``TRACE_FILE``."""
        return cls(
            host=env_text("HOST", cls.host),
            grpc_port=env_int("GRPC_PORT", cls.grpc_port, 1, 65535),
            http_port=env_int("HTTP_PORT", cls.http_port, 1, 65535),
            metrics_port=env_int("METRICS_PORT", cls.metrics_port, 1, 65535),
            metrics_host=env_text("METRICS_HOST", cls.metrics_host),
            repository=Path(env_text("MODEL_REPOSITORY", str(MODEL_REPOSITORY))).resolve(),
            shm_token={"1": True, "0": False}.get(env_text("SHM_TOKEN", "")),
            cuda_pool_mb=env_int("CUDA_POOL_MB", cls.cuda_pool_mb, 0, 1 << 20),
            trace_file=Path(trace).resolve() if (trace := env_text("TRACE_FILE", "")) else None,
        )
