"""The Kubernetes manifests and the Dockerfile, checked offline: every manifest against
Kubernetes' own schemas (kubernetes-validate), the probes and metrics they rely on against a
running server, and the images' NVIDIA release against the pinned TensorRT."""

from __future__ import annotations

import json
import re
import tomllib
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tools.serve import STARTUP_FLAGS
from tools.settings import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = "1.30"  # the oldest release still supported upstream when these were written
MANIFESTS = sorted((DEPLOY / "k8s").rglob("*.yaml"))
TENSORRT_OF_RELEASE = {"24.12": "10.7.0"}  # NVIDIA's framework support matrix


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_valid_kubernetes(path):
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def by_kind(kind: str) -> list[dict]:
    return [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]


def test_both_variants_run_triton_with_health_probes_shm_and_metrics_and_only_gpu_asks_for_a_gpu():
    deployments = {doc["spec"]["template"]["spec"]["containers"][0]["image"]: doc for doc in by_kind("Deployment")}
    assert set(deployments) == {"rtface-triton:24.12", "rtface-triton-cpu:24.12"}
    for image, doc in deployments.items():
        pod = doc["spec"]["template"]
        (triton,) = pod["spec"]["containers"]
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
        gpu = "nvidia.com/gpu" in triton["resources"].get("limits", {})
        assert gpu == (image == "rtface-triton:24.12")
    services = {doc["metadata"]["name"]: doc for doc in by_kind("Service")}
    assert services["rtface-headless"]["spec"]["clusterIP"] == "None"
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rtface"


def test_the_running_server_answers_the_probes_and_exports_the_autoscaling_metric(server):
    for path in ("/v2/health/ready", "/v2/health/live"):
        with urllib.request.urlopen(f"{server.http_url}{path}", timeout=5) as reply:
            assert reply.status == 200
    rules = yaml.safe_load(by_kind("ConfigMap")[0]["data"]["config.yaml"])["rules"]
    (rule,) = rules
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    counters = set(re.findall(r"\b(nv_[a-z_]+)\{", rule["metricsQuery"]))
    model = re.search(r'model="([^"]+)"', rule["seriesQuery"]).group(1)
    port = server.settings.metrics_port
    with urllib.request.urlopen(f"http://{server.settings.metrics_host}:{port}/metrics", timeout=5) as reply:
        exported = reply.read().decode()
    for counter in counters:
        assert re.search(rf'^{counter}\{{[^}}]*model="{model}"', exported, re.MULTILINE), counter


def test_the_images_pair_triton_with_the_tensorrt_release_the_project_pins():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    release = re.search(r"^ARG RELEASE=(\S+)", text, re.MULTILINE).group(1)
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert "nvcr.io/nvidia/tensorrt:${RELEASE}-py3" in froms[0] and "tritonserver:${RELEASE}-py3" in froms[1]
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trt"]
    assert any(pin.endswith(f"=={TENSORRT_OF_RELEASE[release]}") for pin in pins), pins
    targets = set(re.findall(r" AS (\S+)", text))
    images = {c["image"].split(":")[0] for d in by_kind("Deployment")
              for c in d["spec"]["template"]["spec"].get("initContainers", []) + d["spec"]["template"]["spec"]["containers"]}
    assert {"engine-tools", "serve-gpu", "serve-cpu"} <= targets
    assert images == {"rtface-engine", "rtface-triton", "rtface-triton-cpu"}


def test_every_tritonserver_command_starts_as_make_serve_does():
    commands = [c["args"] for d in by_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    commands += [json.loads(cmd) for cmd in re.findall(r"^CMD (\[\"tritonserver\".*\])$", text, re.MULTILINE)]
    assert len(commands) == 4, commands
    for command in commands:
        assert set(STARTUP_FLAGS) <= set(command), command
