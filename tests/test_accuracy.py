"""Accuracy tools end to end against the session server: selfie AP (served vs in-process
reference), backend parity, and the ``wider`` command on a generated WIDER-format mini set."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from tests.test_wider_protocol import cell
from tools.evaluation.selfie import (PROTOCOL_FRAME, evaluate_run, evaluate_uncapped, load_labels, selfie_curves,
                               to_protocol_frame)
from tools.evaluation.served import engine_info
from tools.evaluation.cli import PARITY_MATCHED, PARITY_SCORE, SELFIE_AP_TOLERANCE, main
from tools.engine.source import load_source_model
from tools.evaluation.parity import ParityStats, RewrittenGraph, compare_served, parity_images
from tools.engine.reference import Detections
from tools.sample_images import face_canvas, selfie, selfie_dir
from tools.settings import BuildSettings

needs_selfie = pytest.mark.skipif(not (selfie_dir() / "selfie.jpg").is_file(),
                                  reason=f"no selfie.jpg in {selfie_dir()}")


@needs_selfie
def test_selfie_labels_and_predictions_meet_in_the_protocol_frame():
    truth = load_labels()
    assert [int(np.sum(truth.classes == c)) for c in (0, 1, 2)] == [336, 398, 122]
    # The labels themselves, expressed in pixels of the 2048x1150 photo, are perfect predictions.
    image_size = (2048, 1150)
    back = truth.boxes * np.array([2048 / PROTOCOL_FRAME[0], 1150 / PROTOCOL_FRAME[1]] * 2)
    rows = np.column_stack([back, np.linspace(1.0, 0.5, len(back))])
    curves = selfie_curves(to_protocol_frame(rows, image_size), truth)
    assert curves["all"]["ap"] == pytest.approx(100.0) and curves["clear"]["ap"] == pytest.approx(100.0)


@needs_selfie
def test_served_selfie_ap_is_within_half_a_point_of_the_in_process_reference(grpc_url, reference):
    report = evaluate_run(grpc_url, engine_info(grpc_url), reference)
    for setting in ("all", "clear"):
        assert abs(report["ap_difference"][setting]) <= SELFIE_AP_TOLERANCE, report
    assert report["served"]["clear"] > report["served"]["all"] > 10.0
    assert report["saturation"]["topk"] == BuildSettings.topk


@needs_selfie
def test_the_default_engine_keeps_the_whole_crowd_and_matches_the_uncapped_reference(grpc_url, reference):
    """856 labelled faces: at the defaults neither TOPK nor MAX_DET binds at score 0.02, so the
    served AP equals the in-process reference with no cap at all."""
    report = evaluate_run(grpc_url, engine_info(grpc_url), reference)
    assert not report["saturation"]["topk_saturated"] and not report["saturation"]["max_detections_reached"], report
    uncapped = evaluate_uncapped(reference, load_labels(), selfie())
    for setting in ("all", "clear"):
        assert abs(report["served"][setting] - uncapped[setting]) <= SELFIE_AP_TOLERANCE, (report, uncapped)


def test_onnxruntime_paths_agree_face_by_face(grpc_url):
    engine = engine_info(grpc_url)
    graph = RewrittenGraph.from_source(load_source_model(), engine.width, engine.height, engine.topk)
    images = parity_images(canvases=3)
    for threshold in (0.5, 0.02):
        summary = compare_served(grpc_url, engine, graph, images, threshold)
        assert summary["reference_faces"] >= 1 + 3 * 6, summary
        assert summary["matched_rate"] >= PARITY_MATCHED, summary
        assert summary["mean_abs_score_delta"] < PARITY_SCORE, summary


def write_wider_mini_set(root: Path) -> dict[str, int]:
    """Face canvases as ``root/<event>/<name>.jpg`` with official-style .mat ground truth in
    ``root/ground_truth``: easy = faces >= 100 px wide, medium >= 60 px, hard = all. Returns
    the face count per setting."""
    events = {"0--Parade": [(0, 640, 480), (1, 800, 600)], "1--Handshaking": [(2, 1024, 768)]}
    names, boxes = [], []
    for event, specs in events.items():
        names.append([]), boxes.append([])
        for seed, width, height in specs:
            canvas = face_canvas(seed, width, height, count=4)
            name = f"{event.split('--')[0]}_{event.split('--')[1]}_{seed}"
            (root / event).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / event / f"{name}.jpg"), canvas.image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            xywh = np.column_stack([canvas.faces[:, :2], canvas.faces[:, 2:] - canvas.faces[:, :2]])
            names[-1].append(name)
            boxes[-1].append(xywh.astype(np.float64))
    gt = root / "ground_truth"
    gt.mkdir()
    savemat(gt / "wider_face_val.mat", {"event_list": cell(list(events)),
                                        "file_list": cell([cell(n) for n in names]),
                                        "face_bbx_list": cell([cell(b) for b in boxes])})
    counts = {}
    for setting, min_width in (("easy", 100), ("medium", 60), ("hard", 0)):
        kept = [[np.flatnonzero(b[:, 2] >= min_width) + 1 for b in per_event] for per_event in boxes]
        counts[setting] = sum(len(k) for per_event in kept for k in per_event)
        savemat(gt / f"wider_{setting}_val.mat", {"gt_list": cell(
            [cell([k.astype(np.int32).reshape(-1, 1) for k in per_event]) for per_event in kept])})
    return counts


def test_wider_command_finds_the_known_faces_of_a_mini_set(grpc_url, tmp_path: Path):
    counts = write_wider_mini_set(tmp_path / "data")
    assert 0 < counts["easy"] < counts["medium"] <= counts["hard"] == 12
    out = tmp_path / "out"
    assert main(["wider", "--data", str(tmp_path / "data"), "--url", grpc_url, "--out", str(out)]) == 0
    report = json.loads((out / "wider.json").read_text())
    assert report["images"] == 3 and report["faces"] == counts
    assert all(ap >= 95.0 for ap in report["ap"].values()), report["ap"]
    assert len(list((out / "wider" / "predictions").glob("*/*.txt"))) == 3
    assert (out / "wider_pr.png").stat().st_size > 0


def test_wider_command_names_a_missing_image_before_starting_a_server(tmp_path: Path, capsys):
    write_wider_mini_set(tmp_path)
    (tmp_path / "0--Parade" / "0_Parade_1.jpg").unlink()
    assert main(["wider", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err
    assert "1 of 3 images missing" in message and "0--Parade/0_Parade_1.jpg" in message
    assert not (tmp_path / "out" / "server-model_repository.log").exists()


def test_parity_stats_pair_faces_at_iou_0_9_and_measure_score_and_landmark_differences():
    marks = np.zeros((2, 5, 2), np.float32)
    reference = Detections(np.array([[0, 0, 100, 100], [200, 0, 300, 100]], np.float32),
                           np.array([0.9, 0.8], np.float32), marks)
    # Face 1 moved 1 px (IoU 0.98), score -0.01, landmarks +(3, 4): 5 px. Face 2 moved 20 px
    # (IoU 0.67): unmatched, and the path found one extra face.
    other = Detections(np.array([[1, 0, 101, 100], [220, 0, 320, 100], [500, 0, 550, 50]], np.float32),
                       np.array([0.89, 0.8, 0.7], np.float32),
                       np.concatenate([marks, marks[:1]]) + np.array([3, 4], np.float32))
    stats = ParityStats()
    stats.add(reference, other)
    summary = stats.summary()
    assert (summary["matched"], summary["reference_faces"], summary["faces"]) == (1, 2, 3)
    assert summary["matched_rate"] == pytest.approx(1 / 3)
    assert summary["mean_abs_score_delta"] == pytest.approx(0.01, abs=1e-6)
    assert summary["mean_landmark_error_px"] == pytest.approx(5.0)
