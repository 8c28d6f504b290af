"""The postprocess on the GPU, inside the torch detector's CUDA graph: candidates -> faces.

:class:`GpuDetections` runs behind the network in the same captured graph, so a request costs one
replay and one copy to the host. Per image it does what the numpy postprocess
(``shared_postprocess.py`` at the repository's top) does: the score threshold (rows with a non-finite value
are skipped), the rows sorted by score (stable, in candidate order), greedy NMS, the
``max_detections`` cap, the letterbox undone (original = (network - pad) / scale) after clipping
to the network frame, and the ``capped`` bits. The results are the numpy model's bit for bit:
every value comes from the same float32 operations in the same order, as separate kernels (no
fused multiply-add).

It holds a fixed number of rows (:data:`ROWS` in the detector): the best ``rows`` candidates
above the threshold, which on an ordinary frame are all of them. An image with more (a crowd), or
whose NMS has not settled after ``sweeps`` rounds, is flagged, and the detector gives it the numpy
postprocess. Imports torch and numpy only.
"""

from typing import NamedTuple

import numpy as np
import torch

ROWS = 512    # candidates above the threshold an image may have for the GPU path (a face: about twenty)
# The graph sorts ROWS x top-K chunks keys per image: within 4,096 (up to 7 chunks) PyTorch's in-place kernel;
# past it CUB's segmented sort, reported not to capture correctly (docs/benchmarks.md, "Per-request cost")
SWEEPS = 6    # rounds of the greedy fixed point in the graph: overlap chains are short (docs/architecture.md)
WIDTH = 15    # x1, y1, x2, y2, score, 5 landmarks (x, y), as the detector's candidates
PARAMETERS = ("score_threshold", "iou_threshold", "max_detections", "scale", "pad_x", "pad_y")  # per image
CANDIDATES_CAPPED, FACES_CAPPED = 1, 2  # bits of the `capped` output, as the numpy postprocess sets them
TINY = torch.finfo(torch.float32).tiny  # keeps IoU finite for degenerate boxes, as the numpy model does


class Found(NamedTuple):
    """One image's results of :class:`GpuDetections`, read on the host."""

    faces: np.ndarray  # [rows, 15], by descending score, zeros past ``count``
    count: int         # faces, at most the image's max_detections
    capped: int        # the ``capped`` bits
    unsettled: bool    # True: these results do not hold (too many candidates, or NMS not settled)
    above: int         # candidates above the image's score threshold


def write_parameters(rows, options, placement):
    """Write one request's :data:`PARAMETERS` into ``rows`` (its images' rows of the graph's
    per-image input, a numpy view): its options and its images' letterbox rows."""
    rows[:, 0] = options["score_threshold"]
    rows[:, 1] = options["iou_threshold"]
    rows[:, 2] = options["max_detections"]
    rows[:, 3:6] = placement


def unpack(packed, rows=ROWS):
    """:class:`Found` of one image's row of :meth:`GpuDetections.forward`'s output (a numpy view)."""
    count, capped, unsettled, above = packed[rows * WIDTH:].tolist()
    return Found(packed[:rows * WIDTH].reshape(rows, WIDTH), int(count), int(capped), unsettled > 0, int(above))


