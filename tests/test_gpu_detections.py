"""The postprocess the torch detector runs inside its CUDA graphs (``gpu_detections.py``) against
the numpy postprocess (``shared_postprocess.py``) on the same real candidates: the same faces,
bit for bit, or the image flagged for the next path. It runs wherever PyTorch imports: on the CPU
(CI installs PyTorch's CPU build) it checks the arithmetic and the flags; on a GPU (marked
``gpu``) it checks that CUDA's kernels give the same bits.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from rtface_client.letterbox import letterbox

from tests.conftest import load_model_file
from tools.engine.repository import DETECTOR
from tools.engine.source import load_source_model
from tools.engine.surgery import rewrite
from tools.sample_images import astronaut, face_canvas, selfie
from tools.settings import MODEL_REPOSITORY, BuildSettings, topk_plan

torch = pytest.importorskip("torch", reason="needs PyTorch (its CPU build will do): pip install torch")
gpu = load_model_file(MODEL_REPOSITORY / DETECTOR / "1" / "gpu_detections.py")
trim = load_model_file(MODEL_REPOSITORY / DETECTOR / "1" / "trim_layout.py")
post = load_model_file(MODEL_REPOSITORY / "shared_postprocess.py")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")])]
OPTIONS = [{"score_threshold": 0.5, "iou_threshold": 0.4, "max_detections": 3000},
           {"score_threshold": 0.3, "iou_threshold": 0.3, "max_detections": 4},
           {"score_threshold": 0.02, "iou_threshold": 0.4, "max_detections": 3000}]


@pytest.fixture(scope="module")
def batch():
    """Real candidates of the default build's rewritten graph (onnxruntime) for a portrait, two
    canvases of faces and the crowd photo, in the detector's trim layout, with their letterbox rows
    and the numpy postprocess of the default build."""
    s = BuildSettings()
    chunks, per_chunk = topk_plan(s.topk)
    images = [astronaut(), face_canvas(2, 1920, 1080, 8).image, face_canvas(5, 1280, 960, 12).image]
    images += [selfie()] if selfie() is not None else [face_canvas(6, 1920, 1080, 40).image]
    boxed = [letterbox(image, s.input_width, s.input_height) for image in images]
    model, _ = rewrite(load_source_model().load(), s.input_width, s.input_height, s.topk)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    candidates = np.concatenate([session.run(None, {"images": frame[None]})[0] for frame, _ in boxed])
    candidates[0, 1, 6] = np.nan  # a non-finite row is skipped by both
    rows = np.stack([placement.as_row() for _, placement in boxed]).astype(np.float32)
    layout = trim.TrimLayout(lambda _: (torch.from_numpy(candidates),), chunks)  # the served layout, on these
    (by_position,) = layout(None)
    by_position = by_position.numpy()
    numpy_post = post.Postprocess({"max_detections": str(s.max_detections), "topk_chunks": str(chunks),
                                   "topk_per_chunk": str(per_chunk), "network_width": str(s.input_width),
                                   "network_height": str(s.input_height), "score_threshold": "0.5",
                                   "iou_threshold": "0.4"})
    return candidates, by_position, rows, numpy_post


def detect_on(device, rows_held, by_position, rows, options):
    """:class:`gpu_detections.GpuDetections` of ``rows_held`` rows on ``device``: each image's Found."""
    module = gpu.GpuDetections(1280, 960, rows=rows_held).to(device)
    parameters = torch.tensor([[options["score_threshold"], options["iou_threshold"], options["max_detections"], *row]
                               for row in rows], device=device)
    with torch.inference_mode():
        packed = module(torch.from_numpy(by_position).to(device), parameters).cpu().numpy()
    return [gpu.unpack(row, rows_held) for row in packed]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows_held", [gpu.ROWS, 4 * gpu.ROWS])
