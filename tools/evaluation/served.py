"""What the accuracy tools share: the server they evaluate, the served faces as WIDER rows, and
scratch model repositories for engines built only for an evaluation.

:func:`serving` yields the gRPC URL to evaluate: the one given, or that of a ``tritonserver``
started on free ports over a built model repository (built first when missing) and always
stopped afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rtface_client import Client, Face
from rtface_client.images import ImageLike

from tools.engine import record, repository
from tools.server_info import engine_size, max_detections, model_config, topk
from tools.engine.reference import Detections
from tools.serve import private_server
from tools.settings import REPO_ROOT, BuildSettings

__all__ = ["EVAL_DIR", "SCRATCH_DIR", "EVAL_SCORE_THRESHOLD", "EngineInfo", "engine_info",
           "serving", "ensure_engine", "scratch_engine", "served_faces",
           "faces_to_rows", "detections_to_rows"]

EVAL_DIR = REPO_ROOT / "results" / "eval"
SCRATCH_DIR = REPO_ROOT / "build" / "eval"     # engines built only for an evaluation
EVAL_SCORE_THRESHOLD = 0.02                    # the WIDER FACE convention: keep low-score faces


@dataclass(frozen=True)
class EngineInfo:
    """What the served engine is: input size (pixels), top-K, MAX_DET, detector backend and
    network (``mnet025``, ``mnv2``, or ``onnx`` for a user's export)."""

    width: int
    height: int
    topk: int
    max_detections: int
    backend: str
    network: str = "mnet025"

    def as_dict(self) -> dict:
        return {"input_size": f"{self.width}x{self.height}", "topk": self.topk, "network": self.network,
                "max_detections": self.max_detections, "detector_backend": self.backend}


def engine_info(url: str) -> EngineInfo:
    """Ask the server at ``url`` (gRPC) what it serves."""
    width, height = engine_size(url)
    detector = model_config(url, repository.DETECTOR)
    chunks, per_chunk = topk(url)
    max_det = max_detections(url)
    if detector.get("platform") == "tensorrt_plan":
        backend = "tensorrt"
    elif detector.get("default_model_filename") == repository.TORCH_MODEL_FILE:
        backend = "torch"
    else:
        backend = "onnxruntime"
    network = detector.get("parameters", {}).get("network", {}).get("string_value", "mnet025")  # older builds: mnet025
    return EngineInfo(width, height, chunks * per_chunk, max_det, backend, network)


def ensure_engine(settings: BuildSettings) -> BuildSettings:
    """Build ``settings`` into its repository unless a build is already there (any build: the
    repository's own ``build.json`` says which)."""
    if record.read(settings.repository) is None:
        from tools.engine.build import build

        print(f"no engine in {settings.repository}: building it first (`make engine`)")
        build(settings)
    return settings


def scratch_engine(name: str, **changes) -> BuildSettings:
    """An engine with the default settings plus ``changes`` (e.g. ``topk=3840``), built once
    into ``build/eval/<name>/`` and reused while its inputs do not change."""
    from tools.engine.build import build_scratch

    return build_scratch(SCRATCH_DIR / name, **changes)


@contextmanager
def serving(url: str | None, repo: Path | None = None,
            log_dir: Path = EVAL_DIR) -> Iterator[str]:
    """Yield ``url`` when given; else start ``tritonserver`` on free ports over ``repo`` (default:
    ``$MODEL_REPOSITORY`` or ``model_repository/``; the default engine is built there first if
    there is none), yield its gRPC URL, and stop it after."""
    if url:
        yield url
        return
    settings = BuildSettings.from_env()
    if repo is None:
        repo, wanted = settings.repository, "onnx" if settings.onnx_path else settings.network
        built = (record.read(repo) or {}).get("network", "mnet025")
        if record.read(repo) is not None and built != wanted:
            print(f"{repo} holds {built}, not {wanted}: evaluating a build of {wanted} in {SCRATCH_DIR / wanted}")
            repo = scratch_engine(wanted).repository
    ensure_engine(replace(settings, repository=repo))
    log_path = log_dir / f"server-{repo.name}.log"
    print(f"starting tritonserver over {repo} (log: {log_path})")
    with private_server(repo, log_path) as server:
        yield server.grpc_url


def served_faces(url: str, images: Iterable[ImageLike], score_threshold: float,
                 concurrency: int = 2, progress: int = 0, transport: str = "auto") -> list[list[Face]]:
    """Faces of each image from the served pipeline (SDK ``detect_stream`` over ``transport``,
    input order), in original-image pixels; ``progress``: print a line every that many images
    (0: never)."""
    results = []
    with Client(url, transport=transport) as client:
        for faces in client.detect_stream(images, concurrency=concurrency,
                                          score_threshold=score_threshold):
            results.append(faces)
            if progress and len(results) % progress == 0:
                print(f"  {len(results)} images", flush=True)
    return results


def faces_to_rows(faces: list[Face]) -> np.ndarray:
    """SDK faces as WIDER rows, float64 ``[M, 5]``: x, y, w, h, score (original pixels)."""
    boxes = np.array([face.box for face in faces], np.float64).reshape(-1, 4)
    scores = np.array([face.score for face in faces], np.float64)
    return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2], scores])


def detections_to_rows(det: Detections) -> np.ndarray:
    """In-process :class:`Detections` as WIDER rows, float64 ``[M, 5]`` (x, y, w, h, score)."""
    boxes = np.asarray(det.boxes, np.float64).reshape(-1, 4)
    return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2],
                            np.asarray(det.scores, np.float64)])
