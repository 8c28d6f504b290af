"""Where the CPU goes, per image, when the pixel ensemble and the encoded one are served side by
side: the CPU seconds of each server process (Triton's core, and the Python stub of each model,
told apart by the model file it runs) and of the perf_analyzer client, divided by the images the
ensemble served in that time (Triton's statistics). On a box whose cores the server saturates,
images/s follow from these figures: cores x 1000 / the total milliseconds per image.

``python -m tools.bench.cpu_cost`` starts a server over ``MODEL_REPOSITORY`` on free ports
(``URL`` and ``SERVER_PID``: measure a running one instead) and runs perf_analyzer on
``CPU_COST_MODELS`` (default ``retinaface retinaface_encoded``) in turn, ``CPU_COST_ROUNDS``
times (default 3), at ``CONCURRENCY`` (default 2) with ``PERF_REQUESTS`` (default 30) requests
of ``BATCH`` (default 1) images per window, over plain gRPC with the real frames of ``make perf``
(JPEG files for the encoded ensemble). Linux only (``/proc``).
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from tools.bench import perf_inputs
from tools.bench.perf import PerfError, find_perf_analyzer, run_perf_analyzer
from tools.engine import repository
from tools.serve import ServeError, private_server
from tools.settings import REPO_ROOT, ServeSettings, SettingsError, env_int, env_text

__all__ = ["CpuCost", "measure", "table", "main"]

CLIENT = "perf_analyzer (client)"
CORE = "tritonserver (core)"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuCost:
    """One perf_analyzer run of ``model``: images/s it measured, images the server answered while
    it ran, and CPU milliseconds per image by process role."""

    model: str
    images_per_s: float
    images: int
    ms_per_image: dict[str, float]

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_image.values())


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _role(pid: int, root: int) -> str:
    """``CORE`` for the server process; for a Python stub, the model whose file it runs."""
    if pid == root:
        return CORE
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    script = next((Path(arg) for arg in args if arg.endswith(".py")), None)
    return f"{script.parent.parent.name} stubs" if script else Path(args[0]).name


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds so far of ``root`` and its descendants, summed by role."""
    seconds: dict[str, float] = {}
    for pid in _descendants(root):
        role = _role(pid, root)
        seconds[role] = seconds.get(role, 0.0) + _cpu_seconds(pid)
    return seconds


def served_images(url: str, model: str) -> int:
    """Images (batch rows) ``model`` has answered since the server started."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0].get("inference_count", 0))


def _client_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(pa, url: str, server_pid: int, model: str, input_json: Path, out_dir: Path,
            concurrency: int, requests: int, stability: int = 25, batch: int = 1) -> CpuCost:
    """One perf_analyzer run of ``model`` at ``concurrency`` (windows of ``requests`` requests of
    ``batch`` images, spread ``stability`` %), with the CPU each process spent."""
    before, images, client = cpu_by_role(server_pid), served_images(url, model), _client_seconds()
    run = run_perf_analyzer(pa, url, model, input_json, out_dir, batch=batch, concurrency=str(concurrency),
                            window_requests=requests, max_trials=10, stability=stability)
    after, served = cpu_by_role(server_pid), served_images(url, model) - images
    if served <= 0:
        raise PerfError(f"{model}: the server answered no images during the run")
    ms = {role: (after[role] - before.get(role, 0.0)) * 1000 / served for role in after}
    ms[CLIENT] = (_client_seconds() - client) * 1000 / served
    return CpuCost(model, run.rows[-1]["Inferences/Second"], served, ms)


def table(costs: list[CpuCost], cores: int) -> str:
    """Markdown: CPU milliseconds per image by role, one column per run, with the images/s the
    CPU alone allows (``cores`` x 1000 / total) beside the images/s measured."""
    roles = sorted({role for cost in costs for role in cost.ms_per_image if role != CLIENT}) + [CLIENT]
    lines = [f"CPU milliseconds per image, by process ({cores} cores):", "",
             "| | " + " | ".join(f"`{cost.model}`" for cost in costs) + " |",
             "|---|" + "---:|" * len(costs)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(f"{cost.ms_per_image.get(role, 0.0):.1f}" for cost in costs) + " |")
    lines += ["| **total** | " + " | ".join(f"**{cost.total_ms:.1f}**" for cost in costs) + " |",
              "| images/s the CPU allows (cores x 1000 / total) | "
              + " | ".join(f"{cores * 1000 / cost.total_ms:.1f}" for cost in costs) + " |",
              "| images/s measured (perf_analyzer) | " + " | ".join(f"{cost.images_per_s:.1f}" for cost in costs) + " |",
              "| images served during the run | " + " | ".join(str(cost.images) for cost in costs) + " |"]
    return "\n".join(lines)


def _run(url: str, server_pid: int) -> int:
    pa = find_perf_analyzer()
    models = env_text("CPU_COST_MODELS", f"{repository.ENSEMBLE} {repository.ENCODED}").split()
    out_dir = REPO_ROOT / "results" / "cpu_cost"
    inputs = {model: perf_inputs.write_input_data(model, url, REPO_ROOT / "build" / "perf" / f"{model}.json")
              for model in models}
    costs = []
    for _ in range(env_int("CPU_COST_ROUNDS", 3, 1, 100)):
        for model in models:
            costs.append(measure(pa, url, server_pid, model, inputs[model], out_dir,
                                 env_int("CONCURRENCY", 2, 1, 1024), env_int("PERF_REQUESTS", 30, 1, 100_000),
                                 batch=env_int("BATCH", 1, 1, 1024)))
    print(table(costs, os.cpu_count() or 1))
    return 0


def main() -> int:
    """Entry point: against ``URL`` and ``SERVER_PID``, or a server of its own."""
    try:
        url = env_text("URL", "")
        if url:
            pid = env_int("SERVER_PID", 0, 0, 1 << 22)
            if not pid:
                raise SettingsError("URL is set: set SERVER_PID to that tritonserver's process id as well")
            return _run(url, pid)
        with private_server(ServeSettings.from_env().repository, REPO_ROOT / "results" / "cpu_cost" / "server.log") as server:
            return _run(server.grpc_url, server.process.pid)
    except (PerfError, ServeError, SettingsError) as exc:
        print(f"cpu cost: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
