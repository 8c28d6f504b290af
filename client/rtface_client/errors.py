"""Errors the SDK raises. Every one is an :class:`RtfaceError`; each message says what to fix."""

from __future__ import annotations

__all__ = ["RtfaceError", "InvalidImageError", "ServerUnavailableError", "ModelNotReadyError",
           "RequestRejectedError", "RequestTimeoutError", "ServerOverloadedError", "TransportError",
           "VideoError", "CapReachedWarning"]


class RtfaceError(Exception):
    """Base class of every error raised by ``rtface_client``."""


class InvalidImageError(RtfaceError, ValueError):
    """The image is not something the SDK or the server can read (type, dtype, shape, size, or
    undecodable bytes). ``index``: which image of the request or batch, when the server named it."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class ServerUnavailableError(RtfaceError, ConnectionError):
    """The server cannot be reached at the given URL."""


class ModelNotReadyError(RtfaceError):
    """The server is up but the ``retinaface`` model is not loaded or not ready."""


class RequestRejectedError(RtfaceError):
    """The server refused the request as invalid (e.g. an option out of range)."""


class RequestTimeoutError(RtfaceError, TimeoutError):
    """The request did not complete within the client's timeout."""


class ServerOverloadedError(RtfaceError):
    """The server's queue is full; retry later, lower the concurrency, or add capacity."""


class TransportError(RtfaceError):
    """A shared-memory transport could not be set up (create, map, or register a region)."""


class VideoError(RtfaceError):
    """A video cannot be opened, or stopped decoding before its end; the message names the
    source and the frame."""


class CapReachedWarning(UserWarning):
    """An image had more candidates or faces than the engine or the request keeps (TOPK, MAX_DET,
    ``max_detections``): faces may be missing from its result. The message names the cap to raise."""
