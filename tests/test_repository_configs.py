"""Every generated ``config.pbtxt`` parses with Triton's own ``model_config_pb2``, and the ensemble's
steps agree with the models they call: names, data types and shapes. No TensorRT, torch or GPU
needed: config generation is plain text."""

from __future__ import annotations

import itertools

import pytest
from tritonclient.grpc import model_config_pb2

from tests.conftest import configs
from tools.engine import repository
from tools.engine.configs import render
from tools.engine.plan import Plan
from tools.settings import BuildSettings

BACKENDS = ("onnxruntime", "tensorrt", "torch")
SETTINGS = {
    f"max_batch={batch},max_queue={queue}": BuildSettings(max_batch=batch, max_queue=queue,
                                                          queue_timeout_ms=50 if queue else None)
    for batch, queue in itertools.product((1, 16), (None, 4))
}


def tensors(config: model_config_pb2.ModelConfig, kind: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {t.name: (t.data_type, tuple(t.dims)) for t in getattr(config, kind)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SETTINGS)
def test_every_generated_config_parses_with_tritons_model_config_proto(backend, name):
    settings = SETTINGS[name]
    parsed = configs(settings, backend)
    for model, config in parsed.items():
        assert config.name == model and config.max_batch_size == settings.max_batch
    detector = parsed[repository.DETECTOR]
    if backend == "tensorrt":
        assert detector.platform == "tensorrt_plan"
        assert tuple(s.batch_size for s in detector.optimization.cuda.graph_spec) == Plan.resolve(settings, backend).buckets
    else:
        assert detector.backend == "python"
    if settings.max_queue:
        assert detector.dynamic_batching.default_queue_policy.max_queue_size == settings.max_queue
    gpu = backend != "onnxruntime"
    kinds = {g.kind for g in detector.instance_group}
    assert kinds == {model_config_pb2.ModelInstanceGroup.KIND_GPU if gpu else model_config_pb2.ModelInstanceGroup.KIND_CPU}


def fits(produced: tuple[int, tuple[int, ...]], expected: tuple[int, tuple[int, ...]]) -> bool:
    """Whether a tensor of ``produced`` (dtype, dims) is accepted where ``expected`` is declared:
    same dtype and rank, each dim equal or -1 (any) on the taking side, as Triton's ensemble
    validation allows (a TensorRT plan's fixed TOPK rows into the postprocess's variable rows)."""
    (dtype, dims), (want_dtype, want_dims) = produced, expected
    return dtype == want_dtype and len(dims) == len(want_dims) and all(
        w in (-1, d) for d, w in zip(dims, want_dims))


@pytest.mark.parametrize("ensemble_name", [repository.ENSEMBLE, repository.ENCODED])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SETTINGS)
def test_ensemble_steps_agree_with_the_models_they_call(backend, name, ensemble_name):
    parsed = configs(SETTINGS[name], backend)
    ensemble = parsed[ensemble_name]
    produced = {**tensors(ensemble, "input")}  # ensemble tensor name -> (dtype, dims)
    for step in ensemble.ensemble_scheduling.step:
        model = parsed[step.model_name]
        inputs, outputs = tensors(model, "input"), tensors(model, "output")
        required = {t.name for t in model.input if not t.optional}
        assert required <= set(step.input_map) <= set(inputs), step.model_name
        for model_input, ensemble_tensor in step.input_map.items():
            assert fits(produced[ensemble_tensor], inputs[model_input]), (step.model_name, model_input)
        for model_output, ensemble_tensor in step.output_map.items():
            produced[ensemble_tensor] = outputs[model_output]
    for name, spec in tensors(ensemble, "output").items():
        assert produced[name] == spec, name


@pytest.mark.parametrize("backend, preprocess, steps", [
    ("onnxruntime", "auto", [repository.PREPROCESS, repository.DETECTOR, repository.POSTPROCESS]),
    ("tensorrt", "auto", [repository.PREPROCESS, repository.DETECTOR, repository.POSTPROCESS]),
    ("torch", "torch", [repository.PREPROCESS, repository.DETECTOR]),  # the torch detector finishes its detections
    ("torch", "auto", [repository.DETECTOR])])  # ... and decodes
def test_encoded_ensemble_answers_like_the_pixel_one_plus_the_decoded_size(backend, preprocess, steps):
    parsed = configs(BuildSettings(preprocess=preprocess), backend)
    pixels, encoded = parsed[repository.ENSEMBLE], parsed[repository.ENCODED]
    assert tensors(encoded, "output") == {**tensors(pixels, "output"),
                                          "image_size": (model_config_pb2.TYPE_INT32, (2,))}
    assert tensors(encoded, "input") == {"image": (model_config_pb2.TYPE_STRING, (1,))}
    assert [step.model_name for step in encoded.ensemble_scheduling.step] == steps


