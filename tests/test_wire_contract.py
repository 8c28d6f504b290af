"""The wire contract's copies agree: what the SDK sends and reads (``rtface_client``), what the
configs declare (``tools.engine``), and what the server models set (``model_repository``). The SDK
states its side itself (it imports nothing from the server's side), so these copies are checked
here instead of shared."""

from __future__ import annotations

import ast

import numpy as np
import pytest
from rtface_client import client as sdk
from rtface_client.transport import OUTPUT_LAYOUT
from tritonclient.grpc import model_config_pb2

from tests.conftest import configs, load_model_file
from tools.engine import repository
from tools.settings import MODEL_REPOSITORY, BuildSettings

DTYPES = {model_config_pb2.TYPE_INT32: np.int32, model_config_pb2.TYPE_FP32: np.float32}
BACKENDS = ("onnxruntime", "tensorrt", "torch")


def constants(path, *names):
    """Module-level constants (literals) of a file that imports torch, read without importing it."""
    values = {}
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.Assign):
            continue
        target = node.targets[0]
        pairs = zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple) else [(target, node.value)]
        values.update((t.id, ast.literal_eval(v)) for t, v in pairs if getattr(t, "id", None) in names)
    return [values[name] for name in names]


def test_the_sdk_calls_the_models_the_repository_holds():
    assert (sdk.MODEL_NAME, sdk.ENCODED_MODEL_NAME) == (repository.ENSEMBLE, repository.ENCODED)
    assert (sdk.DETECTOR_NAME, sdk.PREPROCESS_NAME, sdk.POSTPROCESS_NAME) == (
        repository.DETECTOR, repository.PREPROCESS, repository.POSTPROCESS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sdks_outputs_are_the_ensembles_outputs_in_name_type_and_shape(backend):
    for name in (repository.ENSEMBLE, repository.ENCODED):
        declared = {t.name: (DTYPES.get(t.data_type), tuple(None if d == -1 else d for d in t.dims))
                    for t in configs(BuildSettings(), backend)[name].output}
        assert tuple(OUTPUT_LAYOUT) == repository.OUTPUTS
        for output, (dtype, shape) in OUTPUT_LAYOUT.items():
            assert declared[output] == (dtype, shape), (name, output)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sdks_inputs_are_the_ensembles_inputs(backend):
    parsed = configs(BuildSettings(), backend)
    assert {t.name for t in parsed[repository.ENSEMBLE].input} == {"images", "letterbox"}
    assert {t.name for t in parsed[repository.ENCODED].input} == {"image"}


def test_the_capped_bits_and_the_options_are_the_same_everywhere():
    post = load_model_file(MODEL_REPOSITORY / "shared_postprocess.py")
    gpu = constants(MODEL_REPOSITORY / repository.DETECTOR / "1" / "gpu_detections.py",
                    "CANDIDATES_CAPPED", "FACES_CAPPED", "PARAMETERS")
    assert (sdk.CANDIDATES_CAPPED, sdk.FACES_CAPPED) == (post.CANDIDATES_CAPPED, post.FACES_CAPPED) == tuple(gpu[:2])
    assert tuple(gpu[2][:3]) == tuple(post.OPTION_TYPES)  # the GPU path's per-image options, in order
    client = sdk.Client.__init__.__code__.co_varnames
    assert set(post.OPTION_TYPES) <= set(client)  # every option is a Client keyword
