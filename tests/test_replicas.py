"""Many replicas, one client: two real servers on 127.0.0.1 and 127.0.0.2 (same ports) behind one
gRPC target with ``round_robin``; the client sends encoded images (``auto`` for a replica set),
both serve, results equal one server's, and a replica killed with SIGKILL mid-stream loses
nothing (its requests are retried on the other)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from rtface_client import Client

from tests.conftest import kill_hard
from tools.engine import repository
from tools.sample_images import face_canvas
from tools.serve import free_ports, start_server
from tools.settings import ServeSettings

HOSTS = ("127.0.0.1", "127.0.0.2")


@pytest.fixture()
def replicas(engine, tmp_path):
    grpc_port, http_port, metrics_port = free_ports(3)
    servers = []
    try:
        for host in HOSTS:
            settings = ServeSettings(host=host, grpc_port=grpc_port, http_port=http_port, metrics_host=host,
                                     metrics_port=metrics_port, repository=engine.repository)
            servers.append(start_server(settings, log_file=open(tmp_path / f"server-{host}.log", "w")))
        yield servers
    finally:
        for server in servers:
            server.stop()


def ensemble_requests(url: str) -> int:
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(repository.ENCODED, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def settled_requests(servers) -> list[int]:
    """Each server's ensemble request count once it stops changing: a request's statistics land
    just after its response."""
    counts = [ensemble_requests(s.grpc_url) for s in servers]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = [ensemble_requests(s.grpc_url) for s in servers]
        if again == counts:
            break
        counts = again
    return counts


def same_faces(found, expected) -> bool:
    return len(found) == len(expected) and all(
        np.allclose(a.box, b.box, atol=1e-3) and abs(a.score - b.score) < 1e-5 for a, b in zip(found, expected))


def test_a_replica_set_shares_the_load_and_survives_a_killed_replica(replicas):
    first, second = replicas
    target = f"ipv4:{first.grpc_url},{second.grpc_url}"
    images = [face_canvas(500 + i, 640, 480, count=1 + i % 3).image for i in range(24)]
    with Client(first.grpc_url, transport="encoded") as single:
        expected = [single.detect(image) for image in images]
    before = settled_requests(replicas)
    with Client(target, retries=5, timeout=60) as client:
        assert client.transport == "encoded"  # shared memory is per server: encoded images over gRPC
        assert all(same_faces(f, e) for f, e in zip(client.detect_stream(images, concurrency=4), expected))
        served = [after - b for after, b in zip(settled_requests(replicas), before)]
        assert min(served) > 0 and sum(served) == len(images), served
        results = []
        for index, faces in enumerate(client.detect_stream(images * 3, concurrency=4)):
            results.append(faces)
            if index == len(images):
                kill_hard(second)  # SIGKILL mid-stream: requests in flight on it fail
    assert len(results) == 3 * len(images)
    assert all(same_faces(f, e) for f, e in zip(results, expected * 3))


def test_shared_memory_transports_refuse_a_replica_set():
    with pytest.raises(ValueError, match="shared memory is per server"):
        Client("ipv4:127.0.0.1:1,127.0.0.2:1", transport="system_shm")


def test_multi_address_targets_are_recognised():
    from rtface_client.client import is_replica_set

    assert is_replica_set("ipv4:127.0.0.1:8001,127.0.0.2:8001") and is_replica_set("dns:///rtface-headless:8001")
    assert not is_replica_set("localhost:8001")