@pytest.mark.parametrize("backend, preprocess, filename, kind, count", [
    ("torch", "auto", "", model_config_pb2.ModelInstanceGroup.KIND_CPU, 1),  # no step: the detector decodes
    ("torch", "torch", "model_torch.py", model_config_pb2.ModelInstanceGroup.KIND_GPU, 2),
    ("onnxruntime", "auto", "", model_config_pb2.ModelInstanceGroup.KIND_CPU, 2),
    ("tensorrt", "auto", "", model_config_pb2.ModelInstanceGroup.KIND_CPU, 8),  # a stock container has no PyTorch
    ("tensorrt", "torch", "model_torch.py", model_config_pb2.ModelInstanceGroup.KIND_GPU, 2),
    ("torch", "numpy", "", model_config_pb2.ModelInstanceGroup.KIND_CPU, 8)])
def test_preprocess_decodes_on_the_gpu_beside_the_torch_detector_and_on_the_cpu_elsewhere(backend, preprocess,
                                                                                       filename, kind, count):
    settings = BuildSettings(preprocess=preprocess, max_image_pixels=12_000_000)
    config = configs(settings, backend)[repository.PREPROCESS]
    assert config.default_model_filename == filename
    assert [(group.kind, group.count) for group in config.instance_group] == [(kind, count)]
    assert config.parameters["max_pixels"].string_value == "12000000"


@pytest.mark.parametrize("preprocess, decodes", [("auto", True), ("detector", True), ("torch", False), ("numpy", False)])
def test_the_torch_detector_takes_pixels_or_encoded_images_where_it_decodes(preprocess, decodes):
    settings = BuildSettings(preprocess=preprocess, max_image_pixels=12_000_000)
    detector = configs(settings, "torch")[repository.DETECTOR]
    inputs = {t.name: t.optional for t in detector.input}
    faces = set(repository.OUTPUTS)
    if decodes:  # either input, never both: Triton batches only requests with the same inputs
        assert inputs == {"images": True, "letterbox": True, "image": True}
        assert set(tensors(detector, "output")) == faces | {"image_size"}
        assert detector.parameters["max_pixels"].string_value == "12000000"
    else:  # letterbox rows optional: a client of the detector alone gets faces in network pixels
        assert inputs == {"images": False, "letterbox": True}
        assert set(tensors(detector, "output")) == faces and "max_pixels" not in detector.parameters


@pytest.mark.parametrize("backend, steps, postprocess_instances", [
    ("torch", [repository.DETECTOR], 1),  # finishes its detections itself; the postprocess answers its own clients
    ("onnxruntime", [repository.DETECTOR, repository.POSTPROCESS], 2),
    ("tensorrt", [repository.DETECTOR, repository.POSTPROCESS], 8)])
def test_the_torch_build_serves_each_request_in_one_step(backend, steps, postprocess_instances):
    parsed = configs(BuildSettings(max_detections=1200), backend)
    assert [step.model_name for step in parsed[repository.ENSEMBLE].ensemble_scheduling.step] == steps
    (group,) = parsed[repository.POSTPROCESS].instance_group
    assert group.count == postprocess_instances
    if backend == "torch":  # the detector's postprocess takes the postprocess's own parameters
        detector, postprocess = parsed[repository.DETECTOR].parameters, parsed[repository.POSTPROCESS].parameters
        assert {k: v.string_value for k, v in postprocess.items()} == {k: detector[k].string_value for k in postprocess}
        assert detector["max_detections"].string_value == "1200"


def test_the_pixels_only_copy_of_a_torch_build_has_a_detector_perf_analyzer_can_call_over_shared_memory(tmp_path):
    """``gpu_figures.sh hop`` calls the torch detector directly: perf_analyzer refuses optional
    inputs over shared memory, so its copy has the detector's pixel inputs required, no encoded
    input or output, no warm-up, and no encoded ensemble; the pixel ensemble still fits it."""
    from google.protobuf import text_format
    from tools.bench.ensemble_hop import write_pixels_only

    settings = BuildSettings(repository=tmp_path / "build")
    for name, text in render(Plan.resolve(settings, "torch")).items():
        (tmp_path / "build" / name).mkdir(parents=True)
        (tmp_path / "build" / name / "config.pbtxt").write_text(text)
    copy = write_pixels_only(tmp_path / "build", tmp_path / "copy")
    parsed = {path.parent.name: text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
              for path in copy.glob("*/config.pbtxt")}
    assert repository.ENCODED not in parsed
    detector = parsed[repository.DETECTOR]
    assert {t.name: t.optional for t in detector.input} == {"images": False, "letterbox": False}
    assert set(tensors(detector, "output")) == set(repository.OUTPUTS) and not detector.model_warmup
    original = configs(settings, "torch")[repository.DETECTOR]
    assert detector.parameters == original.parameters and detector.instance_group == original.instance_group
    step, = parsed[repository.ENSEMBLE].ensemble_scheduling.step
    assert set(step.input_map) == {t.name for t in detector.input}
