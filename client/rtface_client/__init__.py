"""rtface client SDK: face detection (boxes + 5 landmarks) against an rtface Triton server.

    from rtface_client import detect
    faces = detect("photo.jpg", url="localhost:8001")        # list[Face], original pixels

    from rtface_client import Client
    with Client("localhost:8001") as client:                 # transport="auto"
        for faces in client.detect_stream(paths, concurrency=8):
            ...
"""

from rtface_client.client import DEFAULT_URL, Client, detect
from rtface_client.errors import (CapReachedWarning, InvalidImageError, ModelNotReadyError, RequestRejectedError,
                                  RequestTimeoutError, RtfaceError, ServerOverloadedError,
                                  ServerUnavailableError, TransportError)
from rtface_client.letterbox import Letterbox, letterbox
from rtface_client.types import LANDMARK_NAMES, Face

__all__ = [
    "detect", "Client", "Face", "LANDMARK_NAMES", "DEFAULT_URL", "Letterbox", "letterbox",
    "RtfaceError", "InvalidImageError", "ServerUnavailableError", "ModelNotReadyError",
    "RequestRejectedError", "RequestTimeoutError", "ServerOverloadedError", "TransportError",
    "CapReachedWarning",
]
