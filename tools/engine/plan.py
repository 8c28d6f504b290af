"""The serving plan: what the model repository holds for one build, resolved once.

:meth:`Plan.resolve` turns the build settings and the chosen backend into every decision the
configs state: which steps each ensemble has, how encoded images are decoded, how many instances
each model runs, the CUDA-graph batch buckets and the top-K chunks. The configs are rendered from
the plan alone (:mod:`tools.engine.configs`); nothing downstream derives these again.
"""

from __future__ import annotations

from dataclasses import dataclass

from tools.settings import BuildSettings, SettingsError, topk_plan

__all__ = ["Plan", "CUDA_GRAPH_BATCHES", "DEFAULT_SCORE_THRESHOLD", "DEFAULT_IOU_THRESHOLD"]

DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_IOU_THRESHOLD = 0.4
CUDA_GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # a batch runs in the smallest bucket that holds it

# Instances by default, as measured with the two-step layout (docs/benchmarks.md, History); the
# one-step torch build was measured at these counts only (docs/benchmarks.md, "Per-request cost").
TORCH_DETECTOR_INSTANCES = 2             # per GPU: one instance's Python work overlaps the other's replay
TORCH_DECODING_DETECTOR_INSTANCES = 6    # per GPU where it decodes: each decodes and waits in turn
TENSORRT_DETECTOR_INSTANCES = 1          # its dynamic batcher and CUDA graphs keep the GPU busy alone
POSTPROCESS_INSTANCES_BESIDE_CPU = 2     # a crowd's NMS does not hold up the requests behind it
POSTPROCESS_INSTANCES_BESIDE_GPU = 8     # per listed GPU: numpy processes keep up with the plan
TORCH_PREPROCESS_INSTANCES = 2           # per GPU: one decodes while the other prepares; more served less
NUMPY_PREPROCESS_INSTANCES_BESIDE_CPU = 2
NUMPY_PREPROCESS_INSTANCES_BESIDE_GPU = 8
UNUSED_STEP_INSTANCES = 1                # a model no ensemble calls answers its own clients only
PREPROCESSES = {"numpy": "CPU, OpenCV", "torch": "GPU, nvJPEG through torchvision, a step of its own",
                "detector": "GPU, nvJPEG through torchvision, inside the detector's process"}


@dataclass(frozen=True)
class Plan:
    """One build's serving plan (:meth:`resolve`); ``settings`` are the build settings it came from."""

    settings: BuildSettings
    backend: str                # tensorrt, torch or onnxruntime
    preprocess: str             # encoded images: numpy, torch (a GPU step) or detector (in its process)
    finishes_in_detector: bool  # the detector runs the postprocess itself: each ensemble is one step
    chunks: int                 # top-K chunks of the candidates
    per_chunk: int              # rows of each chunk
    buckets: tuple[int, ...]    # CUDA-graph batch sizes (GPU detectors)
    detector_instances: int     # per GPU for GPU detectors
    postprocess_instances: int
    preprocess_instances: int

    @property
    def network(self) -> str:
        """The network the build serves: ``MODEL`` (``mnet025``, ``mnv2``), or ``onnx`` for ``ONNX=``."""
        return "onnx" if self.settings.onnx_path else self.settings.network

    @property
    def decodes_in_detector(self) -> bool:
        """Whether the detector itself takes encoded images (``PREPROCESS=detector``)."""
        return self.preprocess == "detector"

    @classmethod
    def resolve(cls, settings: BuildSettings, backend: str) -> "Plan":
        """The plan for ``settings`` served by ``backend``. The torch detector runs the postprocess
        itself, on the GPU in the same CUDA graph as its network, so a request pays for one Python
        step; the TensorRT plan and the onnxruntime detector hand their candidates to the numpy
        postprocess, which runs in a stock Triton container. Encoded images are decoded inside the
        torch detector by default (``auto``), with OpenCV beside the others (a stock container has no
        PyTorch); only the torch detector can decode."""
        preprocess = settings.preprocess if settings.preprocess != "auto" else (
            "detector" if backend == "torch" else "numpy")
        if preprocess == "detector" and backend != "torch":
            raise SettingsError(f"PREPROCESS=detector decodes inside the torch detector, but the backend is {backend}; "
                                "use PREPROCESS=torch (a GPU step of its own) or numpy")
        chunks, per_chunk = topk_plan(settings.topk)
        buckets = tuple(sorted({b for b in CUDA_GRAPH_BATCHES if b <= settings.max_batch} | {settings.max_batch}))
        finishes = backend == "torch"
        gpus = len(settings.gpus) if settings.gpus else 1
        if settings.gpu_instances:
            detectors = settings.gpu_instances
        elif backend == "torch":
            detectors = TORCH_DECODING_DETECTOR_INSTANCES if preprocess == "detector" else TORCH_DETECTOR_INSTANCES
        else:
            detectors = TENSORRT_DETECTOR_INSTANCES
        if finishes:
            postprocesses = UNUSED_STEP_INSTANCES
        elif backend == "onnxruntime":
            postprocesses = POSTPROCESS_INSTANCES_BESIDE_CPU
        else:
            postprocesses = POSTPROCESS_INSTANCES_BESIDE_GPU * gpus
        if preprocess == "torch":
            preprocesses = TORCH_PREPROCESS_INSTANCES
        elif preprocess == "detector":
            preprocesses = UNUSED_STEP_INSTANCES
        elif backend == "onnxruntime":
            preprocesses = NUMPY_PREPROCESS_INSTANCES_BESIDE_CPU
        else:
            preprocesses = NUMPY_PREPROCESS_INSTANCES_BESIDE_GPU * gpus
        return cls(settings=settings, backend=backend, preprocess=preprocess, finishes_in_detector=finishes,
                   chunks=chunks, per_chunk=per_chunk, buckets=buckets, detector_instances=detectors,
                   postprocess_instances=settings.postprocess_instances or postprocesses,
                   preprocess_instances=settings.preprocess_instances or preprocesses)
