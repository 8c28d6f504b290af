"""The model repository's ``config.pbtxt`` files, rendered from a :class:`~tools.engine.plan.Plan` alone.

Shapes, batch sizes, instance counts and default options are the plan's; names are the
repository's (:mod:`tools.engine.repository`). Triton's text format throughout.
"""

from __future__ import annotations

from pathlib import Path

from tools.engine.plan import DEFAULT_IOU_THRESHOLD, DEFAULT_SCORE_THRESHOLD, Plan
from tools.engine.repository import (DETECTOR, ENCODED, ENSEMBLE, MODELS, OUTPUTS, POSTPROCESS, PREPROCESS,
                                     TORCH_MODEL_FILE, artifact_name)
from tools.settings import BuildSettings

__all__ = ["render", "write_configs", "ensemble_interface", "postprocess_parameters"]

QUEUE_POLICY_DELAY_US = 100  # the detector's batcher delay with MAX_QUEUE: a zero delay stalled Triton 2.51 far more


def _dims(*dims: int) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(name: str, dtype: str, *dims: int, ragged: bool = False, optional: bool = False) -> str:
    flag = (" allow_ragged_batch: true" if ragged else "") + (" optional: true" if optional else "")
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(*dims)}{flag} }}'


def _params(**values) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def _maps(kind: str, *names: str) -> str:
    return " ".join(f'{kind} {{ key: "{n}" value: "{n}" }}' for n in names)


def _gpu_instances(plan: Plan, count: int) -> str:
    gpus = f" gpus: {_dims(*plan.settings.gpus)}" if plan.settings.gpus is not None else ""
    return f"instance_group [ {{ count: {count} kind: KIND_GPU{gpus} }} ]"


def _cpu_instances(count: int) -> str:
    return f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]"


def _images(s: BuildSettings, optional: bool = False) -> str:
    return _tensor("images", "TYPE_UINT8", s.input_height, s.input_width, 3, optional=optional)


LETTERBOX = _tensor("letterbox", "TYPE_FP32", 3)
IMAGE = _tensor("image", "TYPE_STRING", 1)  # one encoded image (JPEG or PNG) per batch row
IMAGE_SIZE = _tensor("image_size", "TYPE_INT32", 2)  # (width, height) of the decoded image
FACES = ",\n".join([  # -1: as many rows as the request's image with the most faces (at most MAX_DET)
    _tensor("num_detections", "TYPE_INT32", 1),
    _tensor("boxes", "TYPE_FP32", -1, 4),
    _tensor("scores", "TYPE_FP32", -1),
    _tensor("landmarks", "TYPE_FP32", -1, 5, 2),
    _tensor("capped", "TYPE_INT32", 1),
])


def ensemble_interface(s: BuildSettings) -> str:
    """The batch size, inputs and outputs clients see: the ensemble's (and the benchmark's frame sink's)."""
    return f"""max_batch_size: {s.max_batch}
input [
{_images(s)},
{LETTERBOX}
]
output [
{FACES}
]"""


