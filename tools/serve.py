"""``make serve``: run a real Triton Inference Server on the model repository, in the foreground.

Uses a ``tritonserver`` on PATH when there is one (e.g. inside NVIDIA's container), else the one
bundled in the ``nvidia-pytriton`` wheel, with its Python backend stub for this Python copied
into a writable backend directory. The Python backend's stub imports packages of the first
``python3`` on PATH, so the server starts with this interpreter's ``bin/`` first.

:func:`start_server` is the library form that the test fixture and benchmarks use.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from rtface_client.security import TOKEN_HEADER, token_path

from tools.engine import record, repository
from tools.engine.backends.tensorrt import TensorRTBuildError, check_versions_match, serving_tensorrt_version
from tools.settings import GPU_BACKENDS, REPO_ROOT, BuildSettings, ServeSettings, SettingsError

__all__ = ["STARTUP_FLAGS", "ServeError", "TritonInstall", "find_triton", "RunningServer", "start_server", "free_ports",
           "private_server", "main"]

# Every config.pbtxt is complete, so Triton need not start each Python model once more before its
# instances just to ask it for its config (a process that imports torch: seconds of cold start).
STARTUP_FLAGS = ("--disable-auto-complete-config",)
READY_TIMEOUT_S = 600.0  # the torch detector compiles and captures its CUDA graphs while it loads
STOP_TIMEOUT_S = 30.0
# Python-backend shared memory between server and stub: one region large enough for a full
# batch of 1280x960 frames, so it never grows request by request.
PYTHON_SHM_BYTES = 64 * 1024 * 1024
# GPU detectors: Triton's CUDA memory pool per GPU holds the frames it hands the Python-backend
# detector on the GPU (one device copy each) and the tensors between the ensemble's steps. Its
# default (64 MiB) is about one batch of 16 1280x960 frames; a request that finds it full pays a
# cudaMalloc and a CUDA IPC open/close per tensor. Sized as this many full batches of frames:
CUDA_POOL_BATCHES = 4


class ServeError(RuntimeError):
    """The server could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class TritonInstall:
    """Where a runnable ``tritonserver`` is and what it needs around it."""

    binary: Path
    backend_dir: Path | None
    library_dir: Path | None
    origin: str


def _bundled_triton(workdir: Path) -> TritonInstall | None:
    try:
        import pytriton
    except ImportError:
        return None
    package = Path(pytriton.__file__).parent / "tritonserver"
    binary = package / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    stub = package / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"the bundled Triton has no Python backend stub for Python "
                         f"{sys.version_info.major}.{sys.version_info.minor}; use Python 3.8-3.13")
    backends = workdir / "backends"
    if not (backends / "python" / stub.name).is_file():
        shutil.rmtree(backends, ignore_errors=True)
        shutil.copytree(package / "backends", backends)
        shutil.copy2(stub, backends / "python" / stub.name)
    libs = package.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, backends, libs if libs.is_dir() else None, "nvidia-pytriton wheel")


