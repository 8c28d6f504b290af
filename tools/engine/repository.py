"""Writing the Triton model repository: the three ``config.pbtxt`` files and build metadata.

Model code (``model.py``) is committed; configs and artifacts are generated here from the build
settings, so shapes, batch sizes and defaults are stated once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tools.settings import MODEL_REPOSITORY, BuildSettings, topk_plan

__all__ = ["ENSEMBLE", "ENCODED", "PREPROCESS", "DETECTOR", "POSTPROCESS", "MODELS", "OUTPUTS", "write_configs",
           "ensemble_interface", "read_metadata", "write_metadata", "artifact_name", "cuda_graph_batches",
           "finishes_in_detector", "postprocess_parameters", "preprocess_kind", "decodes_in_detector", "detector_instances", "file_sha256", "copy_model_code",
           "DEFAULT_SCORE_THRESHOLD", "DEFAULT_IOU_THRESHOLD", "TORCH_DETECTOR_INSTANCES",
           "TORCH_DECODING_DETECTOR_INSTANCES"]

ENSEMBLE, DETECTOR, POSTPROCESS = "retinaface", "retinaface_detector", "retinaface_postprocess"
ENCODED, PREPROCESS = "retinaface_encoded", "retinaface_preprocess"  # encoded images in: decode + letterbox first
MODELS = (ENSEMBLE, ENCODED, PREPROCESS, DETECTOR, POSTPROCESS)
OUTPUTS = ("num_detections", "boxes", "scores", "landmarks", "capped")  # both ensembles'; the encoded one adds image_size
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_IOU_THRESHOLD = 0.4
METADATA = "build.json"
CUDA_GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)
QUEUE_POLICY_DELAY_US = 100  # CPU detector's batcher delay when MAX_QUEUE adds a queue policy
# Overload: the CPU detector sheds load itself: of the requests Triton hands it at once, it runs
# the newest `overload_keep` (build setting OVERLOAD_KEEP) and answers the older ones
# "overloaded" first, so a burst never queues up latency. Triton's own queue policy
# (max_queue_size) is opt-in through MAX_QUEUE: in Triton 2.51 any default_queue_policy made the
# dynamic batcher stall ~0.5 s now and then, even at concurrency 1 and with a non-zero
# max_queue_delay_microseconds (measured; docs/benchmarks.md; cf. upstream issues 5783, 6796).


ARTIFACTS = {"tensorrt": "model.plan", "torch": "model.pt", "onnxruntime": "model.onnx"}
TORCH_MODEL_FILE = "model_torch.py"  # the torch Python models, beside model.py (onnxruntime detector, OpenCV preprocess)
# Instances per GPU beside GPU detectors (docs/benchmarks.md, H200 host, one-image requests over CUDA
# shm): the torch detector's Python step around each graph replay overlaps with the other instance's
# replay, and eight numpy postprocesses keep up with two detectors: 2 and 8 served 2,385 images/s
# where 1 and 4 served 1,709.
TORCH_DETECTOR_INSTANCES = 2
# Where the torch detector also decodes encoded images (PREPROCESS=detector, the default), six: each
# instance decodes, replays and waits in turn, so the GPU's SMs and JPEG engines are busy only while
# other instances fill in. Measured on one build and H200 host (2026-12-03, runs AA-AE): retinaface_encoded
# 16-image requests (c=16) 3,511 images/s with six against 3,064 with four and 3,598 with eight in one
# run (AB), 3,394 against 3,159 in another (AE); one-image requests (c=64) 2,301 with six, 2,287 with
# four, 2,060 with eight (AB). The pixel path over CUDA shm gives up most with more instances: one-image
# at c=64 1,788-1,797 with six, where two served 2,547 on another host (run Y); deployments serving
# local clients keep GPU_INSTANCES=2.
TORCH_DECODING_DETECTOR_INSTANCES = 6
POSTPROCESS_INSTANCES_BESIDE_GPU = 8  # numpy, CPU processes beside the TensorRT plan
POSTPROCESS_INSTANCES_UNUSED = 1      # beside the torch detector, which finishes its detections itself
# Beside the CPU detector: two, so a crowd frame's NMS does not hold up the requests behind it; the
# postprocess alone served 3,643-4,330 images/s on the 2-core box where one instance served
# 1,954-2,137 (16-image requests with crowd frames, side by side; docs/benchmarks.md).
POSTPROCESS_INSTANCES_BESIDE_CPU = 2
# Encoded images: the torch preprocess (nvJPEG, PREPROCESS=torch) per GPU, one decoding while the
# other prepares. More did not serve more (H200 host, retinaface_encoded, one-image requests at
# concurrency 64: 2, 4 and 8 instances served 1,345, 1,305 and 1,215 images/s; docs/benchmarks.md).
# The numpy one (OpenCV) like the numpy postprocess, CPU processes beside the detector; where the
# torch detector decodes (PREPROCESS=detector) it is no ensemble's step, and one instance answers
# clients that call it alone.
TORCH_PREPROCESS_INSTANCES = 2
NUMPY_PREPROCESS_INSTANCES_BESIDE_CPU = 2
NUMPY_PREPROCESS_INSTANCES_BESIDE_GPU = 8
NUMPY_PREPROCESS_INSTANCES_UNUSED = 1


def finishes_in_detector(backend: str) -> bool:
    """Whether the detector also runs the postprocess (threshold, NMS, letterbox undo), so each
    ensemble is one step: the torch detector does, on the GPU behind its network in the same CUDA
    graph (a request pays for one Python step, not two). The TensorRT plan and the onnxruntime
    detector hand their candidates to the numpy postprocess, which runs in a stock container."""
    return backend == "torch"


def preprocess_kind(s: BuildSettings, backend: str) -> str:
    """``PREPROCESS`` resolved: ``auto`` decodes on the GPU inside the torch detector's process
    (``detector``: nvJPEG, frames letterboxed straight into its CUDA graph), whose server has
    PyTorch, and with OpenCV on the CPU (``numpy``) beside the others, whose stock Triton container
    has no PyTorch. ``torch`` keeps nvJPEG in a step of its own."""
    if s.preprocess != "auto":
        return s.preprocess
    return "detector" if backend == "torch" else "numpy"


def decodes_in_detector(s: BuildSettings, backend: str) -> bool:
    """Whether the detector itself takes encoded images (``PREPROCESS=detector``)."""
    return preprocess_kind(s, backend) == "detector"


def artifact_name(backend: str) -> str:
    """The detector file Triton loads for ``backend``."""
    return ARTIFACTS[backend]


def cuda_graph_batches(s: BuildSettings) -> list[int]:
    """The batch sizes GPU detectors capture CUDA graphs for: powers of two up to MAX_BATCH, and
    MAX_BATCH itself (a batch runs in the smallest that holds it)."""
    return sorted({b for b in CUDA_GRAPH_BATCHES if b <= s.max_batch} | {s.max_batch})


def detector_instances(s: BuildSettings, backend: str) -> int:
    """GPU detector instances per GPU: ``GPU_INSTANCES``, or by default for the torch detector
    :data:`TORCH_DECODING_DETECTOR_INSTANCES` where it decodes encoded images, else
    :data:`TORCH_DETECTOR_INSTANCES`, and one TensorRT plan (its CUDA graphs and dynamic batching
    need no second instance to keep the GPU busy)."""
    if s.gpu_instances:
        return s.gpu_instances
    if backend != "torch":
        return 1
    return TORCH_DECODING_DETECTOR_INSTANCES if decodes_in_detector(s, backend) else TORCH_DETECTOR_INSTANCES


def _gpu_instances(s: BuildSettings, count: int) -> str:
    gpus = f" gpus: {_dims(*s.gpus)}" if s.gpus is not None else ""
    return f"instance_group [ {{ count: {count} kind: KIND_GPU{gpus} }} ]"


def _dims(*dims: int) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(name: str, dtype: str, *dims: int, ragged: bool = False, optional: bool = False) -> str:
    flag = (" allow_ragged_batch: true" if ragged else "") + (" optional: true" if optional else "")
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(*dims)}{flag} }}'


def _params(**values) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def _io(s: BuildSettings) -> dict[str, str]:
    h, w = s.input_height, s.input_width
    return {
        "images": _tensor("images", "TYPE_UINT8", h, w, 3),
        "letterbox": _tensor("letterbox", "TYPE_FP32", 3),
        "image": _tensor("image", "TYPE_STRING", 1),  # one encoded image (JPEG or PNG) per batch row
        "image_size": _tensor("image_size", "TYPE_INT32", 2),  # (width, height) of the decoded image
        # TensorRT hands on all TOPK rows; the Python-backend detectors trim each top-K chunk to
        # the rows that pass the request's score threshold, so requests differ in rows (ragged)
        "plan_candidates": _tensor("candidates", "TYPE_FP32", s.topk, 15),
        "candidates": _tensor("candidates", "TYPE_FP32", -1, 15),
        "ragged_candidates": _tensor("candidates", "TYPE_FP32", -1, 15, ragged=True),
        # -1: as many rows as the request's image with the most faces (at most MAX_DET)
        "outputs": ",\n".join([
            _tensor("num_detections", "TYPE_INT32", 1),
            _tensor("boxes", "TYPE_FP32", -1, 4),
            _tensor("scores", "TYPE_FP32", -1),
            _tensor("landmarks", "TYPE_FP32", -1, 5, 2),
            _tensor("capped", "TYPE_INT32", 1),
        ]),
    }


def _maps(kind: str, *names: str) -> str:
    return " ".join(f'{kind} {{ key: "{n}" value: "{n}" }}' for n in names)


def ensemble_interface(s: BuildSettings) -> str:
    """The batch size, inputs and outputs clients see: the ensemble's (and the benchmark's frame sink's)."""
    io = _io(s)
    return f"""max_batch_size: {s.max_batch}
input [
{io["images"]},
{io["letterbox"]}
]
output [
{io["outputs"]}
]"""


