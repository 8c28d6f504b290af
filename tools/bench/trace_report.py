"""Where a served request's time goes, from Triton's timestamp trace (``TRACE_FILE=... make serve``;
the server writes the file when it stops).

Each ensemble request is cut at the timestamps its steps record, in the order they happen:

- ``<step>: to compute``: from the ensemble handing the request on (for the first step, from
  the ensemble's start) to the step's instance starting on it: the ensemble's scheduling and
  the step's queue;
- ``<step>: inputs``: the backend preparing the inputs (for a Python model: into the memory it
  shares with its stub process);
- ``<step>: execute``: the model running, until its output reaches the next step (for the last
  step, until it starts writing outputs);
- ``<last step>: outputs``: the backend collecting the outputs, until the ensemble's response
  is complete;
- ``response``: gRPC sending it;
- ``gRPC read``: before all that, the request read off the connection.

The segments of a request add up to its total; the table gives each segment's median and 90th
percentile over the requests, and the median total (not the sum of the medians).
``python -m tools.bench.trace_report TRACE_FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Trace", "TraceError", "read_traces", "request_segments", "segment_table", "main"]


class TraceError(ValueError):
    """The trace file cannot be read as Triton's timestamp trace of ensemble requests."""


@dataclass
class Trace:
    """One traced request: ``model``, its ensemble's trace id (``parent``, None at the top) and
    its timestamps by name, nanoseconds."""

    model: str = ""
    parent: int | None = None
    stamps: dict[str, int] | None = None


def read_traces(path: Path) -> dict[int, Trace]:
    """The traces in Triton's trace file ``path`` (``--trace-config triton,file=...``), by id."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path}: {exc}; stop the server first (Triton writes the trace when it stops)") from None
    traces: dict[int, Trace] = defaultdict(Trace)
    for entry in entries:
        trace = traces[entry["id"]]
        if "model_name" in entry:
            trace.model, trace.parent = entry["model_name"], entry.get("parent_id")
        for stamp in entry.get("timestamps", []):
            trace.stamps = trace.stamps or {}
            trace.stamps.setdefault(stamp["name"], int(stamp["ns"]))
    return dict(traces)


def request_segments(traces: dict[int, Trace]) -> list[dict[str, float]]:
    """Per ensemble request: its segments (module docstring), milliseconds, in order."""
    children: dict[int, list[Trace]] = defaultdict(list)
    for trace in traces.values():
        if trace.parent is not None and trace.stamps:
            children[trace.parent].append(trace)
    requests = []
    for key, steps in children.items():
        top = traces.get(key)
        if top is None or not top.stamps or "REQUEST_START" not in top.stamps:
            continue
        steps.sort(key=lambda step: step.stamps["REQUEST_START"])
        end = top.stamps.get("GRPC_SEND_END", top.stamps.get("REQUEST_END"))
        try:
            cuts = [("gRPC read", top.stamps["GRPC_WAITREAD_END"])] if "GRPC_WAITREAD_END" in top.stamps else []
            cuts.append((f"{steps[0].model}: to compute", top.stamps["REQUEST_START"]))
            for step, following in zip(steps, steps[1:] + [None]):
                cuts += [(f"{step.model}: inputs", step.stamps["COMPUTE_START"]),
                         (f"{step.model}: execute", step.stamps["COMPUTE_INPUT_END"])]
                if following is not None:
                    cuts.append((f"{following.model}: to compute", following.stamps["REQUEST_START"]))
                else:
                    cuts += [(f"{step.model}: outputs", step.stamps["COMPUTE_OUTPUT_START"]),
                             ("response", top.stamps.get("INFER_RESPONSE_COMPLETE", step.stamps["COMPUTE_END"]))]
        except KeyError as exc:
            raise TraceError(f"request {key} lacks the timestamp {exc}: trace at level TIMESTAMPS") from None
        marks = [at for _, at in cuts] + [end]
        requests.append({name: (marks[i + 1] - marks[i]) / 1e6 for i, (name, _) in enumerate(cuts)})
    if not requests:
        raise TraceError("no ensemble requests in the trace: send requests to the ensemble while tracing")
    return requests


def segment_table(requests: list[dict[str, float]]) -> str:
    """A markdown table: each segment's median and 90th percentile, then the median total."""
    names = list(dict.fromkeys(name for request in requests for name in request))
    lines = [f"{len(requests)} ensemble requests; milliseconds", "",
             "| segment | p50 | p90 |", "|---|---|---|"]
    for name in names:
        values = [request[name] for request in requests if name in request]
        lines.append(f"| {name} | {np.median(values):.3f} | {np.percentile(values, 90):.3f} |")
    totals = [sum(request.values()) for request in requests]
    lines.append(f"| **total** | **{np.median(totals):.3f}** | {np.percentile(totals, 90):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_file", type=Path)
    args = parser.parse_args(argv)
    try:
        print(segment_table(request_segments(read_traces(args.trace_file))))
    except TraceError as exc:
        print(f"trace report: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
