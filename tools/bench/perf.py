"""``make perf``: perf_analyzer sweep over real face images, with a table and a plot.

For each ``BATCH`` and each transport in ``SHM`` it runs perf_analyzer over the ``CONCURRENCY``
range against ``MODEL`` with real inputs (:mod:`tools.bench.perf_inputs`), in count windows of
``PERF_REQUESTS`` requests (at most ``PERF_TRIALS`` windows per level, so the run stays short;
raise them for steadier numbers).
Everything lands in ``results/perf/``: per run the CSV (``-f --verbose-csv``) and perf_analyzer's
full output (``.log``, which holds the server-side queue/compute times of each composing model of
the ensemble); per model a markdown table (``.md``) and throughput-vs-latency plot (``.png``).

Variables: ``MODEL`` (retinaface | retinaface_encoded | retinaface_detector | retinaface_postprocess;
``retinaface_encoded`` is sent the same frames as JPEG files, by default over plain gRPC);
``CONCURRENCY`` (start:end:step; default 1:N:1 with N = min(16, 2 x cores, the detector's
``max_queue_size``)); ``SHM`` (comma list of none|system|cuda, default system); ``BATCH`` (comma
list, default 1); ``PERF_REQUESTS`` (30 per window), ``PERF_TRIALS`` (10 windows at most),
``PERF_STABILITY`` (25 %); ``URL`` (gRPC address of a running server on this host; empty: start
one on free ports over ``MODEL_REPOSITORY``); ``METRICS_URL`` (with ``URL``:
``--collect-metrics`` when it serves GPU metrics); ``PERF_DIR`` (results/perf).

perf_analyzer comes from PATH (NVIDIA's SDK container) or from the ``tritonclient[all]`` wheel in
this interpreter's ``bin/``; it needs ``libb64.so.0d`` (apt ``libb64-0d``) and CUDA 12's
``libcudart.so.12`` (pip ``nvidia-cuda-runtime-cu12``), even for a CPU-only server.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tools.bench import perf_inputs
from tools.bench import perf_report
from tools.engine import repository
from tools.serve import ServeError, private_server
from tools.server_info import admitted_queue, max_detections, model_config
from tools.settings import REPO_ROOT, ServeSettings, SettingsError, env_int, env_text

__all__ = ["PerfError", "PerfSettings", "PerfAnalyzer", "find_perf_analyzer",
           "default_concurrency", "run_perf_analyzer", "main"]

TRANSPORTS = ("none", "system", "cuda")
MODELS = (repository.ENSEMBLE, repository.ENCODED, repository.DETECTOR, repository.POSTPROCESS)
RESULTS = REPO_ROOT / "results" / "perf"
INSTALL_HINTS = {
    "libb64.so.0d": "install it with `apt-get install -y libb64-0d` (Debian/Ubuntu)",
    "libcudart.so.12": "install it with `pip install nvidia-cuda-runtime-cu12` (`make install` does)",
}


class PerfError(RuntimeError):
    """perf_analyzer cannot run or failed; the message says why and what to do."""


@dataclass(frozen=True)
class PerfSettings:
    """What ``make perf`` measures and for how long; see the module docstring for the variables."""

    model: str = repository.ENSEMBLE
    concurrency: str = ""  # empty: 1:N:1, N = min(16, 2 x cores, the queue the server admits)
    transports: tuple[str, ...] = ("system",)
    batches: tuple[int, ...] = (1,)
    window_requests: int = 30
    max_trials: int = 10
    stability: int = 25  # percent; a 2-core CPU server rarely holds perf_analyzer's default 10
    url: str = ""
    metrics_url: str = ""
    out_dir: Path = RESULTS

    @classmethod
    def from_env(cls) -> "PerfSettings":
        model = env_text("MODEL", cls.model)
        if model not in MODELS:
            raise SettingsError(f"MODEL={model!r}: use one of {', '.join(MODELS)}")
        concurrency = env_text("CONCURRENCY", cls.concurrency)
        if concurrency and not re.fullmatch(r"[1-9]\d*(:\d+(:[1-9]\d*)?)?", concurrency):
            raise SettingsError(f"CONCURRENCY={concurrency!r}: write start[:end[:step]], e.g. 1:4:1")
        default_transports = ("none",) if model == repository.ENCODED else cls.transports  # encoded: remote clients
        transports = tuple(t.strip() for t in env_text("SHM", ",".join(default_transports)).split(","))
        if not transports or any(t not in TRANSPORTS for t in transports):
            raise SettingsError(f"SHM={','.join(transports)!r}: a comma list of {', '.join(TRANSPORTS)}")
        batches = env_text("BATCH", "1").split(",")
        if not all(b.strip().isdigit() and 1 <= int(b) <= 256 for b in batches):
            raise SettingsError(f"BATCH={','.join(batches)!r}: a comma list of batch sizes 1..256, e.g. 1,16")
        return cls(model=model, concurrency=concurrency, transports=transports,
                   batches=tuple(int(b) for b in batches),
                   window_requests=env_int("PERF_REQUESTS", cls.window_requests, 1, 100000),
                   max_trials=env_int("PERF_TRIALS", cls.max_trials, 3, 100),
                   stability=env_int("PERF_STABILITY", cls.stability, 1, 1000),
                   url=env_text("URL", ""), metrics_url=env_text("METRICS_URL", ""),
                   out_dir=Path(env_text("PERF_DIR", str(RESULTS))).resolve())


@dataclass(frozen=True)
class PerfAnalyzer:
    """A runnable perf_analyzer and the environment it needs."""

    binary: Path
    env: dict[str, str] = field(repr=False)


def _cudart_dir() -> Path | None:
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    for base in (spec.submodule_search_locations if spec else []):
        if (Path(base) / "lib" / "libcudart.so.12").is_file():
            return Path(base) / "lib"
    return None


def find_perf_analyzer() -> PerfAnalyzer:
    """perf_analyzer on PATH, else the one the ``tritonclient[all]`` wheel put beside this Python;
    raises :class:`PerfError` naming what to install when it or a library it needs is missing."""
    found = shutil.which("perf_analyzer") or shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    if not found:
        raise PerfError("perf_analyzer not found: `pip install 'tritonclient[all]==2.50.0'` "
                        "(`make install` does) or use NVIDIA's Triton SDK container")
    env = dict(os.environ)
    cudart = _cudart_dir()
    if cudart is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH")) if p)
    binary = Path(found)
    with open(binary, "rb") as head:
        elf = head.read(4) == b"\x7fELF"
    if elf and shutil.which("ldd"):
        ldd = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True).stdout
        missing = re.findall(r"^\s*(\S+) => not found", ldd, re.MULTILINE)
        if missing:
            hints = "; ".join(f"{lib}: {INSTALL_HINTS.get(lib, 'install the package that provides it')}"
                              for lib in dict.fromkeys(missing))
            raise PerfError(f"{binary} cannot start, missing libraries: {hints}")
    return PerfAnalyzer(binary, env)


def _gpu_metrics(metrics_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{metrics_url.removeprefix('http://')}", timeout=5) as reply:
            return b"nv_gpu_utilization" in reply.read()
    except OSError:
        return False


def default_concurrency(url: str, model: str) -> str:
    """``1:N:1`` with N = min(16, 2 x this machine's cores, the queue ``model`` admits): more
    concurrency than the server queues would measure rejections, not latency."""
    end = min(16, 2 * (os.cpu_count() or 1), admitted_queue(url, model) or 16)
    return f"1:{end}:1"


# What a failed run's output says, and what to do about it
FAILURE_HINTS = (
    ("Exceeds maximum queue size", "the server rejects requests past its queue (MAX_QUEUE at `make engine`): "
                                   "lower CONCURRENCY's end"),
    ("stable measurement", "raise PERF_REQUESTS, PERF_TRIALS or PERF_STABILITY"),
    ("optional inputs", "perf_analyzer takes no optional inputs over shared memory, and the torch detector's are "
                        "optional: measure retinaface, use SHM=none, or serve a copy whose detector takes pixels "
                        "only (python -m tools.bench.ensemble_hop pixels-only)"),
)


def run_perf_analyzer(pa: PerfAnalyzer, url: str, model: str, input_json: Path, out_dir: Path, *,
                      transport: str = "none", batch: int = 1, concurrency: str = "1",
                      window_requests: int = 30, max_trials: int = 10, stability: int = 25,
                      output_shm_bytes: int = 0,
                      metrics_url: str = "", timeout_s: float = 900) -> perf_report.Run:
    """Run perf_analyzer once over gRPC at ``url``; keep its CSV and output in ``out_dir``."""
    stem = out_dir / f"{model}-{transport}-b{batch}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(pa.binary), "-m", model, "-u", url, "-i", "grpc", "--input-data", str(input_json),
           "-b", str(batch), "--concurrency-range", concurrency, "--shared-memory", transport,
           "--measurement-mode", "count_windows", "--measurement-request-count", str(window_requests),
           "--max-trials", str(max_trials), "-s", str(stability),
           "-f", f"{stem}.csv", "--verbose-csv"]
    if transport != "none" and output_shm_bytes:
        cmd += ["--output-shared-memory-size", str(output_shm_bytes)]
    if metrics_url and _gpu_metrics(metrics_url):
        cmd += ["--collect-metrics", "--metrics-url", metrics_url]
    try:
        done = subprocess.run(cmd, env=pa.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise PerfError(f"perf_analyzer ran past {timeout_s:.0f} s; lower CONCURRENCY or PERF_REQUESTS") from exc
    log = Path(f"{stem}.log")
    log.write_text("$ " + " ".join(cmd) + "\n" + done.stdout)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-4:])
        hint = next((f"\n{fix}" for sign, fix in FAILURE_HINTS if sign in done.stdout), "")
        raise PerfError(f"perf_analyzer exited with {done.returncode} ({transport}, batch {batch}); "
                        f"full output in {log}:\n{tail}{hint}")
    return perf_report.load_run(transport, batch, Path(f"{stem}.csv"), log)


def _sweep(settings: PerfSettings, pa: PerfAnalyzer, url: str, metrics_url: str) -> int:
    out = settings.out_dir
    input_json = perf_inputs.write_input_data(settings.model, url, REPO_ROOT / "build" / "perf" / f"{settings.model}.json")
    shm_bytes = perf_inputs.output_bytes(model_config(url, settings.model), max_detections(url))
    concurrency = settings.concurrency or default_concurrency(url, settings.model)
    runs, failed = [], 0
    for batch in settings.batches:
        for transport in settings.transports:
            print(f"perf_analyzer: {settings.model} {transport} batch {batch} concurrency {concurrency}", flush=True)
            try:
                runs.append(run_perf_analyzer(
                    pa, url, settings.model, input_json, out, transport=transport, batch=batch,
                    concurrency=concurrency, window_requests=settings.window_requests,
                    max_trials=settings.max_trials, stability=settings.stability,
                    output_shm_bytes=shm_bytes, metrics_url=metrics_url))
            except PerfError as exc:
                print(f"make perf: {exc}", file=sys.stderr)
                failed += 1
    if runs:
        table = perf_report.markdown(settings.model, runs)
        md, png = out / f"{settings.model}.md", out / f"{settings.model}.png"
        md.write_text(table)
        perf_report.plot(settings.model, runs, png)
        print(f"{table}\nwritten: {md}, {png}, and per run a .csv and perf_analyzer's .log in {out}")
    return 1 if failed or not runs else 0


def main() -> int:
    """Entry point for ``python -m tools.bench.perf``: the sweep against ``URL``, or against a server
    started on free ports for the run and stopped after it."""
    try:
        settings = PerfSettings.from_env()
        if "cuda" in settings.transports and not Path("/dev/nvidia0").exists():
            raise PerfError("SHM=cuda needs an NVIDIA GPU on this host; use SHM=none,system here")
        pa = find_perf_analyzer()
        if settings.url:
            return _sweep(settings, pa, settings.url, settings.metrics_url)
        with private_server(ServeSettings.from_env().repository, settings.out_dir / "server.log") as server:
            return _sweep(settings, pa, server.grpc_url, f"127.0.0.1:{server.settings.metrics_port}/metrics")
    except (PerfError, ServeError, SettingsError) as exc:
        print(f"make perf: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
