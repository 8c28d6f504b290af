"""Shared fixtures: a detector built into a scratch model repository and a real Triton server on
free ports, started once per session and always stopped; the same for the torch detector, for
the GPU tests (they skip where PyTorch sees no GPU, before these are built)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tools.engine import record, repository
from tools.bench.transport import write_frame_sink
from tools.engine.build import build
from tools.engine.configs import render
from tools.engine.plan import Plan
from tools.engine.source import load_source_model
from tools.engine.reference import ReferencePipeline
from tools.serve import private_server
from tools.settings import MODEL_REPOSITORY, BuildSettings

ENGINE = BuildSettings(backend="onnxruntime")  # the defaults: 1280x960, batch 16, 8,190 candidates, MAX_DET 3000


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> BuildSettings:
    """The default onnxruntime detector, built into a scratch repository, with the benchmark's
    frame sink beside it."""
    settings = BuildSettings(backend=ENGINE.backend,
                             repository=repository.copy_model_code(tmp_path_factory.mktemp("engine") / "repo"))
    build(settings)
    write_frame_sink(settings)
    return settings


@pytest.fixture(scope="session")
def server(engine, tmp_path_factory):
    """A real tritonserver serving :func:`engine` on free ports; yields the running server."""
    with private_server(engine.repository, tmp_path_factory.mktemp("triton") / "server.log") as running:
        yield running


def torch_build(tmp_path_factory, name: str, **changes) -> BuildSettings:
    """The default build (plus the environment's settings, e.g. TORCH_COMPILE) with BACKEND=torch
    and ``changes``, in a scratch repository, validated while it builds. It starts from a copy of
    ``model_repository/`` when that holds a torch build (``make engine BACKEND=torch``), so its
    compiled packages are reused wherever this build's inputs are the same."""
    scratch = tmp_path_factory.mktemp(name) / "repo"
    built = record.read(MODEL_REPOSITORY) or {}
    if built.get("backend") == "torch":
        shutil.copytree(MODEL_REPOSITORY, scratch, ignore=shutil.ignore_patterns("__pycache__"))
    settings = dataclasses.replace(BuildSettings.from_env(), backend="torch",
                                   repository=repository.copy_model_code(scratch), **changes)
    build(settings)
    return settings


def config_variant(settings: BuildSettings, tmp_path_factory, name: str, **changes) -> BuildSettings:
    """A copy of the build ``settings`` with ``changes`` to settings that only the configs say
    (e.g. ``preprocess``): the artifact is copied, the configs rewritten, nothing compiled again."""
    variant = dataclasses.replace(settings, repository=tmp_path_factory.mktemp(name) / "repo", **changes)
    shutil.copytree(settings.repository, variant.repository)
    build(variant)
    return variant


def configs(settings: BuildSettings, backend: str) -> dict:
    """Every ``config.pbtxt`` a build of ``settings`` with ``backend`` writes, parsed with Triton's
    own ``model_config_pb2``, by model name."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return {name: text_format.Parse(text, model_config_pb2.ModelConfig())
            for name, text in render(Plan.resolve(settings, backend)).items()}


def load_model_file(path: Path):
    """A file of a model repository (numpy or torch only) as a module, written no bytecode beside
    it (a ``__pycache__`` folder at the repository's top would look like a model to Triton)."""
    spec = importlib.util.spec_from_file_location(f"rtface_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    keep, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = keep
    return module


SERVER_LOGS: dict[str, Path] = {}  # gRPC URL of each server serve_build started -> its log


def serve_build(settings: BuildSettings, tmp_path_factory, name: str):
    """A real tritonserver over the build ``settings`` on free ports; yields its gRPC URL (its log
    in :data:`SERVER_LOGS`)."""
    log = tmp_path_factory.mktemp(name) / "server.log"
    with private_server(settings.repository, log) as server:
        SERVER_LOGS[server.grpc_url] = log
        yield server.grpc_url


@pytest.fixture(scope="session")
def torch_engine(tmp_path_factory) -> BuildSettings:
    """``make engine BACKEND=torch``: one step, the postprocess in the detector's CUDA graph,
    encoded images decoded on the GPU."""
    return torch_build(tmp_path_factory, "torch")


@pytest.fixture(scope="session")
def torch_url(torch_engine, tmp_path_factory):
    """A real tritonserver serving :func:`torch_engine` on free ports."""
    yield from serve_build(torch_engine, tmp_path_factory, "triton-torch")


@pytest.fixture(scope="session")
def grpc_url(server) -> str:
    return server.grpc_url


@pytest.fixture(scope="session")
def reference(engine) -> ReferencePipeline:
    """The original graph + numpy decode + OpenCV NMS, at the engine's size."""
    return ReferencePipeline(load_source_model(), engine.input_width, engine.input_height)


def infer_raw(url: str, images: np.ndarray, rows: np.ndarray | None, parameters: dict | None = None,
              images_dtype: str = "UINT8") -> dict[str, np.ndarray]:
    """One raw tritonclient gRPC request to the ensemble; outputs by name."""
    client = grpcclient.InferenceServerClient(url)
    inputs = [grpcclient.InferInput("images", list(images.shape), images_dtype)]
    inputs[0].set_data_from_numpy(images)
    if rows is not None:
        inputs.append(grpcclient.InferInput("letterbox", list(rows.shape), "FP32"))
        inputs[1].set_data_from_numpy(rows)
    result = client.infer("retinaface", inputs, parameters=parameters)
    return {name: result.as_numpy(name) for name in ("num_detections", "boxes", "scores", "landmarks")}


def kill_hard(server) -> None:
    """SIGKILL tritonserver, as a crash would; its Python stubs get a few seconds to notice, then
    are killed too (they would linger, holding memory, until their health check fires)."""
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    deadline = time.monotonic() + 5
    for pid in map(int, children):
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it noticed and exited
            pass


def alive(pid: int) -> bool:
    """Whether process ``pid`` still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