def test_gpu_detections_equal_the_numpy_postprocess_bit_for_bit(batch, device, rows_held):
    candidates, by_position, rows, numpy_post = batch
    settled = 0
    for options in OPTIONS:
        for i, found in enumerate(detect_on(device, rows_held, by_position, rows, options)):
            above = int((candidates[i, :, 4] > options["score_threshold"]).sum())
            assert found.above == above
            if found.unsettled:
                assert above > rows_held or options["score_threshold"] < 0.1, (i, options)
                continue
            settled += 1
            expected = numpy_post.detect(candidates[i:i + 1], rows[i:i + 1], options)
            n = found.count
            assert (n, found.capped) == (expected["num_detections"].item(), expected["capped"].item()), (i, options)
            np.testing.assert_array_equal(found.faces[:n, :4], expected["boxes"][0, :n], err_msg=f"{i} {options}")
            np.testing.assert_array_equal(found.faces[:n, 4], expected["scores"][0, :n])
            np.testing.assert_array_equal(found.faces[:n, 5:].reshape(n, 5, 2), expected["landmarks"][0, :n])
            assert not found.faces[n:].any()
    assert settled >= 2 * len(OPTIONS)  # the portrait and the smaller canvas at every option set


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_captured_gpu_detections_equal_the_same_module_run_eagerly(batch):
    """The postprocess replayed as the detector replays it (``graph_replay.GraphReplay``: options
    and letterbox rows read from page-locked memory, faces written back there, one graph per
    bucket) gives what the same module gives run eagerly, image by image and in one batch."""
    replay_module = load_model_file(MODEL_REPOSITORY / DETECTOR / "1" / "graph_replay.py")
    _, by_position, rows, _ = batch
    module = gpu.GpuDetections(1280, 960).to("cuda")
    options = OPTIONS[0]
    parameters = np.array([[options["score_threshold"], options["iou_threshold"], options["max_detections"], *row]
                           for row in rows], dtype=np.float32)
    candidates = torch.zeros(by_position.shape, device="cuda")  # what the network would write, filled per replay
    replay = replay_module.GraphReplay(lambda images, values: module(candidates[:len(images)], values),
                                       (960, 1280, 3), [1, 2, 4], torch.device("cuda"),
                                       per_image=[(len(gpu.PARAMETERS),)], to_host=[0])
    with torch.inference_mode():
        eager = module(torch.from_numpy(by_position).cuda(), torch.from_numpy(parameters).cuda()).cpu().numpy()
        for group in [[i] for i in range(len(rows))] + [list(range(len(rows)))]:
            candidates[:len(group)] = torch.from_numpy(by_position[group]).cuda()
            replay.host_inputs(len(group))[0][...] = parameters[group]
            replay.replay(len(group))
            torch.cuda.synchronize()
            np.testing.assert_array_equal(replay.host_outputs(len(group))[0], eager[group], err_msg=f"images {group}")


def test_chunk_major_gives_back_the_candidates_the_trim_layout_took(batch):
    """What a crowd's numpy postprocess gets (``trim_layout.chunk_major`` of the graph's output)
    is the detector's candidates as it wrote them, chunk after chunk."""
    candidates, by_position, _, _ = batch
    np.testing.assert_array_equal(trim.chunk_major(torch.from_numpy(by_position)).numpy(), candidates)


def test_a_requests_outputs_from_the_gpu_path_equal_the_numpy_postprocess(batch):
    """What the detector sends for a request whose images all settled on the GPU
    (``gpu_detections.faces_outputs``) is what the numpy postprocess sends for it: the same
    arrays, shapes and dtypes, face rows as many as its image with the most faces."""
    candidates, by_position, rows, numpy_post = batch
    options = OPTIONS[0]
    found = detect_on("cpu", gpu.ROWS, by_position[:3], rows[:3], options)
    assert not any(f.unsettled for f in found) and len({f.count for f in found}) > 1
    expected = numpy_post.detect(candidates[:3], rows[:3], options)
    served = gpu.faces_outputs(found)
    assert served.keys() == expected.keys()
    for name, array in expected.items():
        assert served[name].dtype == array.dtype and served[name].shape == array.shape, name
        np.testing.assert_array_equal(served[name], array, err_msg=name)
