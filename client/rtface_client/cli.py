"""``rtface detect IMG... [--url] [--json] [--draw OUTDIR] [--score-threshold T]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from rtface_client.client import DEFAULT_URL, Client
from rtface_client.errors import RtfaceError
from rtface_client.images import load_image
from rtface_client.types import Face

__all__ = ["main", "draw_faces"]

LANDMARK_COLORS = ((255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 255, 255))


def draw_faces(image: np.ndarray, faces: list[Face]) -> np.ndarray:
    """A copy of ``image`` (BGR) with each face's box, score and landmarks drawn."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    for face in faces:
        x1, y1, x2, y2 = (round(v) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        cv2.putText(canvas, f"{face.score:.2f}", (x1, max(0, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thickness, (0, 255, 0), thickness)
        for (x, y), color in zip(face.landmarks, LANDMARK_COLORS):
            cv2.circle(canvas, (round(x), round(y)), thickness + 1, color, -1)
    return canvas


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtface", description="Face detection against an rtface server.")
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="detect faces in images")
    detect.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    detect.add_argument("--url", default=DEFAULT_URL, help=f"server gRPC address (default {DEFAULT_URL})")
    detect.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    detect.add_argument("--draw", type=Path, metavar="OUTDIR", help="write annotated copies here")
    detect.add_argument("--score-threshold", type=float, default=None, help="minimum face score (0..1)")
    detect.add_argument("--transport", default="auto", choices=("auto", "grpc", "system_shm", "cuda_shm"))
    detect.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    return parser


def _progress(done: int, total: int) -> None:
    if total > 1 and sys.stderr.isatty():
        width = 30
        filled = width * done // total
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr)
        if done == total:
            print(file=sys.stderr)


def _report(path: Path, faces: list[Face], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"image": str(path), "faces": [f.to_dict() for f in faces]}))
        return
    print(f"{path}: {len(faces)} face(s)")
    for face in faces:
        x1, y1, x2, y2 = face.box
        print(f"  {face.score:6.3f}  box ({x1:7.1f}, {y1:7.1f}, {x2:7.1f}, {y2:7.1f})")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit status (0 ok, 1 error with a one-line message)."""
    args = _parser().parse_args(argv)
    options = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
    try:
        if args.draw:
            args.draw.mkdir(parents=True, exist_ok=True)
        with Client(args.url, transport=args.transport) as client:
            stream = client.detect_stream(args.images, concurrency=args.concurrency, **options)
            for done, (path, faces) in enumerate(zip(args.images, stream), start=1):
                _report(path, faces, args.json)
                if args.draw:
                    cv2.imwrite(str(args.draw / f"{path.stem}.jpg"), draw_faces(load_image(path), faces))
                _progress(done, len(args.images))
    except (RtfaceError, ValueError, OSError) as exc:
        print(f"rtface: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
