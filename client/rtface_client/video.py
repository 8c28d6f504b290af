"""Video sources for the CLI: files, network streams and cameras, decoded by OpenCV (FFmpeg).

:func:`open_video` opens a source and says what it is; :meth:`VideoSource.frames` yields its
frames in order, one at a time, and raises :class:`VideoError` naming the file and the frame
where decoding stopped when a file ends before the frame count its container states.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from rtface_client.errors import VideoError

__all__ = ["VIDEO_SUFFIXES", "VideoFrame", "VideoSource", "is_video", "open_video"]

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"})
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


def is_video(source: str) -> bool:
    """Whether ``source`` names a video: a file with a video suffix, a stream URL or a camera index
    (digits that are not an existing file)."""
    if source.lower().startswith(STREAM_SCHEMES):
        return True
    path = Path(source)
    if source.isdigit() and not path.exists():
        return True
    return path.suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame: its index in the source, its timestamp in ms and the BGR pixels."""

    index: int
    timestamp_ms: float
    image: np.ndarray


@dataclass
class VideoSource:
    """An opened video: ``name`` as given, frames per second (0 when the source does not say),
    ``size`` (width, height) and ``frame_count`` (None for streams and cameras)."""

    name: str
    capture: cv2.VideoCapture
    fps: float
    size: tuple[int, int]
    frame_count: int | None

    def frames(self, every: int = 1) -> Iterator[VideoFrame]:
        """Decode the frames in order, yielding every ``every``-th one (the first included).

        A file whose container states a frame count and that stops decoding before it raises
        :class:`VideoError` after the frames it did decode."""
        index = 0
        try:
            while True:
                ok, image = self.capture.read()
                if not ok:
                    break
                if index % every == 0:
                    yield VideoFrame(index, self._timestamp_ms(index), image)
                index += 1
        finally:
            self.capture.release()
        if self.frame_count is not None and index < self.frame_count:
            raise VideoError(f"{self.name}: decoding stopped at frame {index} of {self.frame_count} "
                             "(the file is truncated or corrupt); the frames before it were processed")

    def _timestamp_ms(self, index: int) -> float:
        return index * 1000.0 / self.fps if self.fps > 0 else float(self.capture.get(cv2.CAP_PROP_POS_MSEC))


def open_video(source: str) -> VideoSource:
    """Open a video file, a stream URL (``rtsp://...``) or a camera (its index, e.g. ``0``)."""
    camera = source.isdigit() and not Path(source).exists()
    if not camera and not source.lower().startswith(STREAM_SCHEMES) and not Path(source).is_file():
        raise VideoError(f"{source}: no such file")
    capture = cv2.VideoCapture(int(source) if camera else source)
    if not capture.isOpened():
        raise VideoError(f"{source}: cannot open it as a video (decoding stopped at frame 0); is it a "
                         "video OpenCV's FFmpeg can read, or a reachable stream or camera?")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    is_file = not camera and not source.lower().startswith(STREAM_SCHEMES)
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return VideoSource(source, capture, float(capture.get(cv2.CAP_PROP_FPS) or 0.0), size,
                       count if is_file and count > 0 else None)
