"""The served ensemble, over raw tritonclient gRPC, against a real tritonserver."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from rtface_client.letterbox import letterbox
from tritonclient.utils import InferenceServerException

from tests.conftest import infer_raw
from tools.matching import iou_matrix, match_boxes
from tools.engine.reference import Detections, clip_to_image
from tools.sample_images import ASTRONAUT_FACE, astronaut, face_canvas, selfie
from tools.server_info import max_detections, topk

W, H = 1280, 960


def served(outputs: dict, index: int, size: tuple[int, int]) -> Detections:
    n = int(outputs["num_detections"][index, 0])
    det = Detections(outputs["boxes"][index, :n], outputs["scores"][index, :n], outputs["landmarks"][index, :n])
    return clip_to_image(det, *size)


def assert_same_faces(got: Detections, expected: Detections) -> None:
    """Every reference face matched at IoU >= 0.95 with |dscore| < 1e-3, and no extra faces."""
    matches = match_boxes(expected.boxes, got.boxes, 0.95)
    assert (matches >= 0).all(), f"{(matches < 0).sum()} of {len(matches)} reference faces unmatched"
    assert len(got.boxes) == len(expected.boxes), "extra faces"
    assert np.abs(got.scores[matches] - expected.scores).max(initial=0) < 1e-3


def real_images() -> dict[str, np.ndarray]:
    images = {"astronaut": astronaut(), "canvas-a": face_canvas(11).image,
              "canvas-b": face_canvas(12, 1920, 1080, count=8).image,
              "canvas-small": face_canvas(13, 640, 400, count=3).image}
    crowd = selfie()
    if crowd is not None:
        images["selfie"] = crowd
    return images


def test_astronaut_has_one_face_on_the_true_face_with_landmarks_inside(grpc_url):
    pixels, placement = letterbox(astronaut(), W, H)
    out = infer_raw(grpc_url, pixels[None], placement.as_row()[None])
    assert out["num_detections"][0, 0] == 1
    box = out["boxes"][0, 0]
    assert iou_matrix(box, np.array(ASTRONAUT_FACE))[0, 0] >= 0.8
    points = out["landmarks"][0, 0]
    assert np.all((points >= box[:2]) & (points <= box[2:]))
    assert not out["boxes"][0, 1:].any() and not out["scores"][0, 1:].any()


@pytest.mark.parametrize("name", list(real_images()))
def test_served_detections_equal_the_reference_pipeline(grpc_url, reference, name):
    image = real_images()[name]
    pixels, placement = letterbox(image, W, H)
    out = infer_raw(grpc_url, pixels[None], placement.as_row()[None])
    (expected,) = reference.detect(pixels[None], [placement.scale])
    size = (image.shape[1], image.shape[0])
    assert_same_faces(served(out, 0, size), clip_to_image(expected, *size))
    assert len(expected.boxes) >= (1 if name == "astronaut" else 3)


def test_canvas_faces_are_found_where_they_were_pasted(grpc_url):
    canvas = face_canvas(21, 1600, 1200, count=6)
    pixels, placement = letterbox(canvas.image, W, H)
    got = served(infer_raw(grpc_url, pixels[None], placement.as_row()[None]), 0, (1600, 1200))
    assert (match_boxes(canvas.faces, got.boxes, 0.5) >= 0).all()


def test_batches_give_the_same_faces_as_single_requests(grpc_url):
    images = [face_canvas(100 + i, 400 + 97 * i, 300 + 61 * i, count=2).image for i in range(16)]
    boxed = [letterbox(image, W, H) for image in images]
    singles = [infer_raw(grpc_url, p[None], lb.as_row()[None]) for p, lb in boxed]
    for size in (1, 3, 16):
        order = np.random.default_rng(size).permutation(16)[:size]
        batch = infer_raw(grpc_url, np.stack([boxed[i][0] for i in order]),
                          np.stack([boxed[i][1].as_row() for i in order]))
        for row, i in enumerate(order):
            for name in ("num_detections", "boxes", "scores", "landmarks"):
                np.testing.assert_allclose(batch[name][row], singles[i][name][0], atol=1e-3, rtol=1e-5)


def test_concurrent_clients_get_their_own_results(grpc_url):
    canvases = [face_canvas(200 + i, count=1 + i % 4) for i in range(12)]

    def ask(canvas):
        """One client; like any client of a busy server it retries what the queue turned away."""
        pixels, placement = letterbox(canvas.image, W, H)
        for _ in range(200):
            try:
                return served(infer_raw(grpc_url, pixels[None], placement.as_row()[None]), 0, (W, H))
            except InferenceServerException as exc:
                if "queue" not in exc.message():
                    raise
                time.sleep(0.05)
        raise AssertionError("the server never accepted the request")

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, canvases))
    for canvas, got in zip(canvases, results):
        assert len(got.boxes) == len(canvas.faces)
        assert (match_boxes(canvas.faces, got.boxes, 0.5) >= 0).all()


def test_request_parameters_reach_the_postprocess_step(grpc_url):
    pixels, placement = letterbox(face_canvas(31, count=6).image, W, H)
    args = (grpc_url, pixels[None], placement.as_row()[None])
    assert infer_raw(*args)["num_detections"][0, 0] == 6
    assert infer_raw(*args, {"max_detections": 2})["num_detections"][0, 0] == 2
    assert infer_raw(*args, {"score_threshold": 0.9999999})["num_detections"][0, 0] == 0
    loose = infer_raw(*args, {"score_threshold": 0.02, "iou_threshold": 0.9})["num_detections"][0, 0]
    assert loose > 6


def textbook_nms(rows: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS one box at a time, in float64: the rows kept, best score first."""
    kept = []
    for row in rows:
        x1, y1, x2, y2 = row[:4].astype(np.float64)
        area = max(x2 - x1, 0) * max(y2 - y1, 0)
        for other in kept:
            w = min(x2, other[2]) - max(x1, other[0])
            h = min(y2, other[3]) - max(y1, other[1])
            inter = max(w, 0) * max(h, 0)
            union = area + max(other[2] - other[0], 0) * max(other[3] - other[1], 0) - inter
            if union > 0 and inter / union > iou_threshold:
                break
        else:
            kept.append(row)
    return np.array(kept, dtype=np.float32).reshape(-1, 15)


