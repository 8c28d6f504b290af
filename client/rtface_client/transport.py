"""How the letterboxed images reach the server: gRPC bytes, system shared memory, CUDA shared memory.

A *slot* is one request's worth of input buffer, ``[capacity, H, W, 3]`` uint8, that images are
letterboxed straight into (:meth:`Slot.stage`). With system shared memory the slot's buffer *is*
the registered region, so the pixels are never copied again on the client; with gRPC they are
serialized into the request; with CUDA shared memory they are copied from page-locked memory to
the GPU, and a frame that already has the engine's size is copied there from where it is, not
letterboxed first. With system shared memory the server also writes the outputs into the slot's
region; the small ``letterbox`` rows always travel in the gRPC message, and so do the outputs over
gRPC and CUDA. A slot keeps its request's input and output objects, so a request builds none.

Regions are named ``rtface-<pid>-<client id>-<n>``, registered once and reused; :meth:`close`
unregisters and destroys them. :func:`reclaim_stale_regions` unregisters regions whose owning
process is gone (a client killed mid-stream), so they never pile up on the server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from multiprocessing import shared_memory
from typing import Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from rtface_client.cuda_memory import CudaRegion, cuda_unavailable_reason
from rtface_client.errors import TransportError
from rtface_client.letterbox import Letterbox, letterbox_into

__all__ = ["TRANSPORTS", "OUTPUT_LAYOUT", "cuda_unavailable_reason", "Slot", "SlotPool", "reclaim_stale_regions", "REGION_PREFIX"]

log = logging.getLogger("rtface_client")
TRANSPORTS = ("grpc", "system_shm", "cuda_shm")
REGION_PREFIX = "rtface-"
# The ensemble's outputs per image: dtype and shape, None standing for the face rows (as many as
# the request's image with the most faces, at most MAX_DET).
OUTPUT_LAYOUT = {"num_detections": (np.int32, (1,)), "boxes": (np.float32, (None, 4)),
                 "scores": (np.float32, (None,)), "landmarks": (np.float32, (None, 5, 2)),
                 "capped": (np.int32, (1,))}
UNREGISTER_WAIT_S = 5.0


def _unregister(unregister, name: str, headers: dict | None) -> bool:
    """Unregister a region, waiting out a request the server still runs on it (one abandoned on
    timeout, or sent by a client that died); False, with a warning, if that does not end."""
    deadline = time.monotonic() + UNREGISTER_WAIT_S
    while True:
        try:
            unregister(name, headers=headers)
            return True
        except InferenceServerException as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                log.warning("rtface: could not unregister %s (%s); a later client reclaims it", name,
                            exc.message())
                return False
            time.sleep(0.05)


def _output_bytes(max_detections: int) -> int:
    """Bytes of one image's outputs."""
    return sum(int(np.prod([max_detections if d is None else d for d in tail])) * np.dtype(dtype).itemsize
               for dtype, tail in OUTPUT_LAYOUT.values())


