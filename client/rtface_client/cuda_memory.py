"""GPU memory for the ``cuda_shm`` transport, through CUDA's runtime API (cuda-bindings).

A :class:`CudaRegion` is a device buffer that the server opens through CUDA IPC, a page-locked
host buffer of the same size to letterbox into (a page-locked copy to the GPU runs at about twice
the speed of a pageable one), and a stream of its own. A request's images are copied up row by
row, each from wherever it is (the staging row it was letterboxed into, or the caller's own frame
when that already has the engine's size), then the stream is waited for once.
"""

from __future__ import annotations

import base64
import ctypes

import numpy as np

from rtface_client.errors import TransportError

__all__ = ["CudaRegion", "cuda_unavailable_reason"]

IPC_HANDLE_BYTES = 64  # CUDA_IPC_HANDLE_SIZE


def cuda_unavailable_reason() -> str | None:
    """Why CUDA memory cannot be used in this process, or None when it can (cuda-bindings imports
    and at least one CUDA device is visible)."""
    try:
        from cuda.bindings import runtime

        err, count = runtime.cudaGetDeviceCount()
    except Exception as exc:  # no cuda-bindings, no driver
        return f"no CUDA runtime ({type(exc).__name__})"
    return None if err == runtime.cudaError_t.cudaSuccess and count > 0 else "no CUDA device visible"


def _checked(what: str, result):
    """The value(s) of a cuda-bindings call, or :class:`TransportError` naming the call and CUDA's error."""
    from cuda.bindings import runtime

    err, *values = result
    if err != runtime.cudaError_t.cudaSuccess:
        raise TransportError(f"CUDA {what} failed: {runtime.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


class CudaRegion:
    """``shape`` uint8 bytes on GPU ``device`` (:attr:`staging` is its page-locked host twin)."""

    def __init__(self, shape: tuple[int, ...], device: int = 0):
        from cuda.bindings import runtime

        self._runtime, self.device, self.nbytes = runtime, device, int(np.prod(shape))
        self._device_ptr = self._host_ptr = self._stream = None
        previous = _checked("cudaGetDevice", runtime.cudaGetDevice())
        try:
            _checked("cudaSetDevice", runtime.cudaSetDevice(device))
            self._device_ptr = _checked("cudaMalloc", runtime.cudaMalloc(self.nbytes))
            self._ipc = _checked("cudaIpcGetMemHandle", runtime.cudaIpcGetMemHandle(self._device_ptr))
            self._host_ptr = _checked("cudaHostAlloc", runtime.cudaHostAlloc(self.nbytes, 0))
            self._stream = _checked("cudaStreamCreate", runtime.cudaStreamCreate())
        except TransportError:
            self.close()
            raise
        finally:
            runtime.cudaSetDevice(previous)
        buffer = (ctypes.c_uint8 * self.nbytes).from_address(int(self._host_ptr))
        self.staging = np.frombuffer(buffer, dtype=np.uint8).reshape(shape)

    def raw_handle(self) -> bytes:
        """The IPC handle, base64-encoded, as Triton's CUDA shared-memory registration takes it."""
        return base64.b64encode(ctypes.string_at(self._ipc.getPtr(), IPC_HANDLE_BYTES))

    def upload(self, parts: list[np.ndarray]) -> int:
        """Copy ``parts`` (C-contiguous uint8 arrays, host memory) one after another to the start
        of the device buffer, and wait for them; returns the bytes copied."""
        runtime, offset = self._runtime, 0
        for part in parts:
            _checked("cudaMemcpyAsync", runtime.cudaMemcpyAsync(
                int(self._device_ptr) + offset, part.ctypes.data, part.nbytes,
                runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
            offset += part.nbytes
        _checked("cudaStreamSynchronize", runtime.cudaStreamSynchronize(self._stream))
        return offset

    def close(self) -> None:
        """Free the device and host buffers and the stream; idempotent."""
        runtime = self._runtime
        self.staging = None
        if self._stream is not None:
            runtime.cudaStreamDestroy(self._stream)
        if self._host_ptr is not None:
            runtime.cudaFreeHost(self._host_ptr)
        if self._device_ptr is not None:
            runtime.cudaFree(self._device_ptr)
        self._device_ptr = self._host_ptr = self._stream = None