def _step(model: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> str:
    return f"""    {{ model_name: "{model}" model_version: -1
      {_maps("input_map", *inputs)}
      {_maps("output_map", *outputs)} }}"""


def _steps(backend: str) -> str:
    """Letterboxed images and their letterbox rows to faces: the detector, then the postprocess;
    or the detector alone where it finishes its detections itself."""
    if finishes_in_detector(backend):
        return _step(DETECTOR, ("images", "letterbox"), OUTPUTS)
    return ",\n".join([_step(DETECTOR, ("images",), ("candidates",)),
                       _step(POSTPROCESS, ("candidates", "letterbox"), OUTPUTS)])


def ensemble_config(s: BuildSettings, backend: str) -> str:
    return f"""name: "{ENSEMBLE}"
platform: "ensemble"
{ensemble_interface(s)}
ensemble_scheduling {{
  step [
{_steps(backend)}
  ]
}}
"""


def _encoded_steps(s: BuildSettings, backend: str) -> str:
    """Encoded images to faces: the preprocess (decode, letterbox), then the steps of
    ``retinaface``; or, where the detector decodes, the detector (and the postprocess, unless it
    finishes its detections itself)."""
    if not decodes_in_detector(s, backend):
        return ",\n".join([_step(PREPROCESS, ("image",), ("images", "letterbox", "image_size")), _steps(backend)])
    if finishes_in_detector(backend):
        return _step(DETECTOR, ("image",), (*OUTPUTS, "image_size"))
    return ",\n".join([_step(DETECTOR, ("image",), ("candidates", "letterbox", "image_size")),
                       _step(POSTPROCESS, ("candidates", "letterbox"), OUTPUTS)])


def encoded_config(s: BuildSettings, backend: str) -> str:
    """``retinaface_encoded``: one encoded image per batch row -> decoded and letterboxed (by the
    preprocess, or inside the torch detector) -> the detector and postprocess of ``retinaface``;
    the same outputs, plus ``image_size``."""
    io = _io(s)
    return f"""name: "{ENCODED}"
platform: "ensemble"
max_batch_size: {s.max_batch}
input [
{io["image"]}
]
output [
{io["outputs"]},
{io["image_size"]}
]
ensemble_scheduling {{
  step [
{_encoded_steps(s, backend)}
  ]
}}
"""


def preprocess_config(s: BuildSettings, backend: str) -> str:
    io = _io(s)
    if preprocess_kind(s, backend) == "torch":
        placement = f"""default_model_filename: "{TORCH_MODEL_FILE}"
{_gpu_instances(s, s.preprocess_instances or TORCH_PREPROCESS_INSTANCES)}"""
    else:
        if decodes_in_detector(s, backend):
            default = NUMPY_PREPROCESS_INSTANCES_UNUSED
        elif backend == "onnxruntime":
            default = NUMPY_PREPROCESS_INSTANCES_BESIDE_CPU
        else:
            default = NUMPY_PREPROCESS_INSTANCES_BESIDE_GPU * (len(s.gpus) if s.gpus else 1)
        count = s.preprocess_instances or default
        placement = f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]"
    return f"""name: "{PREPROCESS}"
backend: "python"
max_batch_size: {s.max_batch}
input [
{io["image"]}
]
output [
{io["images"]},
{io["letterbox"]},
{io["image_size"]}
]
{placement}
dynamic_batching {{ }}
{_params(max_pixels=s.max_image_pixels)}
"""