def find_triton(workdir: Path = REPO_ROOT / "build" / "triton") -> TritonInstall:
    """A ``tritonserver`` on PATH (with ``$TRITON_BACKEND_DIR`` as its backend directory when
    set), else the one the ``nvidia-pytriton`` wheel bundles."""
    on_path = shutil.which("tritonserver")
    if on_path:  # NVIDIA's container knows its backends; elsewhere TRITON_BACKEND_DIR says where
        backends = os.environ.get("TRITON_BACKEND_DIR")
        return TritonInstall(Path(on_path), Path(backends) if backends else None, None, "PATH")
    bundled = _bundled_triton(workdir)
    if bundled is None:
        raise ServeError("no tritonserver on PATH and nvidia-pytriton is not installed; run `make install`")
    return bundled


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (for tests and benchmarks)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind((host, 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _check_repository(path: Path) -> dict:
    """The build metadata of the repository's detector; raises when the build is missing, or
    the artifact is not the one built (truncated, corrupt, replaced)."""
    metadata = record.read(path)
    if metadata is None:
        raise ServeError(f"{path} holds no detector build; run `make engine`")
    artifact = path / repository.DETECTOR / "1" / repository.artifact_name(metadata["backend"])
    if not artifact.is_file() or artifact.stat().st_size == 0:
        raise ServeError(f"{artifact} is missing or empty; run `make engine` to rebuild it")
    if record.file_sha256(artifact) != metadata.get("artifact_sha256"):
        raise ServeError(f"{artifact} does not match its build record (truncated or corrupt?); "
                         "run `make engine` to rebuild it")
    if metadata["backend"] == "tensorrt":
        try:
            check_versions_match(metadata.get("tensorrt_builder", "unknown"), serving_tensorrt_version(), "make serve")
        except TensorRTBuildError as exc:
            raise ServeError(str(exc)) from None
    shutil.rmtree(path / "__pycache__", ignore_errors=True)  # bytecode of shared_*.py: Triton would take it for a model
    for ensemble in (repository.ENSEMBLE, repository.ENCODED):  # Triton needs the (empty) version
        if (path / ensemble / "config.pbtxt").is_file():
            (path / ensemble / "1").mkdir(exist_ok=True)
    return metadata


def _requires_token(settings: ServeSettings) -> bool:
    if settings.shm_token is not None:
        return settings.shm_token
    try:
        return not ipaddress.ip_address(settings.host).is_loopback
    except ValueError:  # a host name: treat as reachable from elsewhere
        return settings.host != "localhost"


def _write_token(grpc_port: int) -> str:
    """A fresh random token in a file only this user can read (see rtface_client.security)."""
    path = token_path(grpc_port)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token)
    return token


def _gpu_ids() -> list[int]:
    """The GPU indices Triton will see: ``nvidia-smi``'s list, else the ``/dev/nvidiaN`` devices."""
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True, text=True)
        if listed.returncode == 0:
            return [int(line) for line in listed.stdout.split() if line.strip().isdigit()]
    return sorted(int(p.name[6:]) for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit())


def cuda_pool_bytes(metadata: dict) -> int:
    """The CUDA memory pool a GPU build gets per GPU: :data:`CUDA_POOL_BATCHES` full batches of
    its input frames (uint8), at least Triton's default 64 MiB."""
    width, height = (int(side) for side in metadata["input_size"].split("x"))
    return max(64 << 20, CUDA_POOL_BATCHES * int(metadata["max_batch"]) * width * height * 3)


def _command(install: TritonInstall, settings: ServeSettings, token: str | None,
             cuda_pool: int = 0) -> list[str]:
    cmd = [str(install.binary), f"--model-repository={settings.repository}",
           f"--grpc-address={settings.host}", f"--grpc-port={settings.grpc_port}",
           f"--http-address={settings.host}", f"--http-port={settings.http_port}",
           f"--metrics-address={settings.metrics_host}", f"--metrics-port={settings.metrics_port}",
           "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
           "--log-verbose=0", *STARTUP_FLAGS,
           f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
           f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_BYTES}"]
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    if cuda_pool:
        cmd += [f"--cuda-memory-pool-byte-size={gpu}:{cuda_pool}" for gpu in _gpu_ids()]
    if settings.trace_file is not None:  # every request, timestamps only, written when the server stops
        cmd += [f"--trace-config=triton,file={settings.trace_file}", "--trace-config=triton,log-frequency=0",
                "--trace-config=level=TIMESTAMPS", "--trace-config=rate=1", "--trace-config=count=-1"]
    if token is not None:
        cmd += [f"--grpc-restricted-protocol=shared-memory,model-repository:{TOKEN_HEADER}={token}",
                f"--http-restricted-api=shared-memory,model-repository:{TOKEN_HEADER}={token}"]
    return cmd


