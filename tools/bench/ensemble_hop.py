"""What an ensemble's hand-over costs a request: one Python step that answers at once, called
directly and through a one-step ensemble, side by side on one server.

The scratch repository is the floor of a built repository (:mod:`tools.bench.step_floor`) plus
two models with the ensemble ``retinaface``'s inputs and outputs: ``hop_direct``, a Python step
that answers without computing (as many instances as the build's detector), and
``hop_ensemble``, an ensemble whose one step is ``hop_direct``. perf_analyzer measures each in
turn, ``HOP_ROUNDS`` rounds (default 4), on ``make perf``'s frames, over ``SHM`` (default
``system``) at ``CONCURRENCY`` (default 1), ``PERF_REQUESTS`` (default 200) requests per window.
The difference is Triton's ensemble scheduling around the step; on a GPU, with CUDA-shm outputs,
also the copies it makes into the client's region (``gpu_figures.sh hop`` measures that with the
real detector).

``python -m tools.bench.ensemble_hop`` (``MODEL_REPOSITORY``: the built repository, default the
project's). ``python -m tools.bench.ensemble_hop pixels-only SOURCE TARGET`` copies a torch build
for perf_analyzer to call its detector directly over shared memory, which perf_analyzer refuses
for a model with optional inputs: the detector's ``images`` and ``letterbox`` made required, its
encoded input and output, its warm-up and the encoded ensemble left out (``gpu_figures.sh hop``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from tools.bench import perf_inputs
from tools.bench.perf import PerfError, find_perf_analyzer, run_perf_analyzer
from tools.bench.step_floor import FACES, FloorError, write_floor
from tools.engine import repository
from tools.serve import ServeError, private_server
from tools.server_info import engine_size, model_config
from tools.settings import MODEL_REPOSITORY, SettingsError, env_int, env_text

__all__ = ["DIRECT", "ENSEMBLE", "write_hop_models", "write_pixels_only", "main"]

DIRECT, ENSEMBLE = "hop_direct", "hop_ensemble"


def write_hop_models(floor: Path) -> None:
    """Add :data:`DIRECT` and :data:`ENSEMBLE` to the floor repository ``floor``, with the
    inputs and outputs of its ensemble ``retinaface``."""
    ensemble = (floor / repository.ENSEMBLE / "config.pbtxt").read_text()
    interface = ensemble[:ensemble.index("ensemble_scheduling")].split("\n", 2)[2]  # after name and platform
    detector = (floor / repository.DETECTOR / "config.pbtxt").read_text()
    count = re.search(r"count: (\d+)", detector)
    (floor / DIRECT / "1").mkdir(parents=True)
    (floor / DIRECT / "1" / "model.py").write_text(FACES)
    (floor / DIRECT / "config.pbtxt").write_text(
        f'name: "{DIRECT}"\nbackend: "python"\n{interface}'
        f'instance_group [ {{ count: {count.group(1) if count else 1} kind: KIND_CPU }} ]\ndynamic_batching {{ }}\n')
    names = re.findall(r'name: "(\w+)"', interface)
    maps = " ".join(f'input_map {{ key: "{n}" value: "{n}" }}' for n in names if n in ("images", "letterbox"))
    maps += " " + " ".join(f'output_map {{ key: "{n}" value: "{n}" }}' for n in repository.OUTPUTS)
    (floor / ENSEMBLE / "1").mkdir(parents=True)
    (floor / ENSEMBLE / "config.pbtxt").write_text(
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\n{interface}'
        f'ensemble_scheduling {{ step [ {{ model_name: "{DIRECT}" model_version: -1 {maps} }} ] }}\n')


def write_pixels_only(source: Path, target: Path) -> Path:
    """Copy the built repository ``source`` to ``target`` with a detector that takes pixels only,
    through required inputs (see the module's docstring); returns ``target``."""
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(target / repository.ENCODED, ignore_errors=True)
    config = target / repository.DETECTOR / "config.pbtxt"
    lines = [line.replace(" optional: true", "") for line in config.read_text().splitlines()
             if 'name: "image"' not in line and 'name: "image_size"' not in line]
    text = re.sub(r",\n\]", "\n]", "\n".join(lines) + "\n")  # the list's last entry may have gone
    # its warm-up requests send images alone, which a required letterbox input refuses; the
    # detector captures its CUDA graphs when it loads either way
    config.write_text(re.sub(r"model_warmup \[.*?\n\]\n", "", text, flags=re.S))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    copy = commands.add_parser("pixels-only", help="copy a torch build with a pixels-only detector")
    copy.add_argument("source", type=Path)
    copy.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pixels-only":
        print(write_pixels_only(args.source, args.target))
        return 0
    try:
        rounds, requests = env_int("HOP_ROUNDS", 4, 1, 100), env_int("PERF_REQUESTS", 200, 1, 100_000)
        transport, concurrency = env_text("SHM", "system"), env_int("CONCURRENCY", 1, 1, 1024)
        pa = find_perf_analyzer()
        with tempfile.TemporaryDirectory(prefix="rtface-hop-") as scratch:
            floor = write_floor(MODEL_REPOSITORY, Path(scratch) / "repository")
            write_hop_models(floor)
            with private_server(floor, Path(scratch) / "server.log") as server:
                frames = perf_inputs.sample_frames(*engine_size(server.grpc_url))
                inputs = Path(scratch) / "inputs.json"
                inputs.write_text(json.dumps(perf_inputs.input_data(repository.ENSEMBLE, server.grpc_url, frames)))
                shm = perf_inputs.output_bytes(model_config(server.grpc_url, DIRECT), 1)
                p50 = {DIRECT: [], ENSEMBLE: []}
                for index in range(rounds):
                    for model in (ENSEMBLE, DIRECT):
                        run = run_perf_analyzer(pa, server.grpc_url, model, inputs, Path(scratch) / "perf",
                                                transport=transport, concurrency=str(concurrency),
                                                window_requests=requests, output_shm_bytes=shm)
                        row = run.rows[0]
                        p50[model].append(row["p50 latency"] / 1e3)
                        print(f"round {index + 1}, {model}: {row['Inferences/Second']:.1f} requests/s, "
                              f"p50 {p50[model][-1]:.3f} ms", flush=True)
    except (SettingsError, FloorError, ServeError, PerfError) as exc:
        print(f"ensemble hop: {exc}", file=sys.stderr)
        return 1
    direct, through = statistics.median(p50[DIRECT]), statistics.median(p50[ENSEMBLE])
    print(f"median p50 over {rounds} rounds ({transport}, concurrency {concurrency}): direct {direct:.3f} ms, "
          f"through the ensemble {through:.3f} ms: the hand-over costs {through - direct:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
