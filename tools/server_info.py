"""What a running server says about the models it serves: configurations, the engine size, and
how many requests the detector admits before it rejects more. Shared by every stage that
measures a server (bench, evaluation, operations)."""

from __future__ import annotations

from tools.engine import repository

__all__ = ["model_config", "engine_size", "max_detections", "topk", "admitted_queue"]


def model_config(url: str, model: str) -> dict:
    """``model``'s configuration as the server at ``url`` (gRPC) reports it, as JSON."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        return client.get_model_config(model, as_json=True)["config"]


def engine_size(url: str) -> tuple[int, int]:
    """The ``(width, height)`` in pixels of the ensemble's ``images`` input on the server at ``url``."""
    config = model_config(url, repository.ENSEMBLE)
    dims = next(tensor["dims"] for tensor in config["input"] if tensor["name"] == "images")
    height, width = (int(d) for d in dims[:2])
    return width, height


def max_detections(url: str) -> int:
    """MAX_DET of the engine at ``url``: the most faces one image's response can hold (the
    postprocess's ``max_detections`` parameter; responses carry only the rows they need)."""
    config = model_config(url, repository.POSTPROCESS)
    return int(config["parameters"]["max_detections"]["string_value"])


def topk(url: str) -> tuple[int, int]:
    """TOPK of the engine at ``url`` as ``(chunks, rows per chunk)``: the most candidates per image
    the detector hands to the postprocess (its parameters ``topk_chunks`` and ``topk_per_chunk``)."""
    parameters = model_config(url, repository.POSTPROCESS)["parameters"]
    return int(parameters["topk_chunks"]["string_value"]), int(parameters["topk_per_chunk"]["string_value"])


def admitted_queue(url: str, model: str) -> int:
    """How many requests ``model`` (for the ensemble: its detector) takes at once before it
    rejects more: its queue policy's ``max_queue_size`` or its ``overload_keep`` (the CPU
    detector's own load shedding); 0 when unbounded."""
    config = model_config(url, repository.DETECTOR if model in (repository.ENSEMBLE, repository.ENCODED) else model)
    policy = config.get("dynamic_batching", {}).get("default_queue_policy", {})
    keep = config.get("parameters", {}).get("overload_keep", {}).get("string_value", "0")
    limits = [n for n in (int(policy.get("max_queue_size", 0)), int(keep)) if n > 0]
    return min(limits, default=0)