def _queue_policy(s: BuildSettings) -> str:
    if not s.max_queue:
        return ""
    timeout = (f"timeout_action: REJECT default_timeout_microseconds: {s.queue_timeout_ms * 1000} "
               "allow_timeout_override: true " if s.queue_timeout_ms else "")
    return f" default_queue_policy {{ {timeout}max_queue_size: {s.max_queue} }}"


def _warmup(s: BuildSettings, backend: str) -> str:
    """Run zero images at the batch sizes the detector forms, so no request pays for the first
    run at a new batch shape. Triton sends a warm-up of batch b as b requests at once, so the
    CPU detector, which sheds more than ``overload_keep`` at once, warms only up to that."""
    largest = s.overload_keep if backend == "onnxruntime" else s.max_batch
    sizes = sorted({b for b in (1, 2, 4, 8, s.max_batch) if b <= min(largest, s.max_batch)})
    dims = _dims(s.input_height, s.input_width, 3)
    samples = ",\n".join(
        f'  {{ name: "batch_{b}" batch_size: {b} inputs {{ key: "images" value: '
        f'{{ data_type: TYPE_UINT8 dims: {dims} zero_data: true }} }} }}' for b in sizes)
    return f"model_warmup [\n{samples}\n]"


def postprocess_parameters(s: BuildSettings) -> dict:
    """The postprocess's parameters: the default options, the caps and the candidates' layout
    (the numpy postprocess's, and the torch detector's, which finishes its detections itself)."""
    chunks, per_chunk = topk_plan(s.topk)
    return dict(score_threshold=DEFAULT_SCORE_THRESHOLD, iou_threshold=DEFAULT_IOU_THRESHOLD,
                max_detections=s.max_detections, topk_chunks=chunks, topk_per_chunk=per_chunk,
                network_width=s.input_width, network_height=s.input_height)


