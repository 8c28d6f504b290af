"""The detector's candidates laid out for the postprocess: what the served graphs compute.

Only torch is imported; the build compiles this layout around the graph program (AOTInductor
packages) and the server captures it in its CUDA graphs.
"""

import torch


class TrimLayout(torch.nn.Module):
    """``detector(images)``'s candidates ``[n, TOPK, 15]`` (``chunks`` top-K chunks, each sorted
    by score) as ``(by_position,)``, ``[n, TOPK / chunks, chunks, 15]``: row r of every chunk side
    by side, so each image's best rows lead it. What the served detector runs, compiled at
    ``make engine`` or at load, in front of ``gpu_detections.GpuDetections``."""

    def __init__(self, detector, chunks):
        super().__init__()
        self.detector, self.chunks = detector, chunks

    def forward(self, images):
        (candidates,) = self.detector(images)
        n, rows, width = candidates.shape
        return (candidates.reshape(n, self.chunks, rows // self.chunks, width).transpose(1, 2).contiguous(),)


def chunk_major(by_position):
    """:class:`TrimLayout`'s rows ``[n, P, chunks, 15]`` as the numpy postprocess takes
    candidates, ``[n, chunks * P, 15]``: one chunk after another (a copy)."""
    n, positions, chunks, width = by_position.shape
    return by_position.transpose(1, 2).reshape(n, chunks * positions, width)
