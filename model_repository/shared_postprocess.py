"""RetinaFace detections from the detector's top-K candidates, with numpy: the postprocess.

Per image: score threshold (rows with non-finite values are skipped), the rows left sorted by
score (stable: candidates may arrive in sorted runs, one per top-K chunk), greedy NMS, letterbox
undone (original = (network - pad) / scale), clipped to the network frame. :meth:`Postprocess.detect`
returns as many rows as the request's image with the most faces (at least one; rows past an
image's ``num_detections`` are zeros), not MAX_DET. ``capped`` says per image which cap was
reached: ``CANDIDATES_CAPPED`` when a top-K chunk's lowest candidate still passes the score
threshold (the engine's TOPK may have dropped faces), ``FACES_CAPPED`` when NMS kept more faces
than ``max_detections``.

Options come from the model config's parameters (defaults) and, per request, from request
parameters ``score_threshold``, ``iou_threshold`` and ``max_detections``. numpy only. Shared by
the postprocess model (``retinaface_postprocess``, which runs in a stock Triton container) and
the torch detector, which runs it in its own process for the options and for the images its GPU
path hands back.
"""

import ctypes
import json

import numpy as np

TINY = np.finfo(np.float32).tiny  # keeps IoU finite for degenerate (zero-area) boxes
SCALE_RANGE = (1e-3, 1e4)  # network pixels per original pixel: beyond these, coordinates are nonsense
OPTION_TYPES = {"score_threshold": float, "iou_threshold": float, "max_detections": int}
HEAP_KEEP_BYTES = 32 << 20  # arrays below this size are served from the heap, not fresh mmaps
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters
SWEEP_SPAN = 1e5  # network pixels; boxes reaching past it are still compared, just not pruned
PAIR_BUDGET = 1 << 21  # candidate pairs compared at once (~100 MB); past it, NMS goes box by box
LEADING_STEPS = 4  # greedy steps taken in every image at once before the pair search
STEPPED_BOXES = 512  # images with more boxes than this (crowds) skip those steps: each would remove one face of many
WINDOW_MARGIN = 1e-4  # relative slack on the IoU threshold in the sweep's reach (float32 IoU errs by < 1e-6)
WINDOW_MIN = 1e-3  # boxes under this many pixels a side, or IoU thresholds under it: the sweep reaches x2
CANDIDATES_CAPPED, FACES_CAPPED = 1, 2  # bits of the `capped` output


class RequestError(ValueError):
    """A request the model cannot serve; its message goes back as the error status."""


def ranges(starts, counts):
    """``(owner, index)`` for every ``index`` in ``[starts[k], starts[k] + counts[k])``, over all ``k``."""
    owner = np.repeat(np.arange(len(starts)), counts)
    return owner, np.arange(len(owner)) + np.repeat(starts - np.cumsum(counts) + counts, counts)


def box_iou(boxes):
    """``iou(a, b)``: the IoU of ``boxes`` [M, 4] ``a`` and ``b`` (indices, broadcast together),
    in float32 with the rounding every NMS path of this model shares."""
    x1, y1, x2, y2 = np.ascontiguousarray(boxes.T)
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)

    def iou(a, b):
        width = np.maximum(np.minimum(x2[a], x2[b]) - np.maximum(x1[a], x1[b]), 0)
        height = np.maximum(np.minimum(y2[a], y2[b]) - np.maximum(y1[a], y1[b]), 0)
        inter = width * height
        return inter / np.maximum(areas[a] + areas[b] - inter, TINY)
    return iou


def sweep_reach(boxes, iou_threshold):
    """How far along x each box of ``boxes`` [M, 4] looks for overlapping boxes that start after it.

    IoU <= x-overlap / width of either box, so a box starting after box i overlaps it by more
    than ``iou_threshold`` only if it starts before ``x2 - iou_threshold * width`` of box i: on
    crowds that leaves a third of the candidate pairs out. The reach is computed in float64
    with the threshold lowered by ``WINDOW_MARGIN``, a hundred times what float32 rounding can
    add to the IoU the pairs are tested with, and rounded up, so no pair that test accepts is
    left out. Boxes thinner than ``WINDOW_MIN`` (where float32 underflow could outweigh the
    margin) and thresholds below it reach the box's far edge, ``x2``."""
    x1, y1, x2, y2 = boxes.T.astype(np.float64)
    if iou_threshold < WINDOW_MIN:
        return x2
    reach = np.nextafter(x2 - iou_threshold * (1 - WINDOW_MARGIN) * (x2 - x1), np.inf)
    return np.where((x2 - x1 >= WINDOW_MIN) & (y2 - y1 >= WINDOW_MIN), reach, x2)


