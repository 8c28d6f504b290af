"""``TRACE_FILE=... make serve`` and the trace report, against a real tritonserver."""

from __future__ import annotations

import time

import pytest
from rtface_client import Client

from tools.bench.step_floor import FloorError, write_floor
from tools.bench.trace_report import TraceError, read_traces, request_segments, segment_table
from tools.sample_images import astronaut
from tools.serve import private_server

STEPS = ("retinaface_detector", "retinaface_postprocess")


def test_a_traced_server_says_where_each_request_spent_its_time(engine, tmp_path, monkeypatch):
    trace = tmp_path / "trace.json"
    monkeypatch.setenv("TRACE_FILE", str(trace))
    elapsed = []
    with private_server(engine.repository, tmp_path / "server.log") as server:
        with Client(server.grpc_url, transport="grpc") as client:
            for _ in range(5):
                start = time.perf_counter()
                assert len(client.detect(astronaut())) == 1
                elapsed.append((time.perf_counter() - start) * 1e3)
    requests = request_segments(read_traces(trace))  # written when the server stopped
    assert len(requests) == 5
    expected = ["gRPC read", f"{STEPS[0]}: to compute", f"{STEPS[0]}: inputs", f"{STEPS[0]}: execute",
                f"{STEPS[1]}: to compute", f"{STEPS[1]}: inputs", f"{STEPS[1]}: execute", f"{STEPS[1]}: outputs",
                "response"]
    for request, client_ms in zip(requests, elapsed):
        assert list(request) == expected
        assert min(request.values()) >= 0
        assert request[f"{STEPS[0]}: execute"] > 1.0  # the network runs here
        assert sum(request.values()) < client_ms  # the server's part of what the client waited
    assert segment_table(requests).splitlines()[0] == "5 ensemble requests; milliseconds"


def test_the_floor_repository_answers_through_every_step_without_computing(engine, tmp_path, monkeypatch):
    """The build's configs with steps that answer at once: no faces, and a trace with every segment."""
    floor = write_floor(engine.repository, tmp_path / "floor")
    assert "floor" in (floor / STEPS[0] / "1" / "model.py").read_text()
    trace = tmp_path / "trace.json"
    monkeypatch.setenv("TRACE_FILE", str(trace))
    with private_server(floor, tmp_path / "server.log") as server:
        with Client(server.grpc_url, transport="grpc") as client:
            assert [client.detect(astronaut()) for _ in range(3)] == [[], [], []]
    requests = request_segments(read_traces(trace))
    assert len(requests) == 3 and all(min(request.values()) >= 0 for request in requests)
    with pytest.raises(FloorError, match="make engine"):
        write_floor(tmp_path / "nothing", tmp_path / "floor2")


def test_a_trace_without_ensemble_requests_is_an_error(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(TraceError, match="no ensemble requests"):
        request_segments(read_traces(tmp_path / "empty.json"))
    with pytest.raises(TraceError, match="stop the server first"):
        read_traces(tmp_path / "missing.json")