def _torch_detector_io(s: BuildSettings, backend: str) -> tuple[str, str]:
    """The torch detector's inputs and outputs: letterboxed images and their (optional) letterbox
    rows, or, where it decodes, either those or encoded images (all optional: Triton batches only
    requests with the same inputs); faces out, and the decoded sizes of encoded images."""
    io, h, w = _io(s), s.input_height, s.input_width
    decodes = decodes_in_detector(s, backend)
    inputs = [_tensor("images", "TYPE_UINT8", h, w, 3, optional=decodes), _tensor("letterbox", "TYPE_FP32", 3, optional=True)]
    outputs = [io["outputs"]]
    if decodes:
        inputs.append(_tensor("image", "TYPE_STRING", 1, optional=True))
        outputs.append(io["image_size"])
    return ",\n".join(inputs), ",\n".join(outputs)


def detector_config(s: BuildSettings, backend: str) -> str:
    io = _io(s)
    queue = _queue_policy(s)
    if backend == "torch":
        inputs, outputs = _torch_detector_io(s, backend)
    else:
        inputs, outputs = io["images"], io["plan_candidates" if backend == "tensorrt" else "candidates"]
    head = f"""name: "{DETECTOR}"
max_batch_size: {s.max_batch}
input [
{inputs}
]
output [
{outputs}
]
{_warmup(s, backend)}
"""
    if backend == "tensorrt":
        graphs = ", ".join(f"{{ batch_size: {b} }}" for b in cuda_graph_batches(s))  # text format: commas
        preferred = ", ".join(str(b) for b in (4, 8, 16, 32) if b <= s.max_batch) or "1"
        return head + f"""platform: "tensorrt_plan"
default_model_filename: "model.plan"
{_gpu_instances(s, detector_instances(s, backend))}
dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: 500{queue} }}
optimization {{ cuda {{ graphs: true graph_spec [ {graphs} ] }} }}
"""
    # with a queue policy, a zero delay made Triton 2.51 stall far more often than 100 µs did
    delay = QUEUE_POLICY_DELAY_US if s.max_queue else 0
    if backend == "torch":
        buckets = ",".join(str(b) for b in cuda_graph_batches(s))
        return head + f"""backend: "python"
default_model_filename: "{TORCH_MODEL_FILE}"
{_gpu_instances(s, detector_instances(s, backend))}
dynamic_batching {{ max_queue_delay_microseconds: {delay}{queue} }}
{_params(FORCE_CPU_ONLY_INPUT_TENSORS="no", program_file=artifact_name("torch"), batch_buckets=buckets,
         torch_compile=s.torch_compile, cudnn_algorithms=s.cudnn_algorithms, cuda_waits=s.cuda_waits,
         **postprocess_parameters(s), **({"max_pixels": s.max_image_pixels} if decodes_in_detector(s, backend) else {}))}
"""
    # onnxruntime's threads sleep while they wait (allow_spinning 0): on the 2-core box, spinning
    # cost 10-13 ms of CPU per image that the other steps needed (docs/benchmarks.md, "Encoded images")
    return head + f"""backend: "python"
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay}{queue} }}
{_params(onnx_file="model.onnx", intra_op_threads=0, allow_spinning=0, overload_keep=s.overload_keep,
         topk_chunks=topk_plan(s.topk)[0], score_threshold=DEFAULT_SCORE_THRESHOLD)}
"""


