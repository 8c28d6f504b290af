"""WIDER FACE evaluation protocol (tools/evaluation/wider_protocol.py) on small cases worked out by hand.

Boxes are x, y, w, h in pixels; with the official +1 convention a box (x, y, w, h) covers
(w + 1) x (h + 1) pixels. Scores are min-max normalised over the whole set before thresholding at
t = 0.999, 0.998, ..., 0.0, so after normalisation the lowest-scored prediction passes only the
last threshold (0.0) and the highest passes all of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from tools.evaluation.wider_protocol import (average_precision, evaluate, normalize_scores,
                              read_prediction_file, read_predictions, score_thresholds,
                              wider_iou, write_predictions)

FACE_A = [0, 0, 10, 10]
FACE_B = [40, 0, 10, 10]
NOWHERE = [200, 200, 10, 10]


def one_image_ap(preds: list[list[float]], faces: list[list[float]],
                 counts: list[bool] | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """AP, precision and recall of a single image."""
    keep = [True] * len(faces) if counts is None else counts
    return average_precision({"im": np.array(preds, float)}, {"im": np.array(faces, float)},
                             {"im": np.array(keep)})


def test_thresholds_are_the_official_ones():
    cuts = score_thresholds()
    assert len(cuts) == 1000
    assert cuts[0] == 1 - 1 / 1000 and cuts[499] == 0.5 and cuts[-1] == 0.0


def test_iou_uses_the_plus_one_pixel_convention():
    # (0,0,10,10) covers 11 x 11 pixels. (10,0,10,10) shares the column x = 10: 1 x 11 = 11 pixels,
    # union 121 + 121 - 11 = 231 -> 1/21 (a continuous-coordinate IoU would give 0).
    assert wider_iou(np.array([FACE_A]), np.array([[10, 0, 10, 10]]))[0, 0] == pytest.approx(
        1 / 21, rel=1e-12)
    # (0,0,9,9): 10 x 10 = 100 pixels inside (0,0,19,9): 20 x 10 = 200 pixels -> exactly 0.5.
    assert wider_iou(np.array([[0, 0, 9, 9]]), np.array([[0, 0, 19, 9]]))[0, 0] == 0.5


def test_iou_of_exactly_half_counts_as_a_hit():
    # IoU 0.5 (previous test) meets the >= 0.5 rule: one face, one true positive -> AP 1.0.
    ap, _, _ = one_image_ap([[0, 0, 9, 9, 0.8]], [[0, 0, 19, 9]])
    assert ap == 1.0


def test_perfect_predictions():
    # Scores 0.9, 0.8 -> 1.0, 0.0. Thresholds > 0: 1 proposal, 1 hit (P 1, R 1/2); threshold 0:
    # 2 proposals, 2 hits (P 1, R 1). Envelope is 1 everywhere: AP = 1/2 * 1 + 1/2 * 1 = 1.0.
    ap, precision, recall = one_image_ap([FACE_A + [0.9], FACE_B + [0.8]], [FACE_A, FACE_B])
    assert ap == 1.0
    assert np.all(precision == 1.0)
    assert np.all(recall[:-1] == 0.5) and recall[-1] == 1.0


def test_one_missed_face_gives_half():
    # Two faces; A is found (0.9 -> 1.0) and found again (0.3 -> 0.0): the duplicate is a false
    # positive and recalls nothing. B is never found. Recall never passes 1/2; precision is 1 at
    # thresholds > 0 and 1/2 at 0. Envelope at recall 1/2 is 1: AP = 1/2 * 1 = 0.5.
    ap, precision, recall = one_image_ap([FACE_A + [0.9], FACE_A + [0.3]], [FACE_A, FACE_B])
    assert ap == 0.5
    assert precision[0] == 1.0 and precision[-1] == 0.5
    assert np.all(recall == 0.5)


def test_false_positive_ranked_above_the_true_one():
    # FP 0.9 -> 1.0, TP 0.5 -> 0.0. Thresholds > 0: 1 proposal, 0 hits (P 0, R 0); threshold 0:
    # 2 proposals, 1 hit (P 1/2, R 1). AP = (1 - 0) * 1/2 = 0.5.
    ap, precision, recall = one_image_ap([NOWHERE + [0.9], FACE_A + [0.5]], [FACE_A])
    assert ap == 0.5
    assert np.all(precision[:-1] == 0.0) and precision[-1] == 0.5
    assert np.all(recall[:-1] == 0.0) and recall[-1] == 1.0


def test_false_positive_ranked_below_the_true_one():
    # TP 0.9 -> 1.0, FP 0.5 -> 0.0. Thresholds > 0: P 1, R 1; threshold 0: P 1/2, R 1.
    # Recall reaches 1 with envelope precision 1: AP = 1.0.
    ap, precision, _ = one_image_ap([FACE_A + [0.9], NOWHERE + [0.5]], [FACE_A])
    assert ap == 1.0
    assert precision[-1] == 0.5


def test_false_positive_between_two_hits_follows_the_thresholds():
    # Raw scores 1.0 (A), 0.5 (FP), 0.0 (B) are already normalised. Thresholds 0.999 .. 0.501
    # (first 499): 1/1 proposals, R 1/2. Thresholds 0.5 .. 0.001 (next 500): 2 proposals, 1 hit,
    # R 1/2. Threshold 0: 3 proposals, 2 hits, R 1. AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    ap, precision, recall = one_image_ap(
        [FACE_A + [1.0], NOWHERE + [0.5], FACE_B + [0.0]], [FACE_A, FACE_B])
    assert ap == pytest.approx(5 / 6, rel=1e-12)
    assert np.all(precision[:499] == 1.0) and np.all(precision[499:999] == 0.5)
    assert precision[999] == pytest.approx(2 / 3, rel=1e-12)
    assert np.all(recall[:999] == 0.5) and recall[999] == 1.0
    # Predictions are sorted by score first: the file order does not matter.
    shuffled = one_image_ap([FACE_B + [0.0], FACE_A + [1.0], NOWHERE + [0.5]], [FACE_A, FACE_B])
    assert shuffled[0] == ap and np.array_equal(shuffled[1], precision)


def test_duplicate_goes_to_its_best_face_without_fall_back():
    # A = (0,0,10,10), C = (2,0,10,10): IoU(A, C) = 9*11 / (242 - 99) = 0.69. The second prediction
    # sits on A again; its best face is A (IoU 1), already recalled, so it is a false positive
    # even though C (IoU 0.69) is free. Thresholds > 0: P 1, R 1/2; 0: P 1/2, R 1/2 -> AP 0.5.
    face_c = [2, 0, 10, 10]
    ap, _, recall = one_image_ap([FACE_A + [0.9], FACE_A + [0.5]], [FACE_A, face_c])
    assert ap == 0.5
    assert recall[-1] == 0.5


def test_prediction_on_ignored_face_neither_helps_nor_hurts():
    # Faces A (counts) and B (ignored); only A enters the denominator (1 face).
    # On B first (0.9 -> 1.0), then A (0.5 -> 0.0): thresholds > 0 have no proposal at all (the B
    # prediction is ignored), P taken as 0, R 0; threshold 0: 1 proposal, 1 hit: P 1, R 1 -> AP 1.0.
    ap, precision, recall = one_image_ap([FACE_B + [0.9], FACE_A + [0.5]], [FACE_A, FACE_B],
                                         [True, False])
    assert ap == 1.0
    assert precision[-1] == 1.0 and recall[-1] == 1.0
    # Without B among the faces, the same prediction is a false positive ranked first: AP 0.5.
    assert one_image_ap([FACE_B + [0.9], FACE_A + [0.5]], [FACE_A])[0] == 0.5
    # Ranked below A it changes nothing either: precision stays 1 at threshold 0.
    ap, precision, _ = one_image_ap([FACE_A + [0.9], FACE_B + [0.5]], [FACE_A, FACE_B],
                                    [True, False])
    assert ap == 1.0 and precision[-1] == 1.0


def test_image_without_ground_truth_boxes_is_skipped():
    # Official quirk: an image with no ground-truth box adds nothing, so its false positives are
    # not counted. Here its FP (0.9 -> 1.0) outranks the TP (0.5 -> 0.0) yet AP stays 1.0.
    pred = {"face": np.array([FACE_A + [0.5]]), "empty": np.array([NOWHERE + [0.9]])}
    gt = {"face": np.array([FACE_A]), "empty": np.zeros((0, 4))}
    keep = {"face": np.array([True]), "empty": np.zeros(0, bool)}
    assert average_precision(pred, gt, keep)[0] == 1.0


def test_scores_are_normalised_over_the_whole_set():
    pred = {"a": np.array([FACE_A + [2.0], FACE_B + [4.0]]), "b": np.array([FACE_A + [3.0]])}
    norm = normalize_scores(pred)
    assert norm["a"][:, 4].tolist() == [0.0, 1.0] and norm["b"][:, 4].tolist() == [0.5]
    assert pred["a"][0, 4] == 2.0  # the input is not modified
    assert normalize_scores({"a": np.array([FACE_A + [7.0]])})["a"][0, 4] == 1.0
    # Only the order matters to AP: scores 20 / 10 behave like 1 / 0 (the FP-below case).
    assert one_image_ap([FACE_A + [20.0], NOWHERE + [10.0]], [FACE_A])[0] == 1.0
    # Across images: the TP of image "b" (0.2 of a range 0.1 .. 0.9 -> 0.125) passes thresholds
    # 0.125 .. 0 (126 of them) while the FP of image "a" (0.9 -> 1.0) passes all of them.
    # Recall 1 at precision 1/2 (one face): AP 0.5.
    pred = {"a": np.array([NOWHERE + [0.9], NOWHERE + [0.1]]), "b": np.array([FACE_A + [0.2]])}
    gt = {"a": np.array([FACE_B]), "b": np.array([FACE_A])}
    keep = {"a": np.array([False]), "b": np.array([True])}
    ap, _, recall = average_precision(pred, gt, keep)
    assert ap == 0.5
    assert np.count_nonzero(recall) == 126


def test_text_format_round_trip(tmp_path: Path):
    pred = {
        ("0--Parade", "0_Parade_marchingband_1_20"): np.array(
            [[12.0, 34.5, 56.25, 78.0, 0.987654321], [1 / 3, 2 / 3, 1e-7, 123456.789, 1e-3]]),
        ("0--Parade", "0_Parade_Parade_0_1"): np.zeros((0, 5)),
        ("1--Handshaking", "1_Handshaking_2"): np.array([[0.0, 0.0, 5.0, 5.0, -2.5]]),
    }
    write_predictions(pred, tmp_path)
    lines = (tmp_path / "0--Parade" / "0_Parade_marchingband_1_20.txt").read_text().splitlines()
    assert lines[:2] == ["0_Parade_marchingband_1_20", "2"]
    assert lines[2].split()[:2] == ["12", "34.5"]
    back = read_predictions(tmp_path)
    assert back.keys() == pred.keys()
    for key, boxes in pred.items():
        assert back[key].shape == boxes.shape and np.array_equal(back[key], boxes)


def test_reader_reads_the_count_on_line_two(tmp_path: Path):
    path = tmp_path / "x.txt"
    path.write_text("x.jpg\n1\n1 2 3 4 0.5\n9 9 9 9 0.9\n")
    assert read_prediction_file(path).tolist() == [[1, 2, 3, 4, 0.5]]
    path.write_text("x.jpg\n3\n1 2 3 4 0.5\n")
    with pytest.raises(ValueError):
        read_prediction_file(path)


def cell(items: list) -> np.ndarray:
    """A MATLAB cell column (object array [n, 1]), as savemat writes cell arrays."""
    out = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        out[i, 0] = item
    return out


def write_ground_truth(gt_dir: Path) -> None:
    """Two events, four images, six faces F1..F6, with 1-based gt_list indices per setting."""
    f1, f2, f3 = [10, 10, 20, 20], [50, 50, 8, 8], [0, 0, 30, 30]
    f4, f5, f6 = [100, 100, 40, 40], [5, 5, 4, 4], [200, 200, 10, 10]
    boxes = [[np.array([f1, f2], float), np.array([f3], float)],
             [np.array([f4, f5], float), np.array([f6], float)]]
    names = [["0_Parade_a", "0_Parade_b"], ["1_Handshaking_c", "1_Handshaking_d"]]
    savemat(gt_dir / "wider_face_val.mat", {
        "event_list": cell(["0--Parade", "1--Handshaking"]),
        "file_list": cell([cell(n) for n in names]),
        "face_bbx_list": cell([cell(b) for b in boxes]),
    })
    kept = {"easy": [[[1], [1]], [[1], []]],           # F1, F3, F4
            "medium": [[[1, 2], [1]], [[1], []]],      # + F2
            "hard": [[[1, 2], [1]], [[1, 2], [1]]]}    # + F5, F6
    for setting, per_event in kept.items():
        lists = cell([cell([np.array(k, np.int32).reshape(-1, 1) for k in event])
                      for event in per_event])
        savemat(gt_dir / f"wider_{setting}_val.mat", {"gt_list": lists})


def test_evaluate_reads_official_mat_files(tmp_path: Path):
    write_ground_truth(tmp_path)
    # Raw scores F1 0.9, F3 0.8, F4 0.7, FP 0.65 (image a), F2 0.6; F5, F6 never found and image d
    # has no prediction file. Normalised (range 0.6 .. 0.9): 1, 2/3, 1/3, 1/6, 0 - so each
    # prediction joins at its own threshold, in that order.
    pred = {("0--Parade", "0_Parade_a"): np.array([[10, 10, 20, 20, 0.9], [300, 300, 9, 9, 0.65],
                                                   [50, 50, 8, 8, 0.6]]),
            ("0--Parade", "0_Parade_b"): np.array([[0, 0, 30, 30, 0.8]]),
            ("1--Handshaking", "1_Handshaking_c"): np.array([[100, 100, 40, 40, 0.7]])}
    # easy (3 faces; F2, F5 ignored): F1, F3, F4 give P 1 up to R 1 -> AP 1.0.
    # medium (4 faces): F1, F3, F4 at P 1 to R 3/4; FP; F2 -> P 4/5, R 1.
    #   AP = 3/4 * 1 + 1/4 * 4/5 = 0.95.
    # hard (6 faces): P 1 to R 3/6, then F2 -> P 4/5 at R 4/6. AP = 1/2 + 1/6 * 4/5 = 19/30.
    aps = evaluate(pred, tmp_path)
    assert aps == pytest.approx({"easy": 1.0, "medium": 0.95, "hard": 19 / 30}, rel=1e-12)
    # The same set through the text format gives the same numbers.
    write_predictions(pred, tmp_path / "pred")
    assert evaluate(read_predictions(tmp_path / "pred"), tmp_path) == aps
