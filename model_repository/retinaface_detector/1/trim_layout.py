"""The detector's candidates laid out for the postprocess: what the served graphs compute.

Only torch is imported; the build compiles this layout around the graph program (AOTInductor
packages) and the server captures it in its CUDA graphs.
"""

import torch

HEAD_ROWS = 128  # rows of each top-K chunk the host gets with every batch (TrimLayout's head)


class TrimLayout(torch.nn.Module):
    """``detector(images)``'s candidates ``[n, TOPK, 15]`` (``chunks`` top-K chunks) as
    ``by_position [n, TOPK / chunks, chunks, 15]``: row r of every chunk side by side, so the rows
    a trim keeps lead each image; its first ``head`` positions as a buffer of their own; and per
    image, ``kept [n]``: how many positions hold a row above the image's ``thresholds [n]``.
    What the served detector runs, compiled at ``make engine`` or at load."""

    def __init__(self, detector, chunks, head=HEAD_ROWS):
        super().__init__()
        self.detector, self.chunks, self.head = detector, chunks, head

    def forward(self, images, thresholds):
        (candidates,) = self.detector(images)
        n, rows, width = candidates.shape
        by_position = candidates.reshape(n, self.chunks, rows // self.chunks, width).transpose(1, 2).contiguous()
        passing = (by_position[..., 4] > thresholds[:, None, None]).any(dim=2)
        position = torch.arange(1, passing.shape[1] + 1, device=passing.device)
        kept = torch.where(passing, position, 0).amax(dim=1)
        return by_position, by_position[:, :self.head].contiguous(), kept
