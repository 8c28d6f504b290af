"""``rtface detect`` on video: a clip built here from real faces at known places, frame by frame
through the served pipeline; the written video; sampling; a truncated file; the drawings."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from rtface_client import detect
from rtface_client.cli import main
from rtface_client.drawing import draw_faces
from rtface_client.video import is_video
from tools.matching import match_boxes
from tools.sample_images import astronaut, face_canvas, selfie

W, H, FPS, FRAMES = 640, 480, 10.0, 12


def canvases():
    """The clip's frames: 1 to 3 faces each, at places that change every frame."""
    return [face_canvas(200 + i, W, H, count=1 + i % 3) for i in range(FRAMES)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert writer.isOpened()
    for canvas in canvases():
        writer.write(canvas.image)
    writer.release()
    return path


def frames_of(path) -> tuple[int, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count, size


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sources_are_told_apart():
    assert is_video("clip.mp4") and is_video("rtsp://camera/stream") and is_video("0")
    assert not is_video("photo.jpg") and not is_video("scan.png")


def test_a_clip_gives_every_frame_in_order_with_its_faces_and_an_annotated_video(grpc_url, clip, tmp_path):
    out, drawn = tmp_path / "faces.jsonl", tmp_path / "drawn.mp4"
    assert main(["detect", str(clip), "--url", grpc_url, "--output", str(out), "--draw", str(drawn)]) == 0
    lines = read_lines(out)
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert [line["timestamp_ms"] for line in lines] == [round(i * 1000 / FPS, 1) for i in range(FRAMES)]
    for line, canvas in zip(lines, canvases()):
        boxes = np.array([face["box"] for face in line["faces"]]).reshape(-1, 4)
        assert len(boxes) == len(canvas.faces), line["frame"]
        assert (match_boxes(np.array(canvas.faces, np.float32), boxes, 0.5) >= 0).all(), line["frame"]
        for face in line["faces"]:  # a hundredth of a pixel, boxes and landmarks alike
            for value in face["box"] + [v for point in face["landmarks"] for v in point]:
                assert value == round(value, 2) and len(repr(value).split(".")[-1]) <= 2
    assert frames_of(drawn) == (FRAMES, (W, H))


def test_a_clip_sent_as_encoded_frames_finds_the_same_faces_where_they_are(grpc_url, clip, tmp_path):
    """What a client on another host does (``auto`` picks ``encoded`` there): each decoded frame
    is sent as the SDK's JPEG and decoded again by the server."""
    out = tmp_path / "faces.jsonl"
    assert main(["detect", str(clip), "--url", grpc_url, "--transport", "encoded", "--output", str(out)]) == 0
    lines = read_lines(out)
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    for line, canvas in zip(lines, canvases()):
        boxes = np.array([face["box"] for face in line["faces"]]).reshape(-1, 4)
        assert len(boxes) == len(canvas.faces), line["frame"]
        assert (match_boxes(np.array(canvas.faces, np.float32), boxes, 0.5) >= 0).all(), line["frame"]


def test_every_nth_frame_is_sampled(grpc_url, clip, tmp_path, capsys):
    out, drawn = tmp_path / "faces.jsonl", tmp_path / "drawn.avi"
    assert main(["detect", str(clip), "--url", grpc_url, "--every", "3", "--output", str(out), "--draw", str(drawn)]) == 0
    assert [line["frame"] for line in read_lines(out)] == [0, 3, 6, 9]
    assert frames_of(drawn) == (4, (W, H))
    assert "4 frames in" in capsys.readouterr().err


def test_a_truncated_video_is_named_with_the_frame_where_decoding_stopped_and_the_rest_is_kept(
        grpc_url, clip, tmp_path, capsys):
    broken = tmp_path / "broken.avi"
    data = clip.read_bytes()
    broken.write_bytes(data[: len(data) * 6 // 10])
    out = tmp_path / "faces.jsonl"
    assert main(["detect", str(broken), "--url", grpc_url, "--output", str(out)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    kept = read_lines(out)
    assert error.startswith("rtface: error: ") and str(broken) in error
    assert f"decoding stopped at frame {len(kept)} of {FRAMES}" in error
    assert 1 <= len(kept) < FRAMES and [line["frame"] for line in kept] == list(range(len(kept)))


def test_a_missing_or_unreadable_video_is_a_one_line_error(tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    assert main(["detect", str(tmp_path / "absent.mp4")]) == 1
    assert main(["detect", str(junk)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "absent.mp4: no such file" in errors[0] and "junk.mp4: cannot open" in errors[1]


def test_still_images_keep_working(grpc_url, tmp_path, capsys):
    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), astronaut())
    assert main(["detect", str(image), "--url", grpc_url, "--json", "--draw", str(tmp_path / "drawn")]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["image"] == str(image) and len(line["faces"]) == 1
    assert (tmp_path / "drawn" / "astronaut.jpg").is_file()


def test_drawings_stay_readable_on_a_crowd(grpc_url):
    """On the selfie (302 faces, median 24 px wide) strokes stay one pixel and only the faces wide
    enough for it get a score label: the drawing covers 4 % of the photo and 1 % outside the
    boxes, where one font size for all covered 23 % and 15 %; a large face still gets its label."""
    crowd = selfie()
    if crowd is None:
        pytest.skip("../shared/data/selfie/selfie.jpg is not present")
    faces = detect(crowd, url=grpc_url)
    changed = (draw_faces(crowd, faces) != crowd).any(axis=2)
    boxes = np.zeros(crowd.shape[:2], bool)
    for face in faces:
        x1, y1, x2, y2 = (round(v) for v in face.box)
        boxes[max(0, y1 - 1):y2 + 2, max(0, x1 - 1):x2 + 2] = True
    assert len(faces) > 200
    assert changed[~boxes].mean() < 0.03  # labels only above faces wide enough to carry them
    assert changed.mean() < 0.08
    single = astronaut()
    (face,) = detect(single, url=grpc_url)
    x1, y1, x2, _ = (round(v) for v in face.box)
    above = (draw_faces(single, [face]) != single).any(axis=2)[max(0, y1 - 30):y1 - 2, x1:x2]
    assert above.any()  # the label sits above a large box