def _step(model: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> str:
    return f"""    {{ model_name: "{model}" model_version: -1
      {_maps("input_map", *inputs)}
      {_maps("output_map", *outputs)} }}"""


def _steps(plan: Plan) -> str:
    """Letterboxed images and their letterbox rows to faces: the detector, then the postprocess;
    or the detector alone where it finishes its detections itself."""
    if plan.finishes_in_detector:
        return _step(DETECTOR, ("images", "letterbox"), OUTPUTS)
    return ",\n".join([_step(DETECTOR, ("images",), ("candidates",)),
                       _step(POSTPROCESS, ("candidates", "letterbox"), OUTPUTS)])


def _ensemble(plan: Plan) -> str:
    return f"""name: "{ENSEMBLE}"
platform: "ensemble"
{ensemble_interface(plan.settings)}
ensemble_scheduling {{
  step [
{_steps(plan)}
  ]
}}
"""


def _encoded_steps(plan: Plan) -> str:
    """Encoded images to faces: the preprocess (decode, letterbox), then the steps of
    ``retinaface``; or, where the detector decodes, the detector alone (it finishes too)."""
    if plan.decodes_in_detector:
        return _step(DETECTOR, ("image",), (*OUTPUTS, "image_size"))
    return ",\n".join([_step(PREPROCESS, ("image",), ("images", "letterbox", "image_size")), _steps(plan)])


def _encoded(plan: Plan) -> str:
    """``retinaface_encoded``: one encoded image per batch row -> decoded and letterboxed (by the
    preprocess, or inside the torch detector) -> faces as ``retinaface`` gives them, plus ``image_size``."""
    return f"""name: "{ENCODED}"
platform: "ensemble"
max_batch_size: {plan.settings.max_batch}
input [
{IMAGE}
]
output [
{FACES},
{IMAGE_SIZE}
]
ensemble_scheduling {{
  step [
{_encoded_steps(plan)}
  ]
}}
"""


def _preprocess(plan: Plan) -> str:
    s = plan.settings
    if plan.preprocess == "torch":
        placement = f'default_model_filename: "{TORCH_MODEL_FILE}"\n{_gpu_instances(plan, plan.preprocess_instances)}'
    else:
        placement = _cpu_instances(plan.preprocess_instances)
    return f"""name: "{PREPROCESS}"
backend: "python"
max_batch_size: {s.max_batch}
input [
{IMAGE}
]
output [
{_images(s)},
{LETTERBOX},
{IMAGE_SIZE}
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


def _warmup(plan: Plan) -> str:
    """Run zero images at the batch sizes the detector forms, so no request pays for the first
    run at a new batch shape. Triton sends a warm-up of batch b as b requests at once, so the
    CPU detector, which sheds more than ``overload_keep`` at once, warms only up to that."""
    s = plan.settings
    largest = s.overload_keep if plan.backend == "onnxruntime" else s.max_batch
    sizes = sorted({b for b in (1, 2, 4, 8, s.max_batch) if b <= min(largest, s.max_batch)})
    dims = _dims(s.input_height, s.input_width, 3)
    samples = ",\n".join(
        f'  {{ name: "batch_{b}" batch_size: {b} inputs {{ key: "images" value: '
        f'{{ data_type: TYPE_UINT8 dims: {dims} zero_data: true }} }} }}' for b in sizes)
    return f"model_warmup [\n{samples}\n]"


def postprocess_parameters(plan: Plan) -> dict:
    """The postprocess's parameters: the default options, the caps and the candidates' layout
    (the numpy postprocess's, and the torch detector's, which runs the postprocess itself)."""
    s = plan.settings
    return dict(score_threshold=DEFAULT_SCORE_THRESHOLD, iou_threshold=DEFAULT_IOU_THRESHOLD,
                max_detections=s.max_detections, topk_chunks=plan.chunks, topk_per_chunk=plan.per_chunk,
                network_width=s.input_width, network_height=s.input_height)


def _detector_io(plan: Plan) -> tuple[str, str]:
    """The detector's inputs and outputs. The torch detector takes letterboxed images and their
    (optional) letterbox rows, or, where it decodes, either those or encoded images (all optional:
    Triton batches only requests with the same inputs), and gives faces (and the decoded sizes of
    encoded images). The others take images and give candidates: all TOPK rows from the plan, the
    rows that pass the request's threshold from the onnxruntime detector (requests differ in rows)."""
    s = plan.settings
    if not plan.finishes_in_detector:
        rows = s.topk if plan.backend == "tensorrt" else -1
        return _images(s), _tensor("candidates", "TYPE_FP32", rows, 15)
    inputs = [_images(s, optional=plan.decodes_in_detector), _tensor("letterbox", "TYPE_FP32", 3, optional=True)]
    outputs = [FACES]
    if plan.decodes_in_detector:
        inputs.append(_tensor("image", "TYPE_STRING", 1, optional=True))
        outputs.append(IMAGE_SIZE)
    return ",\n".join(inputs), ",\n".join(outputs)


def _detector(plan: Plan) -> str:
    s = plan.settings
    inputs, outputs = _detector_io(plan)
    queue = _queue_policy(s)
    head = f"""name: "{DETECTOR}"
max_batch_size: {s.max_batch}
input [
{inputs}
]
output [
{outputs}
]
{_warmup(plan)}
"""
    if plan.backend == "tensorrt":
        graphs = ", ".join(f"{{ batch_size: {b} }}" for b in plan.buckets)  # text format: commas
        preferred = ", ".join(str(b) for b in (4, 8, 16, 32) if b <= s.max_batch) or "1"
        return head + f"""platform: "tensorrt_plan"
default_model_filename: "{artifact_name('tensorrt')}"
{_gpu_instances(plan, plan.detector_instances)}
dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: 500{queue} }}
optimization {{ cuda {{ graphs: true graph_spec [ {graphs} ] }} }}
{_params(network=plan.network)}
"""
    delay = QUEUE_POLICY_DELAY_US if s.max_queue else 0
    if plan.backend == "torch":
        return head + f"""backend: "python"
default_model_filename: "{TORCH_MODEL_FILE}"
{_gpu_instances(plan, plan.detector_instances)}
dynamic_batching {{ max_queue_delay_microseconds: {delay}{queue} }}
{_params(FORCE_CPU_ONLY_INPUT_TENSORS="no", program_file=artifact_name("torch"),
         batch_buckets=",".join(map(str, plan.buckets)), torch_compile=s.torch_compile,
         cudnn_algorithms=s.cudnn_algorithms, cuda_waits=s.cuda_waits, network=plan.network, **postprocess_parameters(plan),
         **({"max_pixels": s.max_image_pixels} if plan.decodes_in_detector else {}))}
"""
    # onnxruntime's threads sleep while they wait (allow_spinning 0): spinning took the CPU the
    # other steps needed (docs/benchmarks.md, "Encoded images on the 2-core box")
    return head + f"""backend: "python"
{_cpu_instances(1)}
dynamic_batching {{ max_queue_delay_microseconds: {delay}{queue} }}
{_params(onnx_file=artifact_name("onnxruntime"), intra_op_threads=0, allow_spinning=0, overload_keep=s.overload_keep,
         topk_chunks=plan.chunks, score_threshold=DEFAULT_SCORE_THRESHOLD, network=plan.network)}
"""


def _postprocess(plan: Plan) -> str:
    """The numpy postprocess on CPU instances (:class:`~tools.engine.plan.Plan` says how many; beside
    the torch detector no ensemble's step: it answers clients that call it alone)."""
    return f"""name: "{POSTPROCESS}"
backend: "python"
max_batch_size: {plan.settings.max_batch}
input [
{_tensor("candidates", "TYPE_FP32", -1, 15, ragged=True)},
{LETTERBOX}
]
output [
{FACES}
]
{_cpu_instances(plan.postprocess_instances)}
dynamic_batching {{ }}
{_params(**postprocess_parameters(plan))}
"""


def render(plan: Plan) -> dict[str, str]:
    """Every model's ``config.pbtxt`` text, by model name."""
    return {ENSEMBLE: _ensemble(plan), ENCODED: _encoded(plan), PREPROCESS: _preprocess(plan),
            DETECTOR: _detector(plan), POSTPROCESS: _postprocess(plan)}


def write_configs(plan: Plan) -> list[Path]:
    """Write every model's ``config.pbtxt`` under the plan's repository; return their paths."""
    texts, written = render(plan), []
    for name in MODELS:
        path = plan.settings.repository / name / "config.pbtxt"
        (path.parent / "1").mkdir(parents=True, exist_ok=True)
        path.write_text(texts[name])
        written.append(path)
    return written
