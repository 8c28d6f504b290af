"""The SDK's entry points: :class:`Client` (keeps connections and shared memory) and :func:`detect`.

Data path: image -> :func:`load_image` -> letterbox straight into a transport slot -> Triton
ensemble ``retinaface`` (detector, then postprocess) -> :class:`Face` list in original pixels.
With the ``encoded`` transport: image -> :func:`encode_image` (JPEG/PNG bytes as they are) -> Triton
ensemble ``retinaface_encoded`` (decode and letterbox, detector, postprocess) -> :class:`Face` list.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import re
import socket
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from rtface_client.errors import (CapReachedWarning, InvalidImageError, ModelNotReadyError, RequestRejectedError,
                                  RequestTimeoutError, RtfaceError, ServerOverloadedError,
                                  ServerUnavailableError, TransportError)
from rtface_client.images import MAX_PIXELS, ImageLike, encode_image, load_image
from rtface_client.security import shm_headers
from rtface_client.cuda_memory import cuda_unavailable_reason
from rtface_client.transport import OUTPUT_LAYOUT, TRANSPORTS, SlotPool, reclaim_stale_regions
from rtface_client.types import Face

__all__ = ["Client", "detect", "DEFAULT_URL", "MODEL_NAME", "ENCODED_MODEL_NAME", "CLIENT_TRANSPORTS"]

log = logging.getLogger("rtface_client")
DEFAULT_URL = "localhost:8001"
MODEL_NAME = "retinaface"
ENCODED_MODEL_NAME = "retinaface_encoded"  # encoded images in; decoded and letterboxed by the server
DETECTOR_NAME = "retinaface_detector"
POSTPROCESS_NAME = "retinaface_postprocess"
PREPROCESS_NAME = "retinaface_preprocess"
ENCODED = "encoded"  # the transport that sends encoded images (JPEG/PNG bytes) to ENCODED_MODEL_NAME
CLIENT_TRANSPORTS = (*TRANSPORTS, ENCODED)
SERVER_ROW = re.compile(r"image row (\d+)(?: of \d+)?: (.*)", re.DOTALL)  # the preprocess's INVALID_ARGUMENT
CANDIDATES_CAPPED, FACES_CAPPED = 1, 2  # bits of the `capped` output


OVERLOAD_MARKERS = ("exceeds maximum queue size", "request timeout expired", "overloaded")
# a server that died mid-request: gRPC reports some of these as INTERNAL, not UNAVAILABLE
LOST_SERVER_MARKERS = ("failed to connect", "connection", "socket closed", "rst_stream", "broken pipe")


def _translate(exc: InferenceServerException, url: str, timeout: float) -> RtfaceError:
    """Map a Triton client exception to the SDK error that says what to do."""
    status, message = str(exc.status() or ""), exc.message() or str(exc)
    lowered = message.lower()
    row = SERVER_ROW.search(message)
    if row is not None and "INVALID_ARGUMENT" in status:
        return InvalidImageError(f"the server cannot read image {row.group(1)} of the request: {row.group(2)}",
                                 index=int(row.group(1)))
    if any(marker in lowered for marker in OVERLOAD_MARKERS) or "RESOURCE_EXHAUSTED" in status:
        return ServerOverloadedError(f"server at {url} is overloaded ({message}); retry later, "
                                     "lower the concurrency, or add capacity")
    if "DEADLINE_EXCEEDED" in status or "deadline" in lowered:
        return RequestTimeoutError(f"no answer from {url} within {timeout:g} s; raise Client(timeout=...) "
                                   "or lower the load")
    if "UNAVAILABLE" in status or any(marker in lowered for marker in LOST_SERVER_MARKERS):
        return ServerUnavailableError(f"cannot reach the server at {url}: is `make serve` running "
                                      f"and the URL right? ({message})")
    if "NOT_FOUND" in status or "not ready" in lowered or "unknown model" in lowered:
        return ModelNotReadyError(f"model '{MODEL_NAME}' is not ready at {url} ({message}); "
                                  "was the engine built (`make engine`)?")
    return RequestRejectedError(f"the server rejected the request: {message}")


MULTI_TARGET_SCHEMES = ("ipv4:", "ipv6:", "dns:")  # gRPC target names that can stand for many servers
# One channel to many replicas: gRPC's round_robin over every address the target resolves to,
# with tritonclient's own message-size limits (passing channel_args replaces its defaults).
REPLICA_CHANNEL_ARGS = [("grpc.lb_policy_name", "round_robin"),
                        ("grpc.max_send_message_length", 2**31 - 1),
                        ("grpc.max_receive_message_length", 2**31 - 1)]


def is_replica_set(url: str) -> bool:
    """Whether ``url`` is a gRPC target for several servers: ``ipv4:a:p,b:p`` (a static list) or
    ``dns:///name:port`` (every address the name resolves to, e.g. a headless Service)."""
    return url.startswith(MULTI_TARGET_SCHEMES)