def postprocess_config(s: BuildSettings, backend: str) -> str:
    """The numpy postprocess on CPU instances: two beside the CPU detector, eight per listed GPU
    beside the TensorRT plan (``GPUS=all``: eight; the GPU count is only known to the server, so set
    ``POSTPROCESS_INSTANCES`` for more), one beside the torch detector, where it is no ensemble's
    step and answers clients that call it alone."""
    io = _io(s)
    if finishes_in_detector(backend):
        default = POSTPROCESS_INSTANCES_UNUSED
    elif backend == "onnxruntime":
        default = POSTPROCESS_INSTANCES_BESIDE_CPU
    else:
        default = POSTPROCESS_INSTANCES_BESIDE_GPU * (len(s.gpus) if s.gpus else 1)
    return f"""name: "{POSTPROCESS}"
backend: "python"
max_batch_size: {s.max_batch}
input [
{io["ragged_candidates"]},
{io["letterbox"]}
]
output [
{io["outputs"]}
]
instance_group [ {{ count: {s.postprocess_instances or default} kind: KIND_CPU }} ]
dynamic_batching {{ }}
{_params(**postprocess_parameters(s))}
"""


def write_configs(s: BuildSettings, backend: str) -> list[Path]:
    """Write every model's ``config.pbtxt`` under ``s.repository``; return their paths."""
    texts = {ENSEMBLE: ensemble_config(s, backend), ENCODED: encoded_config(s, backend), PREPROCESS: preprocess_config(s, backend),
             DETECTOR: detector_config(s, backend), POSTPROCESS: postprocess_config(s, backend)}
    written = []
    for name in MODELS:
        path = s.repository / name / "config.pbtxt"
        (path.parent / "1").mkdir(parents=True, exist_ok=True)
        path.write_text(texts[name])
        written.append(path)
    return written


GENERATED = ("config.pbtxt", *ARTIFACTS.values(), "build.json", "__pycache__")


def copy_model_code(target: Path) -> Path:
    """Copy the committed model code of ``model_repository/`` (no generated configs or
    artifacts) into ``target``, so an engine can be built there without touching the real one."""
    shutil.copytree(MODEL_REPOSITORY, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*GENERATED))
    return target


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed (plans can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metadata_path(s: BuildSettings) -> Path:
    return s.repository / DETECTOR / "1" / METADATA


def read_metadata(s: BuildSettings) -> dict | None:
    """The metadata of the detector last built into ``s.repository``, if any."""
    path = _metadata_path(s)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_metadata(s: BuildSettings, metadata: dict) -> Path:
    """Store build metadata next to the detector artifact."""
    path = _metadata_path(s)
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path