def crafted_candidates(rng: np.random.Generator, topk: int) -> np.ndarray:
    """Four images of candidates sorted by score: face-like clusters of jittered boxes, boxes of
    every size (some empty or inverted), sliding chains with exact duplicates, and rows with
    NaN/inf mixed in: ``rows`` of them (at most 2,000, so the textbook NMS stays quick), the rest
    of the ``topk`` rows zeros, below any threshold."""
    rows = min(topk, 2000)

    def boxes(corner, size):
        return np.concatenate([corner, corner + size], axis=1)

    centres = np.repeat(rng.uniform(50, 1200, (rows // 25, 2)), 25, axis=0)
    sizes = np.repeat(rng.uniform(12, 120, (rows // 25, 1)), 25, axis=0) * rng.uniform(0.8, 1.2, (len(centres), 2))
    clusters = boxes(centres + rng.normal(0, 4, centres.shape) - sizes / 2, sizes)
    mixed = boxes(rng.uniform(0, 1200, (rows, 2)), rng.uniform(-20, 300, (rows, 2)))
    mixed[::7, 2:] = mixed[::7, :2]
    steps = np.arange(rows)[:, None] * np.array([[1.5, 0.25]])
    chains = boxes(np.repeat(rng.uniform(0, 600, (4, 2)), rows // 4, axis=0) + np.tile(steps[:rows // 4], (4, 1)),
                   np.full((rows, 2), 40.0))
    chains[1::10] = chains[0::10]
    broken = boxes(rng.uniform(0, 1200, (rows, 2)), rng.uniform(5, 200, (rows, 2)))
    broken[::9, 0] = np.nan
    broken[1::9, 3] = np.inf
    out = np.zeros((4, topk, 15), dtype=np.float32)
    for i, coords in enumerate((clusters, mixed, chains, broken)):
        out[i, : len(coords), :4] = coords
        out[i, :rows, 4] = np.sort(rng.uniform(0.3, 1.0, rows))[::-1]
        out[i, :rows, 5:] = np.repeat(out[i, :rows, :2], 5, axis=0).reshape(rows, 10) + rng.uniform(0, 10, (rows, 10))
    out[3, 2:rows:9, 4] = np.nan
    return out


def postprocess_topk(url: str) -> int:
    """The most candidates per image the served postprocess takes (TOPK)."""
    chunks, per_chunk = topk(url)
    return chunks * per_chunk


def infer_postprocess(url: str, candidates: np.ndarray, parameters: dict | None = None) -> dict[str, np.ndarray]:
    """One request straight to the postprocess model, identity letterbox rows; outputs by name."""
    rows = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (len(candidates), 1))
    inputs = [grpcclient.InferInput("candidates", list(candidates.shape), "FP32"),
              grpcclient.InferInput("letterbox", list(rows.shape), "FP32")]
    inputs[0].set_data_from_numpy(candidates)
    inputs[1].set_data_from_numpy(rows)
    result = grpcclient.InferenceServerClient(url).infer("retinaface_postprocess", inputs, parameters=parameters)
    return {name: result.as_numpy(name) for name in ("num_detections", "boxes", "scores", "landmarks", "capped")}


def test_postprocess_keeps_exactly_what_textbook_greedy_nms_keeps(grpc_url):
    candidates = crafted_candidates(np.random.default_rng(7), postprocess_topk(grpc_url))
    for iou_threshold in (0.4, 0.7):
        out = infer_postprocess(grpc_url, candidates, {"iou_threshold": iou_threshold})
        for i, image in enumerate(candidates):
            passing = image[image[:, 4] > 0.5]
            expected = textbook_nms(passing[np.isfinite(passing).all(axis=1)], iou_threshold)
            n = int(out["num_detections"][i, 0])
            assert n == len(expected) > 1, (i, iou_threshold)
            np.testing.assert_array_equal(out["scores"][i, :n], expected[:, 4])
            np.testing.assert_allclose(out["boxes"][i, :n],
                                       np.clip(expected[:, :4].reshape(-1, 2, 2), 0, [W, H]).reshape(-1, 4))


def detector_candidates(url: str, frames: np.ndarray, threshold: float) -> np.ndarray:
    """The detector's ``candidates`` for ``frames`` requested at ``threshold``, as the ensemble's
    first step gets it."""
    tensor = grpcclient.InferInput("images", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames)
    result = grpcclient.InferenceServerClient(url).infer("retinaface_detector", [tensor],
                                                         parameters={"score_threshold": threshold})
    return result.as_numpy("candidates")


def test_trimmed_candidates_give_exactly_the_faces_of_all_topk_rows(grpc_url):
    """The detector hands on each top-K chunk only down to the last row some image passes at the
    request's threshold: far fewer rows for ordinary frames, and the postprocess finds the same
    faces, bit for bit, with the same cap flags, as from all TOPK rows."""
    crowd = selfie() if selfie() is not None else face_canvas(6, 1920, 1080, 12).image
    frames = np.stack([letterbox(image, W, H)[0] for image in (astronaut(), crowd)])
    full = detector_candidates(grpc_url, frames, 0.0)  # every anchor scores above 0
    assert full.shape[1] == postprocess_topk(grpc_url)
    alone = detector_candidates(grpc_url, frames[:1], 0.5)
    assert alone.shape[1] <= full.shape[1] // 20  # one face: a few rows of each chunk
    for threshold in (0.02, 0.5, 0.9):
        trimmed = detector_candidates(grpc_url, frames, threshold)
        assert trimmed.shape[1] % 3 == 0 and trimmed.shape[1] < full.shape[1]
        expected = infer_postprocess(grpc_url, full, {"score_threshold": threshold})
        found = infer_postprocess(grpc_url, trimmed, {"score_threshold": threshold})
        assert expected["num_detections"][0, 0] >= 1
        for name in expected:
            np.testing.assert_array_equal(found[name], expected[name], err_msg=f"{name} at {threshold}")


def test_candidates_that_do_not_fit_the_chunk_layout_get_an_error(grpc_url):
    rows = postprocess_topk(grpc_url) + 3
    with pytest.raises(InferenceServerException, match="top-K chunk"):
        infer_postprocess(grpc_url, np.zeros((1, rows, 15), np.float32))
    with pytest.raises(InferenceServerException, match="top-K chunk"):
        infer_postprocess(grpc_url, np.zeros((1, 10, 15), np.float32))  # not a multiple of the chunks
    assert infer_postprocess(grpc_url, np.zeros((1, 3, 15), np.float32))["num_detections"][0, 0] == 0


def float32_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box pairs ``a[k]``, ``b[k]`` [K, 4] float32, each step rounded as the postprocess
    rounds it."""
    width = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0)
    height = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0)
    inter = width * height
    area = lambda box: np.maximum(box[:, 2] - box[:, 0], 0) * np.maximum(box[:, 3] - box[:, 1], 0)
    return inter / np.maximum(area(a) + area(b) - inter, np.finfo(np.float32).tiny)


def test_nms_decides_pairs_at_the_iou_threshold_exactly_as_float32_arithmetic_does(grpc_url):
    """Thousands of pairs whose IoU sits within a few float32 steps of the threshold: a box and,
    ranked below it, a box of the same height flush with its right edge and ``threshold`` of its
    width wide (the tightest case for the sweep's reach), its left edge nudged by -3..3 float32
    steps. Pairs lie apart on a grid; every pair's decision matches the float32 IoU test."""
    rng = np.random.default_rng(11)
    images, pairs = 8, min(postprocess_topk(grpc_url), max_detections(grpc_url)) // 2  # every box may be kept
    column, row = np.divmod(np.arange(pairs), 64)
    for threshold in (0.45, 0.5, 0.7):
        t = np.float32(threshold)
        x0 = (column * 800 + rng.uniform(0, 90, (images, pairs))).astype(np.float32)
        y0 = (row * 400 + rng.uniform(0, 90, (images, pairs))).astype(np.float32)
        width = rng.uniform(1, 700, (images, pairs)).astype(np.float32)
        height = rng.uniform(1, 300, (images, pairs)).astype(np.float32)
        first = np.stack([x0, y0, x0 + width, y0 + height], axis=-1)
        start = first[..., 2] - t * (first[..., 2] - first[..., 0])
        for step in range(3):  # nudge each left edge by -3..3 float32 steps
            nudge = rng.integers(-1, 2, start.shape)
            toward = np.where(nudge > 0, np.inf, -np.inf).astype(np.float32)
            start = np.where(nudge != 0, np.nextafter(start, toward), start)
        second = np.concatenate([start[..., None], first[..., 1:]], axis=-1)
        suppressed = (float32_ious(first.reshape(-1, 4), second.reshape(-1, 4)) > t).reshape(images, pairs)
        assert 0 < suppressed.mean() < 1  # both sides of the threshold
        candidates = np.zeros((images, 2 * pairs, 15), np.float32)
        candidates[:, 0::2, :4], candidates[:, 1::2, :4] = first, second
        candidates[:, :, 4] = np.linspace(0.99, 0.6, 2 * pairs)
        out = infer_postprocess(grpc_url, candidates, {"iou_threshold": threshold})
        np.testing.assert_array_equal(out["num_detections"][:, 0], 2 * pairs - suppressed.sum(axis=1))
        for i in range(images):  # the lower box of each suppressed pair is the one missing
            kept = out["scores"][i, : out["num_detections"][i, 0]]
            np.testing.assert_array_equal(kept, candidates[i, :, 4][~np.repeat(suppressed[i], 2) |
                                                                    (np.arange(2 * pairs) % 2 == 0)])


def test_postprocess_handles_a_full_batch_of_one_box_repeated(grpc_url):
    """16 images whose every candidate is the same box: each image keeps exactly that box."""
    topk = postprocess_topk(grpc_url)
    candidates = np.zeros((16, topk, 15), np.float32)
    candidates[..., :4] = (100, 120, 300, 330)
    candidates[..., 4] = np.linspace(0.99, 0.6, topk)
    out = infer_postprocess(grpc_url, candidates)
    assert (out["num_detections"] == 1).all()
    np.testing.assert_array_equal(out["boxes"][:, 0], np.tile([[100, 120, 300, 330]], (16, 1)))
    np.testing.assert_allclose(out["scores"][:, 0], 0.99)
    assert out["boxes"].shape == (16, 1, 4)  # one row each: responses hold only the rows they need


def test_postprocess_handles_more_overlapping_candidates_than_it_compares_at_once(grpc_url):
    """One image of TOPK stacked strips, each spanning the frame's width, none overlapping the
    next: every pair meets in x, too many pairs to compare at once, so NMS goes box by box. All
    strips are faces; MAX_DET of them come back and the response says the cap was reached."""
    topk = postprocess_topk(grpc_url)
    candidates = np.zeros((1, topk, 15), np.float32)
    candidates[0, :, 0], candidates[0, :, 2] = 0, W
    candidates[0, :, 1] = np.arange(topk) * 0.2
    candidates[0, :, 3] = candidates[0, :, 1] + 0.1
    candidates[0, :, 4] = np.linspace(0.99, 0.6, topk)
    out = infer_postprocess(grpc_url, candidates)
    limit = out["boxes"].shape[1]
    assert int(out["num_detections"][0, 0]) == limit == min(topk, max_detections(grpc_url))
    np.testing.assert_array_equal(out["scores"][0], candidates[0, :limit, 4])
    assert out["capped"][0, 0] & 2 or limit == topk


def _bad_requests():
    good, placement = letterbox(astronaut(), W, H)
    row = placement.as_row()[None]
    return {
        "float images": (good[None].astype(np.float32), row, None, "FP32"),
        "wrong height/width": (np.zeros((1, 480, 640, 3), np.uint8), row, None, "UINT8"),
        "batch over max": (np.zeros((17, H, W, 3), np.uint8), np.tile(row, (17, 1)), None, "UINT8"),
        "missing letterbox": (good[None], None, None, "UINT8"),
        "NaN scale": (good[None], np.array([[np.nan, 0, 0]], np.float32), None, "UINT8"),
        "negative scale": (good[None], np.array([[-1, 0, 0]], np.float32), None, "UINT8"),
        "zero scale": (good[None], np.array([[0, 0, 0]], np.float32), None, "UINT8"),
        "letterbox rows != images": (good[None], np.tile(row, (2, 1)), None, "UINT8"),
        "score threshold > 1": (good[None], row, {"score_threshold": 1.5}, "UINT8"),
        "iou threshold 0": (good[None], row, {"iou_threshold": 0.0}, "UINT8"),
        "max detections 0": (good[None], row, {"max_detections": 0}, "UINT8"),
        "max detections over MAX_DET": (good[None], row, {"max_detections": 100000}, "UINT8"),
        "threshold not a number": (good[None], row, {"score_threshold": "high"}, "UINT8"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_request_gets_an_error_status_and_the_server_keeps_serving(grpc_url, case):
    images, rows, params, dtype = _bad_requests()[case]
    with pytest.raises(InferenceServerException) as error:
        infer_raw(grpc_url, images, rows, params, images_dtype=dtype)
    assert error.value.message()
    pixels, placement = letterbox(astronaut(), W, H)
    assert infer_raw(grpc_url, pixels[None], placement.as_row()[None])["num_detections"][0, 0] == 1
    assert grpcclient.InferenceServerClient(grpc_url).is_server_ready()


def test_responses_hold_only_the_rows_the_most_crowded_image_needs(grpc_url):
    one, placement = letterbox(astronaut(), W, H)
    four, four_placement = letterbox(face_canvas(5, 1280, 960, 4).image, W, H)
    alone = infer_raw(grpc_url, one[None], placement.as_row()[None])
    assert alone["boxes"].shape == (1, 1, 4) and alone["landmarks"].shape == (1, 1, 5, 2)
    both = infer_raw(grpc_url, np.stack([one, four]), np.stack([placement.as_row(), four_placement.as_row()]))
    assert both["num_detections"].ravel().tolist() == [1, 4]
    assert both["boxes"].shape == (2, 4, 4) and not both["boxes"][0, 1:].any()
    np.testing.assert_allclose(both["boxes"][0, :1], alone["boxes"][0], atol=1e-3)