def _is_local(url: str) -> bool:
    if is_replica_set(url):
        return False  # shared memory is per server: a replica set is reached over gRPC
    host = urlsplit(f"//{url}").hostname or "localhost"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    try:
        mine = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        mine = set()
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in mine for a in addresses)


def _port(url: str) -> int:
    return urlsplit(f"//{url}").port or 8001


def _faces(outputs: dict[str, np.ndarray], index: int, size: tuple[int, int]) -> list[Face]:
    """The faces of image ``index`` of a response, in original pixels, clipped to ``size`` (w, h)."""
    count = int(outputs["num_detections"][index, 0])
    limit = np.array(size, dtype=np.float32)
    corners = np.clip(outputs["boxes"][index, :count].reshape(count, 2, 2), 0, limit)
    points = np.clip(outputs["landmarks"][index, :count], 0, limit)
    scores = outputs["scores"][index, :count]  # each face's landmarks: a row of `points`, a fresh array
    return [Face(tuple(box), score, landmarks)
            for box, score, landmarks in zip(corners.reshape(count, 4).tolist(), scores.tolist(), points)]


def _warn_if_capped(capped: np.ndarray, options: dict) -> None:
    """A :class:`CapReachedWarning` naming the cap, for the images of a response that reached one."""
    for bit, what, fix in (
            (CANDIDATES_CAPPED, "more candidates above the score threshold than the engine keeps",
             "raise the score_threshold, or rebuild with a larger TOPK (make engine TOPK=...)"),
            (FACES_CAPPED, f"more faces than max_detections={options.get('max_detections', 'MAX_DET')}",
             "pass a larger max_detections, or rebuild with a larger MAX_DET (make engine MAX_DET=...)")):
        hit = np.flatnonzero(capped & bit)
        if hit.size:
            warnings.warn(f"rtface: image(s) {hit.tolist()} of the request had {what}; faces may be "
                          f"missing: {fix}", CapReachedWarning, stacklevel=5)  # the caller of detect()