def overlaps(boxes, iou_threshold):
    """``hit [B, M, M]``: box ``i`` overlaps box ``j`` of its image by more than the image's
    ``iou_threshold [B]``, with the numpy model's float32 arithmetic (IoU = intersection /
    max(area_i + area_j - intersection, TINY))."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = torch.clamp(x2 - x1, min=0) * torch.clamp(y2 - y1, min=0)
    height = torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])
    width = torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])
    inter = torch.clamp(width, min=0) * height
    union = torch.clamp(areas[:, :, None] + areas[:, None, :] - inter, min=TINY)
    return (height > 0) & (inter / union > iou_threshold[:, None, None])


class GpuDetections(torch.nn.Module):
    """``forward(by_position, parameters)`` -> ``packed [B, rows * 15 + 4]``.

    ``by_position [B, P, C, 15]``: the candidates of ``C`` top-K chunks of ``P`` rows each, row
    ``r`` of every chunk side by side (the detector's trim layout), each chunk sorted by score.
    ``parameters [B, 6]``: per image, :data:`PARAMETERS` (options already validated; ``scale``,
    ``pad_x``, ``pad_y`` place the original image in the ``width`` x ``height`` network frame).

    ``packed`` per image (:func:`unpack`): ``rows`` face rows of 15 (x1, y1, x2, y2, score,
    landmarks; original pixels; by descending score, zeros past the count), the face count, the
    ``capped`` bits, 1.0 where these results do not hold (more than ``rows`` candidates above its
    threshold, or NMS not settled in ``sweeps`` rounds) and its candidates above the threshold."""

    def __init__(self, width, height, rows=ROWS, sweeps=SWEEPS):
        super().__init__()
        self.rows, self.sweeps = rows, sweeps
        self.register_buffer("frame", torch.tensor([float(width), float(height)]), persistent=False)
        self.register_buffer("later", torch.ones(rows, rows, dtype=torch.bool).triu(1), persistent=False)

    def _ranked(self, by_position, threshold):
        """The ``rows`` best candidates above ``threshold`` of each image, by descending score
        (stable in candidate order: chunk by chunk), and which of them are real (``valid``).
        All of an image's candidates above its threshold are among the first ``rows`` of their
        chunks as long as there are at most ``rows`` of them (the fallback flag covers the rest)."""
        batch, positions, chunks, width = by_position.shape
        rows = min(self.rows, positions)
        head = by_position[:, :rows].transpose(1, 2).reshape(batch, chunks * rows, width)
        if head.shape[1] < self.rows:  # a small input with fewer candidates: zero rows pass no threshold
            head = torch.nn.functional.pad(head, (0, 0, 0, self.rows - head.shape[1]))
        valid = (head[..., 4] > threshold[:, None]) & torch.isfinite(head).all(dim=2)
        key = torch.where(valid, head[..., 4], torch.full_like(head[..., 4], -torch.inf))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :self.rows]
        ranked = torch.gather(head, 1, order[..., None].expand(-1, -1, width))
        valid = torch.gather(valid, 1, order)
        return ranked, valid

    def _greedy(self, hit, valid):
        """Greedy NMS's keep mask [B, rows] over the ``valid`` rows in score order, and whether it
        settled: a row survives when no surviving earlier row overlaps it (``hit``, earlier ->
        later). That rule has one solution; applied to all rows at once it reaches it after as
        many rounds as the longest chain of overlaps (a handful on real frames); one more round
        that changes nothing proves it."""
        dtype = torch.float16 if hit.is_cuda else torch.float32  # 0/1 and counts up to ROWS: exact in both
        overlap = (hit & self.later & valid[:, None, :]).to(dtype)
        alive = valid.to(dtype)[:, None, :]
        keep = alive
        for _ in range(self.sweeps):
            keep = torch.baddbmm(alive, keep, overlap, alpha=-1).clamp_(min=0)  # alive and no kept earlier row
        settled = torch.baddbmm(alive, keep, overlap, alpha=-1).clamp_(min=0)
        return keep[:, 0] > 0, (settled == keep).all(dim=2)[:, 0]

    def forward(self, by_position, parameters):
        batch, positions, _, width = by_position.shape
        threshold, iou, limit = parameters[:, 0], parameters[:, 1], parameters[:, 2]
        ranked, valid = self._ranked(by_position, threshold)
        keep, settled = self._greedy(overlaps(ranked[..., :4], iou), valid)
        found = keep.sum(dim=1)
        rank = keep.cumsum(dim=1) - 1
        kept = keep & (rank < limit[:, None])
        capped = torch.where(found > limit, FACES_CAPPED, 0) | torch.where(
            (by_position[:, positions - 1, :, 4] > threshold[:, None]).any(dim=1), CANDIDATES_CAPPED, 0)
        above = (by_position[..., 4] > threshold[:, None, None]).sum(dim=(1, 2))
        points = torch.cat([ranked[..., :4], ranked[..., 5:]], dim=2).reshape(batch, self.rows, 7, 2)
        points = torch.minimum(torch.maximum(points, torch.zeros_like(points)), self.frame)
        points = (points - parameters[:, None, None, 4:6]) / parameters[:, None, None, 3:4]
        table = torch.cat([points[:, :, :2].reshape(batch, self.rows, 4), ranked[..., 4:5],
                           points[:, :, 2:].reshape(batch, self.rows, 10)], dim=2)
        slot = torch.where(kept, rank, self.rows)  # rows not kept land in a spare row, dropped below
        faces = torch.zeros((batch, self.rows + 1, width), dtype=table.dtype, device=table.device)
        faces.scatter_(1, slot[..., None].expand(-1, -1, width), table)
        flags = torch.stack([torch.minimum(found, limit.long()), capped, (above > self.rows) | ~settled, above], dim=1)
        return torch.cat([faces[:, :self.rows].reshape(batch, -1), flags.to(table.dtype)], dim=1)


class Finished(torch.nn.Module):
    """The detector in the trim layout, then :class:`GpuDetections`:
    ``(images, parameters [n, 6])`` -> ``(by_position, packed)``: what each graph runs."""

    def __init__(self, layout, detections):
        super().__init__()
        self.layout, self.detections = layout, detections

    def forward(self, images, parameters):
        (by_position,) = self.layout(images)
        return by_position, self.detections(by_position, parameters)


def faces_outputs(found):
    """One request's outputs from its images' :class:`Found` (as many face rows as
    its image with the most faces, at least one; zeros past each image's count)."""
    count = np.array([f.count for f in found], dtype=np.int32)
    table = np.zeros((len(found), max(1, int(count.max())), WIDTH), dtype=np.float32)
    for row, f in zip(table, found):
        row[:f.count] = f.faces[:f.count]
    return {"num_detections": count.reshape(-1, 1), "boxes": np.ascontiguousarray(table[..., :4]),
            "scores": np.ascontiguousarray(table[..., 4]),
            "landmarks": np.ascontiguousarray(table[..., 5:]).reshape(len(found), -1, 5, 2),
            "capped": np.array([[f.capped] for f in found], dtype=np.int32)}