def overlapping_pairs(boxes, image, iou_threshold):
    """Index pairs ``(earlier, later)`` of ``boxes`` [M, 4] of the same ``image`` whose IoU
    exceeds ``iou_threshold``, or ``None`` when the sweep would compare more than ``PAIR_BUDGET``
    pairs at once.

    A sweep over x pairs each box only with the boxes that start within its reach
    (:func:`sweep_reach`). Each image gets its own lane on the sweep axis, so boxes of different
    images never meet; coordinates are clamped to ``SWEEP_SPAN`` on that axis only, which can
    add candidate pairs but never lose one. Pairs that do not also meet in y are dropped before
    the IoU is computed."""
    x1, y1, x2, y2 = np.ascontiguousarray(boxes.T)
    lane = image * (4.0 * SWEEP_SPAN)
    starts = lane + np.clip(x1, -SWEEP_SPAN, SWEEP_SPAN)
    ends = lane + np.clip(sweep_reach(boxes, iou_threshold), -SWEEP_SPAN, SWEEP_SPAN)
    order = np.argsort(starts, kind="stable")
    following = np.arange(1, len(order) + 1)  # each box pairs with boxes after it in x1 order
    counts = np.maximum(np.searchsorted(starts[order], ends[order], side="right") - following, 0)
    if counts.sum() > PAIR_BUDGET:
        return None
    first, second = ranges(following, counts)  # positions in x order
    low, high = y1[order], y2[order]  # the earlier box's repeat, the later box's lie close together
    meet = np.flatnonzero(  # a fifth of the pairs, scattered: indices pick them faster than a mask
        np.minimum(np.repeat(high, counts), high[second]) > np.maximum(np.repeat(low, counts), low[second]))
    a, b = order[first[meet]], order[second[meet]]
    hit = box_iou(boxes)(a, b) > iou_threshold
    a, b = a[hit], b[hit]
    return np.minimum(a, b), np.maximum(a, b)


def leading_greedy(boxes, image, iou_threshold, steps):
    """The first ``steps`` steps of greedy NMS in every image at once: each image's best
    remaining box is kept and drops the boxes it overlaps. Returns the kept indices and the
    indices still undecided, both in ``boxes`` order.

    A large face arrives as one cluster of dozens of candidates that all overlap each other
    (the astronaut: 60 candidates, 1,770 overlapping pairs): a step removes the whole cluster at
    a cost linear in the boxes, where the pair search would enumerate every pair."""
    iou = box_iou(boxes)
    left, kept = np.arange(len(boxes)), []
    for _ in range(steps):
        if not left.size:
            break
        owner = image[left]
        opens = np.empty(len(left), dtype=bool)  # each image's best remaining box
        opens[0] = True
        np.not_equal(owner[1:], owner[:-1], out=opens[1:])
        best = np.maximum.accumulate(np.where(opens, left, 0))  # per remaining box: its image's best
        dropped = iou(best, left) > iou_threshold
        dropped |= opens
        kept.append(left[opens])
        left = left[~dropped]
    return np.concatenate(kept or [left[:0]]), left


def greedy_over_pairs(count, earlier, later):
    """Greedy NMS's keep mask over ``count`` boxes in score order, from their overlapping pairs.

    Greedy NMS keeps box k exactly when no kept box before k overlaps it. That rule has one
    solution, reached by applying it to all boxes at once until nothing changes (at most as many
    rounds as the longest chain of overlaps, a handful on real frames): a few array operations
    instead of a Python step per kept box."""
    keep = np.ones(count, dtype=bool)
    while True:
        suppressed = np.zeros(count, dtype=bool)
        suppressed[later[keep[earlier]]] = True
        if np.array_equal(~suppressed, keep):
            return keep
        keep = ~suppressed


