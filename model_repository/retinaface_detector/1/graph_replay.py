"""CUDA graphs of a module, one per batch bucket, that read their per-item inputs from and write
their outputs to page-locked host memory: a request costs one replay and one wait.

Imports torch and numpy only.
"""

import time

import numpy as np
import torch


def page_locked(shape, dtype=np.float32):
    """A zeroed numpy array in page-locked host memory, which CUDA copies to and from
    asynchronously, so a CUDA graph can read or write it (registered with ``cudaHostRegister``
    here, outside PyTorch's pinned-memory cache, whose bookkeeping is no part of a graph)."""
    array = np.zeros(shape, dtype=dtype)
    status = int(torch.cuda.cudart().cudaHostRegister(array.ctypes.data, max(array.nbytes, 1), 1))  # portable
    if status != 0:
        raise RuntimeError(f"cudaHostRegister of {array.nbytes} bytes failed with cudaError {status}")
    return array


class GraphReplay:
    """``module`` captured into one CUDA graph per batch size in ``buckets``, for a batch of uint8
    items [b, *``item_shape``] on ``device`` (images [b, H, W, 3]) and,
    per item, one float32 input of each shape in ``per_image`` (e.g. ``()`` for a score threshold):
    ``module(items, *those)`` returns a tensor or a tuple of them. ``module`` is one callable for
    every batch size, or a mapping from batch size to the callable compiled for it (AOTInductor
    packages). ``seconds`` holds each bucket's warm-up and capture time.

    The per-image inputs live in page-locked host memory (:meth:`host_inputs`), which each graph
    copies to the GPU itself; the outputs whose indices are in ``to_host`` are copied by the graph
    into page-locked host memory (:meth:`host_outputs`). A request then costs the caller filling
    arrays, one :meth:`replay` and one wait. :meth:`run` replays the smallest graph that fits."""

    def __init__(self, module, item_shape, buckets, device, per_image=(), to_host=()):
        self.module = module  # the graphs read its weights in place: they must outlive every replay
        self.graphs, self.seconds = {}, {}
        self._host_in = [page_locked((max(buckets), *shape)) for shape in per_image]
        self._host_out = None
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for batch in sorted(set(buckets), reverse=True):  # largest first: the rest reuse its pool
                started = time.perf_counter()
                run = module[batch] if isinstance(module, dict) else module
                images = torch.zeros((batch, *item_shape), dtype=torch.uint8, device=device)
                extras = [torch.zeros((batch, *shape), dtype=torch.float32, device=device) for shape in per_image]
                staged = [torch.from_numpy(host[:batch]) for host in self._host_in]

                def step():
                    for buffer, host in zip(extras, staged):
                        buffer.copy_(host, non_blocking=True)
                    outputs = run(images, *extras)
                    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
                    for index, host in zip(to_host, self._host_out):
                        torch.from_numpy(host[:batch]).copy_(outputs[index], non_blocking=True)
                    return outputs

                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    if self._host_out is None:  # sized by the largest bucket's outputs
                        shapes = run(images, *extras)
                        shapes = (shapes,) if isinstance(shapes, torch.Tensor) else shapes
                        self._host_out = [page_locked(tuple(shapes[i].shape), torch_to_numpy(shapes[i].dtype))
                                          for i in to_host]
                    for _ in range(3):  # cuDNN (and torch.compile) settle before the capture
                        step()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    outputs = step()
                self.graphs[batch] = (graph, images, outputs)
                torch.cuda.synchronize(device)
                self.seconds[batch] = time.perf_counter() - started
        self.buckets = sorted(self.graphs)

    def _graph(self, total):
        """(graph, images, outputs) of the smallest bucket that holds ``total`` images."""
        batch = next((b for b in self.buckets if b >= total), None)
        if batch is None:
            raise ValueError(f"{total} images exceed the largest captured batch {self.buckets[-1]}")
        return self.graphs[batch]

    def inputs(self, total):
        """The input rows ``[total, *item_shape]`` of the smallest graph that holds ``total`` items,
        for the caller to fill on the current stream before :meth:`replay` (rows past ``total``
        keep earlier images; their outputs are ignored)."""
        return self._graph(total)[1][:total]

    def host_inputs(self, total):
        """The per-image inputs of the next :meth:`replay`: one page-locked numpy array
        ``[total, *shape]`` per ``per_image`` shape, for the caller to fill."""
        return [host[:total] for host in self._host_in]

    def host_outputs(self, total):
        """The ``to_host`` outputs of the last :meth:`replay`, as page-locked numpy arrays
        ``[total, ...]``: valid once the caller has waited for the replay, until the next one."""
        return [host[:total] for host in self._host_out]

    def replay(self, total):
        """Replay the graph for the ``total`` images :meth:`inputs` and :meth:`host_inputs` hold:
        its outputs, views of the graph's buffers, queued on the current stream. The next replay
        overwrites them, so copy what you keep before that."""
        graph, _, outputs = self._graph(total)
        graph.replay()
        return tuple(output[:total] for output in outputs)

    def fill(self, parts):
        """Copy ``parts`` (uint8 [n_i, H, W, 3] tensors, CPU or GPU; together at most the largest
        bucket) into :meth:`inputs` one after another, on the current stream; their total."""
        total = sum(len(part) for part in parts)
        images, start = self.inputs(total), 0
        with torch.inference_mode():
            for part in parts:
                images[start:start + len(part)].copy_(part, non_blocking=True)
                start += len(part)
        return total

    def run(self, parts):
        """:meth:`replay` of ``parts`` (:meth:`fill`), for a module without per-image inputs."""
        return self.replay(self.fill(parts))


def torch_to_numpy(dtype):
    """The numpy dtype of a torch dtype."""
    return torch.empty((), dtype=dtype).numpy().dtype