def _environment(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if install.library_dir is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.library_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


@dataclass
class RunningServer:
    """A started ``tritonserver`` process and its endpoints."""

    process: subprocess.Popen
    settings: ServeSettings
    backend: str
    install: TritonInstall

    @property
    def grpc_url(self) -> str:
        return f"{self.settings.host}:{self.settings.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.http_port}"

    def ready(self) -> bool:
        """Whether the server answers ready on its HTTP health endpoint."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until ready; raise :class:`ServeError` if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(f"tritonserver exited with status {self.process.returncode} while "
                                 "loading models; its log above says why")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServeError(f"tritonserver was not ready after {timeout:.0f} s")

    def stop(self) -> int:
        """Ask the server to shut down (SIGINT, like Ctrl-C), then kill it if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(settings: ServeSettings, log_file=None) -> RunningServer:
    """Start Triton on ``settings`` and wait until it is ready (the engine must be built)."""
    metadata = _check_repository(settings.repository)
    backend = metadata["backend"]
    for name, host, port in (("GRPC_PORT", settings.host, settings.grpc_port),
                             ("HTTP_PORT", settings.host, settings.http_port),
                             ("METRICS_PORT", settings.metrics_host, settings.metrics_port)):
        if _port_busy(host, port):
            raise ServeError(f"{name}={port} is already in use on {host} (another `make serve`?); "
                             f"stop it or pick another port, e.g. `make serve {name}={port + 10}`")
    install = find_triton()
    token = _write_token(settings.grpc_port) if _requires_token(settings) else None
    cuda_pool = (settings.cuda_pool_mb << 20 or cuda_pool_bytes(metadata)) if backend in GPU_BACKENDS else 0
    process = subprocess.Popen(_command(install, settings, token, cuda_pool), env=_environment(install),
                               stdout=log_file, stderr=subprocess.STDOUT if log_file else None)
    server = RunningServer(process, settings, backend, install)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def private_server(model_repository: Path, log_path: Path) -> Iterator[RunningServer]:
    """A ``tritonserver`` of the caller's own over ``model_repository``: loopback, free ports, the
    environment's other serve settings, its log in ``log_path``; always stopped. For tests,
    benchmarks and evaluations."""
    grpc_port, http_port, metrics_port = free_ports(3)
    settings = replace(ServeSettings.from_env(), host="127.0.0.1", metrics_host="127.0.0.1", grpc_port=grpc_port,
                       http_port=http_port, metrics_port=metrics_port, repository=model_repository)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        server = start_server(settings, log_file=log)
        try:
            yield server
        finally:
            server.stop()


def _ensure_engine(settings: ServeSettings) -> None:
    if record.read(settings.repository) is None:
        from tools.engine.build import build

        print("no engine built yet: running `make engine` first")
        build(BuildSettings.from_env())


def main() -> int:
    """Entry point for ``python -m tools.serve``: foreground server until Ctrl-C."""
    from tools.engine.build import BuildError, ModelSourceError, SurgeryError

    try:
        settings = ServeSettings.from_env()
        _ensure_engine(settings)
        server = start_server(settings)
    except (ServeError, SettingsError, BuildError, ModelSourceError, SurgeryError) as exc:
        print(f"make serve: {exc}", file=sys.stderr)
        return 1
    metadata = record.read(settings.repository) or {}
    print(json.dumps({"grpc": server.grpc_url, "http": server.http_url,
                      "metrics": f"http://{settings.metrics_host}:{settings.metrics_port}/metrics",
                      "shm_token_required": _requires_token(settings),
                      "ensemble": repository.ENSEMBLE, "detector_backend": server.backend,
                      "input_size": metadata.get("input_size"), "triton": server.install.origin}))
    print("ready — Ctrl-C to stop", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` (or an orchestrator) stops it like Ctrl-C
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        return 0 if server.stop() in (0, -signal.SIGINT) else 1


if __name__ == "__main__":
    sys.exit(main())