def greedy_one_by_one(boxes, iou_threshold, limit):
    """Greedy NMS's kept indices for one image's ``boxes`` in score order, a kept box per step:
    memory linear in the boxes, for the pathological inputs ``overlapping_pairs`` declines."""
    iou = box_iou(boxes)
    order = np.arange(len(boxes))
    keep = []
    while order.size and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(best)
        order = rest[iou(best, rest) <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def nms(boxes, image, iou_threshold, limit):
    """Greedy NMS per image over ``boxes`` [M, 4] grouped by ``image`` and sorted by descending
    score within it: a box is dropped when its IoU with a kept, higher-scoring box of its image
    exceeds ``iou_threshold``. Returns the kept indices and each one's rank in its image: all of
    them, or at least ``limit + 1`` per image where an image keeps more than ``limit``.

    A few greedy steps first (:func:`leading_greedy`; on ordinary frames they decide every box)
    in the images of at most ``STEPPED_BOXES`` boxes, then the rest from overlapping pairs."""
    crowded = np.bincount(image)[image] > STEPPED_BOXES
    if crowded.any():
        stepped = np.flatnonzero(~crowded)
        kept, left = leading_greedy(boxes[stepped], image[stepped], iou_threshold, LEADING_STEPS)
        kept, left = stepped[kept], np.sort(np.concatenate([stepped[left], np.flatnonzero(crowded)]))
    else:
        kept, left = leading_greedy(boxes, image, iou_threshold, LEADING_STEPS)
    if left.size:
        undecided, owner = boxes[left], image[left]
        pairs = overlapping_pairs(undecided, owner, iou_threshold)
        if pairs is not None:
            rest = np.flatnonzero(greedy_over_pairs(len(left), *pairs))
        else:
            firsts = np.flatnonzero(np.diff(owner, prepend=-1))  # where each image's boxes begin
            rest = np.concatenate([lo + greedy_one_by_one(undecided[lo:hi], iou_threshold, limit + 1)
                                   for lo, hi in zip(firsts, np.append(firsts[1:], len(left)))])
        kept = np.concatenate([kept, left[rest]])
    index = np.sort(kept)
    owners = image[index]
    rank = np.arange(len(index)) - np.searchsorted(owners, owners)
    return index, rank


def by_image_then_score(image, scores):
    """One int64 sort key per row: ascending image, then descending score. ``scores`` are finite
    and positive (they passed a threshold >= 0), and positive float32 values order like their
    bit patterns, so the key is exact; one stable sort instead of two, fast on the chunks'
    presorted runs."""
    return (image.astype(np.int64) << 32) | (np.int64(0x7FFFFFFF) - scores.view(np.int32))


def keep_heap_warm():
    """Let glibc serve the NMS temporaries (0.1-5 MB per crowd frame) from the heap it keeps.

    By default glibc maps each allocation above ~128 KiB fresh and unmaps it on free, so every
    request pays page faults for its own scratch arrays: twice the NMS time on a crowd frame.
    This process is this model instance's own stub, so the setting stays local to it; on a libc
    without ``mallopt`` nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * HEAP_KEEP_BYTES)
    except (OSError, AttributeError):
        pass


class Postprocess:
    """Threshold, NMS and letterbox undo with the options of one model config (``params``: its
    parameters ``max_detections``, ``topk_chunks``, ``topk_per_chunk``, ``network_width``,
    ``network_height`` and the default options): what this model runs per request, and what the
    torch detector runs for the images its GPU path hands back (crowds)."""

    def __init__(self, params):
        self.max_det = int(params["max_detections"])
        self.chunks = int(params.get("topk_chunks", "1"))
        self.per_chunk = int(params["topk_per_chunk"])
        self.frame = np.array([float(params["network_width"]), float(params["network_height"])],
                              dtype=np.float32)
        self.defaults = self.validated({name: kind(params[name]) for name, kind in OPTION_TYPES.items()
                                        if name in params})

    def validated(self, options):
        """``options``, checked against their ranges (:class:`RequestError` naming the one that is not)."""
        score = options.get("score_threshold")
        if score is not None and not 0.0 <= score <= 1.0:
            raise RequestError(f"score_threshold={score} is out of range: use 0..1")
        iou = options.get("iou_threshold")
        if iou is not None and not 0.0 < iou <= 1.0:
            raise RequestError(f"iou_threshold={iou} is out of range: use a value in (0, 1]")
        count = options.get("max_detections")
        if count is not None and not 1 <= count <= self.max_det:
            raise RequestError(f"max_detections={count} is out of range: use 1..{self.max_det}")
        return options

    def options(self, parameters):
        """A request's options: its ``parameters`` (the JSON text of Triton's request parameters)
        over the config's defaults, validated."""
        raw = json.loads(parameters or "{}")
        options = dict(self.defaults)
        for name, value in raw.items():
            kind = OPTION_TYPES.get(name)
            if kind is None:
                continue  # parameters meant for other steps or for Triton itself
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise RequestError(f"parameter {name}={value!r} must be a number")
            try:
                number = kind(value)
            except ValueError:
                raise RequestError(f"parameter {name}={value!r} is not a valid {kind.__name__}") from None
            if kind is int and float(value) != number:
                raise RequestError(f"parameter {name}={value!r} must be a whole number")
            if kind is float and not np.isfinite(number):
                raise RequestError(f"parameter {name}={value!r} must be finite")
            options[name] = number
        return self.validated(options)

    def placement(self, placement, batch):
        """``placement`` (a request's ``letterbox`` rows), checked against a batch of ``batch`` images."""
        if placement.shape[0] != batch:
            raise RequestError(f"letterbox has {placement.shape[0]} rows for a batch of "
                               f"{batch} images; send one (scale, pad_x, pad_y) row per image")
        scale, pads = placement[:, 0], placement[:, 1:]
        if not (np.all(np.isfinite(placement)) and np.all((scale >= SCALE_RANGE[0]) & (scale <= SCALE_RANGE[1]))
                and np.all(np.abs(pads) <= self.frame.max())):
            raise RequestError(f"letterbox rows must be (scale, pad_x, pad_y) with scale in "
                               f"[{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] and |pad| <= {self.frame.max():g}, "
                               "all finite; original = (network - pad) / scale")
        return placement

    def rows(self, rows):
        """``rows``, the request's candidate count per image, checked against the chunk layout."""
        if rows % self.chunks or not self.chunks <= rows <= self.chunks * self.per_chunk:
            raise RequestError(f"candidates has {rows} rows per image: send the detector's output, "
                               f"{self.chunks} top-K chunk(s) of 1..{self.per_chunk} rows each")
        return rows

    def candidates_capped(self, candidates, threshold):
        """Per image: whether some full top-K chunk's lowest candidate still passes ``threshold``."""
        per_chunk = candidates.shape[1] // self.chunks
        if per_chunk < self.per_chunk:  # trimmed: the rows cut off fail the threshold
            return np.zeros(len(candidates), dtype=bool)
        return (candidates[:, per_chunk - 1::per_chunk, 4] > threshold).any(axis=1)

    def detect(self, candidates, placement, options):
        """The detections of ``candidates [n, R, 15]`` (network pixels) with the request's
        ``options``: output name (``num_detections``, ``boxes``, ``scores``, ``landmarks``,
        ``capped``) -> array, in original pixels (``placement``)."""
        batch, limit = len(candidates), options["max_detections"]
        passing = np.flatnonzero(candidates[..., 4] > options["score_threshold"])
        rows, image = candidates.reshape(-1, candidates.shape[2])[passing], passing // candidates.shape[1]
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            rows, image = rows[finite], image[finite]
        order = np.argsort(by_image_then_score(image, rows[:, 4]), kind="stable")  # ties keep candidate order
        rows, image = rows[order], image[order]
        index, rank = nms(rows[:, :4], image, options["iou_threshold"], limit)
        capped = np.where(self.candidates_capped(candidates, options["score_threshold"]), CANDIDATES_CAPPED, 0)
        capped |= np.where(np.bincount(image[index], minlength=batch) > limit, FACES_CAPPED, 0)
        index, rank = index[rank < limit], rank[rank < limit]
        kept, owner = rows[index], image[index]
        points = np.minimum(np.maximum(np.concatenate([kept[:, :4], kept[:, 5:]], axis=1).reshape(-1, 7, 2), 0),
                            self.frame)  # 2 box corners, then 5 landmarks, clipped to the network frame
        points = (points - placement[owner, None, 1:3]) / placement[owner, 0, None, None]
        counts = np.bincount(owner, minlength=batch).astype(np.int32).reshape(batch, 1)
        width = max(1, int(counts.max(initial=0)))  # rows for the image with the most faces
        boxes = np.zeros((batch, width, 4), dtype=np.float32)
        scores = np.zeros((batch, width), dtype=np.float32)
        landmarks = np.zeros((batch, width, 5, 2), dtype=np.float32)
        boxes[owner, rank] = points[:, :2].reshape(-1, 4)
        landmarks[owner, rank] = points[:, 2:]
        scores[owner, rank] = kept[:, 4]
        return {"num_detections": counts, "boxes": boxes, "scores": scores, "landmarks": landmarks,
                "capped": capped.astype(np.int32).reshape(batch, 1)}
