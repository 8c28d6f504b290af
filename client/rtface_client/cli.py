"""``rtface detect SOURCE... [--url] [--json] [--output FILE] [--draw PATH] [--every N] [--score-threshold T]``.

SOURCE is image files, or one video: a file (``clip.mp4``), a stream (``rtsp://...``) or a camera
index (``0``). Images print a table (or JSON lines with ``--json``) and ``--draw OUTDIR`` writes
annotated copies. A video gives JSON lines, one per frame in order (frame index, timestamp in ms,
faces), on stdout or to ``--output``; ``--draw out.mp4`` writes the annotated video at the
source's size and frame rate (divided by ``--every``); Ctrl-C stops and keeps what was written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import cv2

from rtface_client.client import CLIENT_TRANSPORTS, DEFAULT_URL, Client
from rtface_client.drawing import draw_faces
from rtface_client.errors import RtfaceError, VideoError
from rtface_client.images import load_image
from rtface_client.types import Face
from rtface_client.video import VideoFrame, VideoSource, is_video, open_video

__all__ = ["main"]

FOURCC = {".avi": "MJPG"}  # everything else: MPEG-4 part 2 ("mp4v"), which every OpenCV wheel writes
INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtface", description="Face detection against an rtface server.")
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="detect faces in images or in a video")
    detect.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="image files (JPEG, PNG, ...), or one video: a file, rtsp://... or a camera index")
    detect.add_argument("--url", default=DEFAULT_URL, help=f"server gRPC address (default {DEFAULT_URL})")
    detect.add_argument("--json", action="store_true", help="images: print JSON lines instead of a table")
    detect.add_argument("--output", type=Path, metavar="FILE", help="write the JSON lines (or table) here, not to stdout")
    detect.add_argument("--draw", type=Path, metavar="PATH",
                        help="images: a folder for annotated copies; video: the annotated video file (.mp4, .avi)")
    detect.add_argument("--every", type=int, default=1, metavar="N", help="video: detect on every N-th frame")
    detect.add_argument("--score-threshold", type=float, default=None, help="minimum face score (0..1)")
    detect.add_argument("--transport", default="auto", choices=("auto", *CLIENT_TRANSPORTS),
                        help="how images travel (auto: shared memory to this host, encoded images elsewhere)")
    detect.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    detect.add_argument("--batch", type=int, default=1, metavar="N",
                        help="images (or frames) per request, up to the server's max batch: faster for files, "
                             "1 for the lowest latency")
    return parser


def _progress(done: int, total: int | None, started: float) -> None:
    if not sys.stderr.isatty():
        return
    rate = done / max(time.monotonic() - started, 1e-9)
    if total:
        filled = 30 * min(done, total) // total
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}  {rate:.1f}/s", end="", file=sys.stderr)
    else:
        print(f"\r{done}  {rate:.1f}/s", end="", file=sys.stderr)


@contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w") as handle:
        yield handle


def _report(out: IO[str], name: str, faces: list[Face], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"image": name, "faces": [f.to_dict() for f in faces]}), file=out)
        return
    print(f"{name}: {len(faces)} face(s)", file=out)
    for face in faces:
        x1, y1, x2, y2 = face.box
        print(f"  {face.score:6.3f}  box ({x1:7.1f}, {y1:7.1f}, {x2:7.1f}, {y2:7.1f})", file=out)


def _detect_images(args, options: dict) -> int:
    paths = [Path(source) for source in args.sources]
    if args.draw:
        args.draw.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with Client(args.url, transport=args.transport) as client, _output(args.output) as out:
        stream = client.detect_stream(paths, concurrency=args.concurrency, batch=args.batch, **options)
        for done, (path, faces) in enumerate(zip(paths, stream), start=1):
            _report(out, str(path), faces, args.json)
            if args.draw:
                cv2.imwrite(str(args.draw / f"{path.stem}.jpg"), draw_faces(load_image(path), faces))
            _progress(done, len(paths), started)
    if len(paths) > 1 and sys.stderr.isatty():
        print(file=sys.stderr)
    return 0


def _video_writer(path: Path, source: VideoSource, every: int) -> cv2.VideoWriter:
    fps = (source.fps if source.fps > 0 else 25.0) / every
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC.get(path.suffix.lower(), "mp4v")),
                             fps, source.size)
    if not writer.isOpened():
        raise VideoError(f"{path}: cannot write a video there (use .mp4 or .avi)")
    return writer


def _detect_video(args, options: dict) -> int:
    source = open_video(args.sources[0])
    held: deque[VideoFrame] = deque()  # frames sent and not yet answered: at most `concurrency` x `batch`
    stopped: list[VideoError] = []

    def images():
        try:
            for frame in source.frames(args.every):
                held.append(frame)
                yield frame.image
        except VideoError as exc:  # answer the frames decoded so far, then report it
            stopped.append(exc)

    writer = _video_writer(args.draw, source, args.every) if args.draw else None
    done, interrupted, started = 0, False, time.monotonic()
    total = -(-source.frame_count // args.every) if source.frame_count else None
    try:
        with Client(args.url, transport=args.transport) as client, _output(args.output) as out:
            try:
                for faces in client.detect_stream(images(), concurrency=args.concurrency, batch=args.batch,
                                                  **options):
                    frame = held.popleft()
                    print(json.dumps({"frame": frame.index, "timestamp_ms": round(frame.timestamp_ms, 1),
                                      "faces": [f.to_dict() for f in faces]}), file=out)
                    if writer is not None:
                        writer.write(draw_faces(frame.image, faces))
                    done += 1
                    _progress(done, total, started)
            except KeyboardInterrupt:
                interrupted = True
    finally:
        if writer is not None:
            writer.release()
    seconds = time.monotonic() - started
    print(("\n" if sys.stderr.isatty() else "") + f"{source.name}: {done} frames in {seconds:.1f} s "
          f"({done / max(seconds, 1e-9):.1f} frames/s){', interrupted' if interrupted else ''}", file=sys.stderr)
    if stopped:
        raise stopped[0]
    return INTERRUPTED if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit status (0 ok, 1 error with a one-line message, 130
    interrupted)."""
    args = _parser().parse_args(argv)
    options = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
    try:
        if args.every < 1:
            raise ValueError(f"--every {args.every}: use 1 or more")
        if any(is_video(source) for source in args.sources):
            if len(args.sources) != 1:
                raise ValueError("give one video source at a time (or only images)")
            return _detect_video(args, options)
        return _detect_images(args, options)
    except (RtfaceError, ValueError, OSError) as exc:
        print(f"rtface: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