class Slot:
    """One request's input buffer and how to attach it to an ``InferInput``."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.capacity = images.shape[0]
        self._inputs: dict[int, tuple[grpcclient.InferInput, grpcclient.InferInput]] = {}
        self._outputs: dict[int, list[grpcclient.InferRequestedOutput]] = {}

    def stage(self, row: int, image: np.ndarray) -> Letterbox:
        """Letterbox ``image`` into row ``row`` of this slot; its placement."""
        return letterbox_into(image, self.images[row])

    def inputs(self, count: int, placements: np.ndarray) -> list[grpcclient.InferInput]:
        """The request's inputs for the first ``count`` staged images: ``images`` and their
        ``letterbox`` rows (``placements``, float32 [count, 3])."""
        if count not in self._inputs:
            pixels = grpcclient.InferInput("images", [count, *self.images.shape[1:]], "UINT8")
            self._inputs[count] = pixels, grpcclient.InferInput("letterbox", [count, 3], "FP32")
        pixels, rows = self._inputs[count]
        self.attach(pixels, count)
        rows.set_data_from_numpy(placements)
        return [pixels, rows]

    def attach(self, tensor: grpcclient.InferInput, count: int) -> None:
        """Point ``tensor`` at the first ``count`` images of this slot."""
        tensor.set_data_from_numpy(self.images[:count])

    def outputs(self, count: int) -> list[grpcclient.InferRequestedOutput]:
        """The outputs to request for ``count`` images, made once per count."""
        if count not in self._outputs:
            self._outputs[count] = self._requested(count)
        return self._outputs[count]

    def _requested(self, count: int) -> list[grpcclient.InferRequestedOutput]:
        """The outputs to request for ``count`` images (here: in the gRPC response)."""
        return [grpcclient.InferRequestedOutput(name) for name in OUTPUT_LAYOUT]

    def read(self, result: grpcclient.InferResult, count: int) -> dict[str, np.ndarray]:
        """The outputs of a finished request, as arrays the caller owns."""
        return {name: result.as_numpy(name) for name in OUTPUT_LAYOUT}

    def register(self, server: grpcclient.InferenceServerClient, headers: dict | None) -> None:
        """Register the buffer with the server (nothing to do for plain gRPC)."""

    def close(self, server: grpcclient.InferenceServerClient | None, headers: dict | None = None) -> None:
        """Release the buffer (and its server registration)."""


class SystemShmSlot(Slot):
    """A POSIX shared-memory region registered with the server as system shared memory: the
    images, then room for the outputs of as many images, which the server writes in place."""

    def __init__(self, name: str, shape: tuple[int, ...], server: grpcclient.InferenceServerClient,
                 headers: dict | None, max_detections: int):
        self._max_det, self._pixels = max_detections, int(np.prod(shape))
        self._places: dict[int, list[tuple[str, type, int, int]]] = {}
        size = self._pixels + shape[0] * _output_bytes(max_detections)
        try:
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except OSError as exc:
            raise TransportError(f"cannot create shared memory {name} ({size} bytes): {exc}") from None
        self.name, self.byte_size = name, size
        super().__init__(np.ndarray(shape, dtype=np.uint8, buffer=self._shm.buf))
        try:
            self.register(server, headers)
        except TransportError:
            self._destroy()
            raise

    def _output_places(self, count: int) -> list[tuple[str, type, int, int]]:
        """Per output: name, dtype, offset and the bytes reserved for it (MAX_DET face rows);
        worked out once per count, since every request reads them."""
        if count not in self._places:
            places, offset = [], self._pixels
            for name, (dtype, tail) in OUTPUT_LAYOUT.items():
                size = count * int(np.prod([self._max_det if d is None else d for d in tail])) * np.dtype(dtype).itemsize
                places.append((name, dtype, offset, size))
                offset += size
            self._places[count] = places
        return self._places[count]

    def _requested(self, count: int) -> list[grpcclient.InferRequestedOutput]:
        requested = []
        for name, _, offset, size in self._output_places(count):
            output = grpcclient.InferRequestedOutput(name)
            output.set_shared_memory(self.name, size, offset=offset)
            requested.append(output)
        return requested

    def read(self, result: grpcclient.InferResult, count: int) -> dict[str, np.ndarray]:
        """The outputs the server wrote into the region, in the shapes its response states."""
        return {name: np.ndarray(tuple(result.get_output(name).shape), dtype, buffer=self._shm.buf,
                                 offset=offset).copy()
                for name, dtype, offset, _ in self._output_places(count)}

    def register(self, server: grpcclient.InferenceServerClient, headers: dict | None) -> None:
        """Register this region with the server (again, after a server restart)."""
        try:
            server.register_system_shared_memory(self.name, "/" + self.name, self.byte_size, headers=headers)
        except InferenceServerException as exc:
            if "already" not in str(exc):
                raise TransportError(f"the server could not map system shared memory /{self.name}: "
                                     f"{exc.message()}") from None

    def attach(self, tensor: grpcclient.InferInput, count: int) -> None:
        tensor.set_shared_memory(self.name, count * self._pixels // self.capacity)

    def _destroy(self) -> None:
        self.images = None  # drop the views into the segment before closing it
        self._shm.close()
        self._shm.unlink()

    def close(self, server: grpcclient.InferenceServerClient | None, headers: dict | None = None) -> None:
        if server is not None:
            _unregister(server.unregister_system_shared_memory, self.name, headers)
        self._destroy()


class CudaShmSlot(Slot):
    """A CUDA region on GPU 0 that the server reads in place, and its page-locked staging buffer."""

    def __init__(self, name: str, shape: tuple[int, ...], server: grpcclient.InferenceServerClient,
                 headers: dict | None):
        self.name = name
        self._region = CudaRegion(shape, device=0)
        super().__init__(self._region.staging)
        self._sources: list[np.ndarray | None] = [None] * self.capacity
        try:
            self.register(server, headers)
        except TransportError:
            self._region.close()
            raise

    def register(self, server: grpcclient.InferenceServerClient, headers: dict | None) -> None:
        """Register this region with the server (again, after a server restart)."""
        try:
            server.register_cuda_shared_memory(self.name, self._region.raw_handle(), self._region.device,
                                               self._region.nbytes, headers=headers)
        except InferenceServerException as exc:
            if "already" not in str(exc):
                raise TransportError(f"the server could not open CUDA shared memory {self.name}: "
                                     f"{exc.message()}") from None

    def stage(self, row: int, image: np.ndarray) -> Letterbox:
        """A frame that already has the engine's size (uint8 BGR, C order) is copied to the GPU from
        where it is; any other image is letterboxed into the staging row first."""
        if image.shape == self.images.shape[1:] and image.dtype == np.uint8 and image.flags.c_contiguous:
            self._sources[row] = image
            return Letterbox(scale=1.0)
        self._sources[row] = self.images[row]
        return letterbox_into(image, self.images[row])

    def attach(self, tensor: grpcclient.InferInput, count: int) -> None:
        sources, self._sources = self._sources[:count], [None] * self.capacity  # keep no caller's frame
        tensor.set_shared_memory(self.name, self._region.upload(sources))

    def close(self, server: grpcclient.InferenceServerClient | None, headers: dict | None = None) -> None:
        if server is not None:
            _unregister(server.unregister_cuda_shared_memory, self.name, headers)
        self.images = None
        self._region.close()


SLOT_TYPES = {"grpc": None, "system_shm": SystemShmSlot, "cuda_shm": CudaShmSlot}


class SlotPool:
    """Slots of one transport, created on demand, reused, and all released by :meth:`close`."""

    def __init__(self, transport: str, frame: tuple[int, int], server: grpcclient.InferenceServerClient,
                 headers: dict | None = None, *, max_detections: int):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}: use one of {', '.join(TRANSPORTS)} or 'auto'")
        self.transport = transport
        self._frame = frame  # (height, width)
        self._max_det = max_detections
        self._server = server
        self._headers = headers  # the local token header, where the server requires it
        self._prefix = f"{REGION_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._free: list[Slot] = []
        self._all: list[Slot] = []
        self._lock = threading.Lock()

    def _create(self, capacity: int) -> Slot:
        """A new slot; called with the lock held (names are numbered, registration serialized)."""
        shape = (capacity, *self._frame, 3)
        kind = SLOT_TYPES[self.transport]
        name = f"{self._prefix}{len(self._all)}"
        if kind is None:
            slot = Slot(np.empty(shape, dtype=np.uint8))
        elif kind is SystemShmSlot:
            slot = kind(name, shape, self._server, self._headers, self._max_det)
        else:
            slot = kind(name, shape, self._server, self._headers)
        self._all.append(slot)
        return slot

    @contextmanager
    def acquire(self, count: int) -> Iterator[Slot]:
        """A slot holding at least ``count`` images, exclusively for the ``with`` block."""
        with self._lock:
            slot = next((s for s in self._free if s.capacity >= count), None)
            if slot is None:
                slot = self._create(count)
            else:
                self._free.remove(slot)
        try:
            yield slot
        finally:
            with self._lock:
                self._free.append(slot)

    def register_again(self) -> None:
        """Register every region again (the server restarted and forgot them)."""
        with self._lock:
            slots = list(self._all)
        for slot in slots:
            slot.register(self._server, self._headers)

    def close(self) -> None:
        """Unregister and destroy every region this pool made."""
        with self._lock:
            slots, self._all, self._free = self._all, [], []
        for slot in slots:
            slot.close(self._server, self._headers)


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name[len(REGION_PREFIX):].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale_regions(server: grpcclient.InferenceServerClient, headers: dict | None = None) -> list[str]:
    """Unregister this SDK's regions whose owning process has died, or whose segment its owner
    already destroyed; return their names. Only meaningful when client and server share a
    host (process ids and /dev/shm are this host's)."""
    reclaimed = []
    system = server.get_system_shared_memory_status(as_json=True, headers=headers).get("regions", {})
    for name in system:
        if not name.startswith(REGION_PREFIX):
            continue
        segment = f"/dev/shm/{name}"
        if os.path.exists(segment) and _owner_alive(name):
            continue
        if _unregister(server.unregister_system_shared_memory, name, headers):
            if os.path.exists(segment):
                os.unlink(segment)
            reclaimed.append(name)
    cuda = server.get_cuda_shared_memory_status(as_json=True, headers=headers).get("regions", {})
    for name in cuda:
        if name.startswith(REGION_PREFIX) and not _owner_alive(name):
            if _unregister(server.unregister_cuda_shared_memory, name, headers):
                reclaimed.append(name)
    return reclaimed
