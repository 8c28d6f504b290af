"""Reading perf_analyzer's results and reporting them: CSV rows, the per-composing-model
server times it prints for an ensemble, a markdown table and a throughput-vs-latency plot.

Latencies are in microseconds as perf_analyzer writes them; the table and plot show milliseconds.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Run", "read_csv", "parse_composing", "load_run", "markdown", "plot"]

_UNSTABLE = re.compile(r"Failed to obtain stable measurement within \d+ measurement windows for concurrency (\d+)")
_COMPOSING = re.compile(
    r"^\s*(\S+), version: \S+\n(?:.*\n)*?\s*Avg request latency: (\d+) usec \(overhead (\d+) usec "
    r"\+ queue (\d+) usec \+ compute input (\d+) usec \+ compute infer (\d+) usec "
    r"\+ compute output (\d+) usec\)", re.MULTILINE)


@dataclass
class Run:
    """One perf_analyzer invocation: its CSV rows (latencies in usec) and composing-model times."""

    transport: str
    batch: int
    rows: list[dict[str, float]]
    composing: list[dict]
    csv: Path
    log: Path
    unstable: list[int] = field(default_factory=list)  # levels perf_analyzer gave up on

    @property
    def label(self) -> str:
        return f"{self.transport} b{self.batch}"


def read_csv(path: Path) -> list[dict[str, float]]:
    """The rows of a perf_analyzer ``-f`` CSV as numbers, one per concurrency level in increasing
    order (perf_analyzer writes them sorted by throughput)."""
    with open(path, newline="") as f:
        rows = [{k: number for k, v in row.items() if (number := _number(v)) is not None}
                for row in csv.DictReader(f)]
    return sorted(rows, key=lambda row: row["Concurrency"])


def _number(text: str | None) -> float | None:
    """A CSV cell as a number; None for blanks and for GPU metrics (``uuid:value;`` lists)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def parse_composing(log_text: str) -> list[dict]:
    """Per concurrency level, the server-side times (usec) of each composing model of an ensemble,
    from perf_analyzer's output; empty for a single model."""
    out = []
    for block in re.split(r"^Request concurrency: ", log_text, flags=re.MULTILINE)[1:]:
        concurrency = int(block.split(None, 1)[0])
        section = block.split("Composing models:", 1)[1] if "Composing models:" in block else ""
        for m in _COMPOSING.finditer(section):
            out.append(dict(concurrency=concurrency, model=m.group(1),
                            **{k: float(v) for k, v in zip(
                                ("latency", "overhead", "queue", "compute_input", "compute_infer",
                                 "compute_output"), m.groups()[1:])}))
    return out


def load_run(transport: str, batch: int, csv_path: Path, log_path: Path) -> Run:
    """A finished run from the CSV and the saved perf_analyzer output."""
    text = log_path.read_text()
    return Run(transport, batch, read_csv(csv_path), parse_composing(text), csv_path, log_path,
               [int(c) for c in _UNSTABLE.findall(text)])


def _ms(usec: float) -> str:
    return f"{usec / 1000:.1f}"


def markdown(model: str, runs: list[Run]) -> str:
    """The sweep as markdown, in milliseconds: client-side throughput and latency per level, with
    the server's queue/compute for a single model, or for an ensemble a second table with each
    composing model's server-side times (the ensemble's own CSV queue hides its steps' queues)."""
    ensemble = any(run.composing for run in runs)
    server = "" if ensemble else " server queue ms | server compute ms |"
    lines = [f"### perf_analyzer: `{model}`", "",
             "infer/s counts images (requests x batch); latencies are per request.", "",
             "| transport | batch | concurrency | infer/s | p50 ms | p90 ms | p99 ms | avg ms |" + server,
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("" if ensemble else "---:|---:|")]
    for run in runs:
        for r in run.rows:
            line = (f"| {run.transport} | {run.batch} | {int(r['Concurrency'])} | {r['Inferences/Second']:.1f} "
                    f"| {_ms(r['p50 latency'])} | {_ms(r['p90 latency'])} | {_ms(r['p99 latency'])} "
                    f"| {_ms(r.get('Avg latency', 0.0))} |")
            if not ensemble:
                compute = sum(r.get(f"Server Compute {k}", 0.0) for k in ("Input", "Infer", "Output"))
                line += f" {_ms(r['Server Queue'])} | {_ms(compute)} |"
            lines.append(line)
    for run in runs:
        if run.unstable:
            lines.append(f"\n{run.label}: no stable measurement at concurrency "
                         f"{', '.join(map(str, run.unstable))} (perf_analyzer stops the sweep there; "
                         "raise PERF_REQUESTS, PERF_TRIALS or PERF_STABILITY)")
    if any(run.composing for run in runs):
        lines += ["", "Composing models (server side, average per request):", "",
                  "| transport | batch | concurrency | model | latency ms | queue ms | compute input ms | compute infer ms | compute output ms |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for run in runs:
            for c in run.composing:
                lines.append(f"| {run.transport} | {run.batch} | {c['concurrency']} | {c['model']} | {_ms(c['latency'])} "
                             f"| {_ms(c['queue'])} | {_ms(c['compute_input'])} | {_ms(c['compute_infer'])} "
                             f"| {_ms(c['compute_output'])} |")
    return "\n".join(lines) + "\n"


def plot(model: str, runs: list[Run], path: Path) -> Path:
    """Throughput (x) against p50 (solid) and p99 (dashed) latency, one colour per transport/batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        x = [r["Inferences/Second"] for r in run.rows]
        (line,) = ax.plot(x, [r["p50 latency"] / 1000 for r in run.rows], "o-", label=f"{run.label} p50")
        ax.plot(x, [r["p99 latency"] / 1000 for r in run.rows], "s--", color=line.get_color(), label=f"{run.label} p99")
        for xi, r in zip(x, run.rows):
            ax.annotate(f"c{int(r['Concurrency'])}", (xi, r["p50 latency"] / 1000), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="throughput (inferences/s)", ylabel="latency (ms)", title=f"perf_analyzer: {model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
