"""Triton Python model: the postprocess of ``model.py`` on a GPU with PyTorch (beside BACKEND=torch).

Same options, same checks and the same results as the numpy model (``model.py``, loaded from
this directory and extended here): score threshold, rows sorted by score (stable), greedy NMS,
letterbox undone, clipped to the network frame, rows for the image with the most faces, the
``capped`` flags. Only the work
moves: ``candidates`` arrive as GPU tensors from the torch detector (``FORCE_CPU_ONLY_INPUT_TENSORS:
"no"``) and every request Triton hands over at once is processed as one batch, so a crowd of
small requests costs a few kernel launches, not a Python step per request.

Results equal the numpy model's bit for bit: the IoU is computed with the same float32
operations in the same order (eager kernels, no fused multiply-add), and greedy NMS is the same
fixed point, reached by applying "a box survives when no surviving, higher-scoring box overlaps
it" to all boxes at once until nothing changes. Imports torch and numpy only: no project code.
"""

import importlib.util
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
PAIR_ELEMENTS = 1 << 25  # box pairs compared at once (~0.7 GB of temporaries); an image past it goes alone


def load_numpy_model():
    """``model.py`` from this directory, loaded by path (whatever the stub puts on sys.path)."""
    spec = importlib.util.spec_from_file_location("rtface_postprocess_numpy", os.path.join(HERE, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


numpy_model = load_numpy_model()


def overlaps(boxes, iou_threshold):
    """``hit [B, M, M]``: box ``i`` overlaps the later box ``j`` of its image above the image's
    ``iou_threshold [B]``, with the numpy model's float32 arithmetic."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = torch.clamp(x2 - x1, min=0) * torch.clamp(y2 - y1, min=0)
    height = torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])
    width = torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])
    inter = torch.clamp(width, min=0) * height
    union = torch.clamp(areas[:, :, None] + areas[:, None, :] - inter, min=numpy_model.TINY)
    hit = (height > 0) & (inter / union > iou_threshold[:, None, None])
    return hit & torch.ones(hit.shape[1:], dtype=torch.bool, device=hit.device).triu(1)


def greedy_keep(hit, valid):
    """Greedy NMS's keep mask ``[B, M]`` from ``hit`` (see :func:`overlaps`), over the ``valid`` rows."""
    keep = valid
    while True:
        survivors = valid & ~(hit & keep[:, :, None]).any(dim=1)
        if torch.equal(survivors, keep):
            return keep
        keep = survivors


def image_groups(counts):
    """Consecutive image ranges whose pair matrices fit ``PAIR_ELEMENTS`` together."""
    groups, start, widest = [], 0, 0
    for index, count in enumerate(counts):
        widest_with = max(widest, count)
        if index > start and (index + 1 - start) * widest_with ** 2 > PAIR_ELEMENTS:
            groups.append((start, index, widest))
            start, widest_with = index, count
        widest = widest_with
    groups.append((start, len(counts), widest))
    return groups


class TritonPythonModel(numpy_model.TritonPythonModel):
    """The numpy model's checks and options; its detection step batched on the GPU."""

    def initialize(self, args):
        super().initialize(args)
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(self.device)
        self.frame_gpu = torch.from_numpy(self.frame).to(self.device)

    def _array(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor.is_cpu():
            return tensor.as_numpy()
        return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()  # letterbox sent via CUDA shm

    def _candidates(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "candidates")
        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy()).to(self.device)
        return torch.from_dlpack(tensor.to_dlpack())

    def _keep(self, rows, counts, iou):
        """Greedy NMS over the score-sorted ``rows [B, M, 15]`` (the first ``counts[b]`` of image b)."""
        keep = torch.zeros(rows.shape[:2], dtype=torch.bool, device=self.device)
        for start, end, width in image_groups(counts):
            if width == 0:
                continue
            valid = torch.arange(width, device=self.device) < torch.tensor(counts[start:end], device=self.device)[:, None]
            hit = overlaps(rows[start:end, :width, :4], iou[start:end]) & valid[:, None, :]
            keep[start:end, :width] = greedy_keep(hit, valid)
        return keep

    def _detect_batch(self, candidates, placement, thresholds, ious, limits, capped):
        """Detections of a batch of images with per-image options, as numpy arrays on the host:
        ``table [B, W, 15]`` (box, score, landmarks; W rows for the image with the most faces),
        ``found [B, 1]`` and ``capped [B, 1]`` (``capped [B]`` in: the candidate flags)."""
        batch, width = candidates.shape[0], candidates.shape[2]
        score = candidates[..., 4]
        passing = (score > thresholds[:, None]) & torch.isfinite(candidates).all(dim=-1)
        order = torch.sort(torch.where(passing, score, -torch.inf), dim=1, descending=True, stable=True).indices
        counts = passing.sum(dim=1).tolist()
        rows = torch.gather(candidates, 1, order[:, :max(counts, default=0), None].expand(-1, -1, width))
        keep = self._keep(rows, counts, ious)
        capped = capped | torch.where(keep.sum(dim=1) > limits, numpy_model.FACES_CAPPED, 0)
        rank = keep.cumsum(dim=1) - 1
        keep &= rank < limits[:, None]
        owner, column = keep.nonzero(as_tuple=True)
        kept, rank = rows[owner, column], rank[owner, column]
        points = torch.cat([kept[:, :4], kept[:, 5:]], dim=1).reshape(-1, 7, 2)
        points = torch.minimum(torch.maximum(points, torch.zeros((), device=self.device)), self.frame_gpu)
        points = (points - placement[owner, None, 1:3]) / placement[owner, 0, None, None]
        found = torch.bincount(owner, minlength=batch)
        out = torch.zeros((batch, max(1, int(found.max())), width), dtype=torch.float32, device=self.device)
        out[owner, rank] = torch.cat([points[:, :2].reshape(-1, 4), kept[:, 4:5], points[:, 2:].reshape(-1, 10)], dim=1)
        flags = torch.stack([found, capped], dim=1).to(torch.int32).cpu().numpy()
        return out.cpu().numpy(), flags[:, :1], flags[:, 1:]

    def _candidate_flags(self, candidates, threshold):
        """``CANDIDATES_CAPPED`` per image of one request's ``candidates`` (see the numpy model)."""
        per_chunk = candidates.shape[1] // self.chunks
        if per_chunk < self.per_chunk:
            return torch.zeros(len(candidates), dtype=torch.int64, device=self.device)
        full = (candidates[:, per_chunk - 1::per_chunk, 4] > threshold).any(dim=1)
        return torch.where(full, numpy_model.CANDIDATES_CAPPED, 0)

    @staticmethod
    def _padded(candidates, rows):
        """``candidates [n, r, 15]`` with zero rows appended up to ``rows`` (score 0 passes no threshold)."""
        return torch.nn.functional.pad(candidates, (0, 0, 0, rows - candidates.shape[1]))

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted = []  # (request index, candidates on the GPU, letterbox rows, options)
        for index, request in enumerate(requests):
            try:
                candidates = self._candidates(request)
                self._rows(candidates.shape[1])
                placement = self._placement(self._array(request, "letterbox"), candidates.shape[0])
                accepted.append((index, candidates, placement, self._options(request)))
            except numpy_model.RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(error=numpy_model.invalid_argument(str(exc)))
        if accepted:
            with torch.inference_mode():
                sizes = [len(c) for _, c, _, _ in accepted]
                rows = max(c.shape[1] for _, c, _, _ in accepted)  # requests may be trimmed differently
                per_image = lambda key, dtype: torch.tensor(  # noqa: E731
                    np.repeat([o[key] for *_, o in accepted], sizes), dtype=dtype, device=self.device)
                table, found, capped = self._detect_batch(
                    torch.cat([self._padded(c, rows) for _, c, _, _ in accepted]),
                    torch.from_numpy(np.concatenate([p for _, _, p, _ in accepted])).to(self.device),
                    per_image("score_threshold", torch.float32), per_image("iou_threshold", torch.float32),
                    per_image("max_detections", torch.int64),
                    torch.cat([self._candidate_flags(c, o["score_threshold"]) for _, c, _, o in accepted]))
            start = 0
            for (index, *_), size in zip(accepted, sizes):
                count = found[start:start + size]
                rows = table[start:start + size, :max(1, int(count.max()))]
                flags = capped[start:start + size]
                start += size
                responses[index] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("num_detections", np.ascontiguousarray(count)),
                    pb_utils.Tensor("boxes", np.ascontiguousarray(rows[..., :4])),
                    pb_utils.Tensor("scores", np.ascontiguousarray(rows[..., 4])),
                    pb_utils.Tensor("landmarks", np.ascontiguousarray(rows[..., 5:].reshape(size, -1, 5, 2))),
                    pb_utils.Tensor("capped", np.ascontiguousarray(flags))])
        return responses