class Client:
    """A connection to an rtface server: keeps the gRPC channel and shared-memory regions.

    ``url`` is the server's gRPC ``host:port``. ``transport`` is ``"grpc"``, ``"system_shm"``,
    ``"cuda_shm"`` (letterboxed pixels), ``"encoded"`` (encoded images, decoded by the server:
    JPEG and PNG bytes or files are sent as they are, arrays encoded once as JPEG) or ``"auto"``
    (CUDA shm when the server is on this host and runs the detector on a GPU, system shm when it
    is on this host, encoded images for a server elsewhere or a replica set, gRPC where the server
    has no encoded ensemble; falls back with a logged reason when a region cannot be registered).
    ``timeout`` bounds each request, in seconds.
    ``retries``: how often a request that lost the server is retried once the server is back
    (waiting up to ``timeout`` each time; shared-memory regions are registered again). Default
    per-request options: ``score_threshold``, ``iou_threshold``, ``max_detections`` (``None``:
    the server's defaults). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, url: str = DEFAULT_URL, transport: str = "auto", timeout: float = 30.0, *,
                 retries: int = 0, score_threshold: float | None = None,
                 iou_threshold: float | None = None, max_detections: int | None = None):
        if transport != "auto" and transport not in CLIENT_TRANSPORTS:
            raise ValueError(f"transport={transport!r}: use 'auto' or one of {', '.join(CLIENT_TRANSPORTS)}")
        if transport not in ("auto", "grpc", ENCODED) and is_replica_set(url):
            raise ValueError(f"transport={transport!r} with {url}: shared memory is per server; several "
                             f"replicas are reached with transport='{ENCODED}' or 'grpc' (or 'auto')")
        self.url, self.timeout, self.retries = url, timeout, retries
        self._options = {k: v for k, v in (("score_threshold", score_threshold),
                                           ("iou_threshold", iou_threshold),
                                           ("max_detections", max_detections)) if v is not None}
        self._local = threading.local()
        self._control = self._connection()
        self._read_model()
        self._transport, self._pool = self._open_pool(transport)
        self._finalizer = weakref.finalize(self, _release, self._pool)
        atexit.register(self._finalizer)

    # -- setup -------------------------------------------------------------------------------
    def _connection(self) -> grpcclient.InferenceServerClient:
        """This thread's gRPC client (tritonclient's client objects are not shared across threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            args = REPLICA_CHANNEL_ARGS if is_replica_set(self.url) else None
            conn = self._local.conn = grpcclient.InferenceServerClient(self.url, channel_args=args)
        return conn

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            raise _translate(exc, self.url, self.timeout) from None

    def _read_model(self) -> None:
        conn = self._control
        if not self._call(conn.is_server_live, client_timeout=self.timeout):
            raise ServerUnavailableError(f"the server at {self.url} is not live")
        if not self._call(conn.is_model_ready, MODEL_NAME, client_timeout=self.timeout):
            raise ModelNotReadyError(f"model '{MODEL_NAME}' is not ready at {self.url}; was the "
                                     "engine built (`make engine`) and did the server load it?")
        config = self._call(conn.get_model_config, MODEL_NAME, as_json=True,
                            client_timeout=self.timeout)["config"]
        dims = next(i["dims"] for i in config["input"] if i["name"] == "images")
        self.input_height, self.input_width = int(dims[0]), int(dims[1])
        self.max_batch = int(config.get("max_batch_size", 1)) or 1
        postprocess = self._call(conn.get_model_config, POSTPROCESS_NAME, as_json=True,
                                 client_timeout=self.timeout)["config"]
        self.max_detections = int(postprocess["parameters"]["max_detections"]["string_value"])
        detector = self._call(conn.get_model_config, DETECTOR_NAME, as_json=True,
                              client_timeout=self.timeout)["config"]
        self._server_gpu = any(g.get("kind") == "KIND_GPU" for g in detector.get("instance_group", []))
        # the network the server runs: mnet025, mnv2, or onnx (a user's own export); older servers say nothing
        self.network = detector.get("parameters", {}).get("network", {}).get("string_value", "unknown")
        self._encoded_ready = self._call(conn.is_model_ready, ENCODED_MODEL_NAME, client_timeout=self.timeout)
        self.max_image_pixels = MAX_PIXELS
        if self._encoded_ready:
            preprocess = self._call(conn.get_model_config, PREPROCESS_NAME, as_json=True,
                                    client_timeout=self.timeout)["config"]
            self.max_image_pixels = int(preprocess["parameters"]["max_pixels"]["string_value"])

    def _open_pool(self, transport: str) -> tuple[str, SlotPool | None]:
        """The transport to use and, for the letterboxing ones, its pool of input buffers."""
        frame = (self.input_height, self.input_width)
        choices = [transport] if transport != "auto" else self._auto_order()
        headers = shm_headers(_port(self.url)) if _is_local(self.url) else None
        for choice in choices:
            if choice == ENCODED:
                if self._encoded_ready:
                    log.info("rtface: using transport %s to %s", choice, self.url)
                    return choice, None
                why = (f"model '{ENCODED_MODEL_NAME}' is not ready at {self.url}; rebuild the server's "
                       "repository with this version's `make engine`")
                if transport != "auto":
                    raise ModelNotReadyError(why)
                log.warning("rtface: %s unavailable (%s); falling back", choice, why)
                continue
            pool = SlotPool(choice, frame, self._control, headers, max_detections=self.max_detections)
            if choice != "grpc":
                try:
                    reclaim_stale_regions(self._control, headers)
                    with pool.acquire(1):  # register one region now, so failure shows here
                        pass
                except (TransportError, InferenceServerException) as exc:
                    pool.close()
                    if transport != "auto":
                        raise TransportError(f"transport {choice!r} failed: {exc}") from None
                    log.warning("rtface: %s unavailable (%s); falling back", choice, exc)
                    continue
            log.info("rtface: using transport %s to %s", choice, self.url)
            return choice, pool
        raise TransportError("no transport could be set up")  # unreachable: grpc always works

    def _auto_order(self) -> list[str]:
        if not _is_local(self.url):
            return [ENCODED, "grpc"]
        order = ["cuda_shm"] if self._server_gpu and cuda_unavailable_reason() is None else []
        return order + ["system_shm", "grpc"]

    @property
    def transport(self) -> str:
        """The transport in use (``auto`` resolved)."""
        return self._transport

    def _await_server(self, deadline: float) -> None:
        """Wait until the server answers ready again (after a restart), then re-register regions."""
        delay = 0.1
        while True:
            try:
                if self._control.is_server_ready(client_timeout=max(0.1, deadline - time.monotonic())):
                    if self._pool is not None:
                        self._pool.register_again()
                    return
            except InferenceServerException:
                pass
            if time.monotonic() + delay > deadline:
                raise ServerUnavailableError(f"the server at {self.url} did not come back within "
                                             f"{self.timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # -- inference ---------------------------------------------------------------------------
    def _prepare(self, image: ImageLike) -> np.ndarray | bytes:
        """What this client's transport sends for ``image``: its encoded bytes (``encoded``) or its pixels."""
        return encode_image(image, self.max_image_pixels) if self._pool is None else load_image(image)

    def _infer(self, images: Sequence[np.ndarray | bytes], options: dict,
               backpressure: bool = False) -> list[list[Face]]:
        """One request for up to ``max_batch`` prepared images, retried after a lost server
        (``retries``) and, with ``backpressure``, after an overload until ``timeout`` passes."""
        deadline, attempts, delay = time.monotonic() + self.timeout, 0, 0.02
        while True:
            try:
                return self._infer_once(images, options)
            except ServerOverloadedError:
                if not backpressure or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except ServerUnavailableError:
                if attempts >= self.retries:
                    raise
                attempts += 1
                self._await_server(time.monotonic() + self.timeout)

    def _infer_once(self, images: Sequence[np.ndarray | bytes], options: dict) -> list[list[Face]]:
        if self._pool is None:
            return self._infer_encoded(images, options)
        count = len(images)
        with self._pool.acquire(count) as slot:
            placements = np.array([slot.stage(i, image).as_tuple() for i, image in enumerate(images)], dtype=np.float32)
            result = self._call(self._connection().infer, MODEL_NAME, slot.inputs(count, placements),
                                outputs=slot.outputs(count), parameters={**self._options, **options} or None,
                                client_timeout=self.timeout)
            arrays = slot.read(result, count)
        _warn_if_capped(arrays["capped"][:, 0], {**self._options, **options})
        return [_faces(arrays, i, (image.shape[1], image.shape[0]))
                for i, image in enumerate(images)]

    def _infer_encoded(self, images: Sequence[bytes], options: dict) -> list[list[Face]]:
        """One request of encoded images to the encoded ensemble: the bytes go in the gRPC message,
        one per batch row; the server reports each image's decoded size beside its faces."""
        tensor = grpcclient.InferInput("image", [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
        names = (*OUTPUT_LAYOUT, "image_size")
        result = self._call(self._connection().infer, ENCODED_MODEL_NAME, [tensor],
                            outputs=[grpcclient.InferRequestedOutput(name) for name in names],
                            parameters={**self._options, **options} or None, client_timeout=self.timeout)
        arrays = {name: result.as_numpy(name) for name in names}
        _warn_if_capped(arrays["capped"][:, 0], {**self._options, **options})
        return [_faces(arrays, i, tuple(arrays["image_size"][i].tolist())) for i in range(len(images))]

    def detect(self, image: ImageLike | list[ImageLike], **options) -> list[Face] | list[list[Face]]:
        """Faces in one image (``list[Face]``) or in each of a list of images (``list[list[Face]]``).

        Images are ``HxWx3`` BGR or ``HxW`` gray uint8 arrays, paths, or encoded bytes. Options
        (``score_threshold``, ``iou_threshold``, ``max_detections``) override the client's.
        Faces are sorted by descending score, in original-image pixels.
        """
        if isinstance(image, list):
            return self.detect_batch(image, **options)
        return self._infer([self._prepare(image)], options)[0]

    def detect_batch(self, images: Iterable[ImageLike], **options) -> list[list[Face]]:
        """Faces of each image, sending them in requests of up to the server's ``max_batch``."""
        results: list[list[Face]] = []
        chunk: list[np.ndarray | bytes] = []
        for image in images:
            chunk.append(self._prepare(image))
            if len(chunk) == self.max_batch:
                results += self._infer_chunk(chunk, len(results), options)
                chunk = []
        if chunk:
            results += self._infer_chunk(chunk, len(results), options)
        return results

    def _infer_chunk(self, chunk: list[np.ndarray | bytes], first: int, options: dict) -> list[list[Face]]:
        """One request of :meth:`detect_batch`, whose images start at index ``first`` of its input."""
        try:
            return self._infer(chunk, options)
        except InvalidImageError as exc:
            if exc.index is None:
                raise
            raise InvalidImageError(f"image {first + exc.index} of the batch: {exc}", index=first + exc.index) from None

    def detect_stream(self, images: Iterable[ImageLike], concurrency: int = 8, batch: int = 1,
                      **options) -> Iterator[list[Face]]:
        """Yield the faces of each image in input order, keeping ``concurrency`` requests in
        flight, each of ``batch`` consecutive images (at most the server's ``max_batch``; the
        images of one request succeed or fail together). Reads the input lazily: at most
        ``concurrency * batch`` images are held at a time. When the server reports overload,
        requests back off and retry (up to ``timeout``) instead of failing: the stream slows to
        what the server sustains.

        ``batch`` > 1 trades latency for throughput: each request costs the client a round trip
        and its Python work whatever its size, so a stream of files or recorded frames goes faster
        in batches, while a live camera, whose frame would wait for the next ones, keeps 1."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch={batch}: use 1..{self.max_batch} (the server's max_batch_size)")

        def work(chunk: list[ImageLike]) -> list[list[Face]]:
            return self._infer([self._prepare(image) for image in chunk], options, backpressure=True)

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rtface") as pool:
            pending: deque[Future] = deque()
            try:
                for chunk in _chunks(images, batch):
                    pending.append(pool.submit(work, chunk))
                    if len(pending) >= concurrency:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister and destroy this client's shared-memory regions; idempotent."""
        self._finalizer()
        atexit.unregister(self._finalizer)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chunks(images: Iterable[ImageLike], size: int) -> Iterator[list[ImageLike]]:
    """``images`` in consecutive lists of ``size`` (the last one shorter), read lazily."""
    chunk: list[ImageLike] = []
    for image in images:
        chunk.append(image)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _release(pool: SlotPool | None) -> None:
    """Unregister and destroy a client's shared-memory regions (the encoded transport has none)."""
    if pool is not None:
        pool.close()


def detect(image: ImageLike | list[ImageLike], url: str = DEFAULT_URL, *, transport: str = "auto",
           timeout: float = 30.0, **options) -> list[Face] | list[list[Face]]:
    """Detect faces with a short-lived :class:`Client`: open, :meth:`Client.detect`, close.

    ``options`` are ``score_threshold``, ``iou_threshold`` and ``max_detections``. For many
    images keep a :class:`Client` instead (it reuses its connection and shared memory).
    """
    with Client(url, transport=transport, timeout=timeout) as client:
        return client.detect(image, **options)
