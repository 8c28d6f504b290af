"""Whether the torch detector may load the AOTInductor packages ``make engine`` compiled.

``make engine BACKEND=torch`` (``TORCH_COMPILE=engine``, the default) compiles the served
detector ahead of time, one package per CUDA-graph batch bucket (:func:`package_name`), and
records in ``build.json`` under :data:`RECORD_KEY` the torch, CUDA and GPU it compiled for
(:func:`running_platform`) and each package's file and sha256. A package is machine code for one
GPU built against one torch: the server loads it only where all of them match
(:func:`refusal`), and otherwise compiles at load, its log saying why.

Standard library only at import (:func:`load_packages` imports torch): the build and the tests
use this file without PyTorch or a GPU.
"""

import hashlib
import json
import os

RECORD_KEY = "compiled"
PLATFORM_FIELDS = ("torch", "cuda", "gpu", "capability")
METADATA_FILE = "build.json"


def package_name(batch):
    """The file name of the package compiled for ``batch`` images."""
    return f"model.b{batch}.pt2"


def running_platform(torch, device_index):
    """What a package is compiled for, read from ``torch`` (the imported module) on
    ``device_index``: torch and CUDA versions, GPU name and compute capability."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device_index), "capability": f"{major}.{minor}"}


def read_record(version_dir):
    """The build's record of its compiled packages (``build.json``), or None when it has none."""
    try:
        with open(os.path.join(version_dir, METADATA_FILE)) as handle:
            return json.load(handle).get(RECORD_KEY)
    except (OSError, ValueError):
        return None


def file_sha256(path):
    """SHA-256 of a file, streamed (artifacts can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refusal(record, running, buckets, version_dir):
    """Why the packages of ``record`` cannot serve here, in one line, or None when they can:
    none were compiled, they were compiled for another torch, CUDA or GPU than ``running``
    (:func:`running_platform`), or a bucket's package is missing or not the one recorded."""
    if not record:
        return "the build holds no compiled packages (built with TORCH_COMPILE=load or 0, or before they existed)"
    differing = [f"{field} {record.get(field)!r} (this server: {running[field]!r})"
                 for field in PLATFORM_FIELDS if record.get(field) != running[field]]
    if differing:
        return ("the packages were compiled for another platform: " + ", ".join(differing)
                + "; run make engine BACKEND=torch on this machine")
    files = record.get("files", {})
    for batch in buckets:
        entry = files.get(str(batch))
        if entry is None:
            return f"no package for batch {batch} (rebuild: make engine BACKEND=torch)"
        path = os.path.join(version_dir, entry["file"])
        if not os.path.isfile(path) or file_sha256(path) != entry["sha256"]:
            return f"{entry['file']} is missing or not the file the build recorded (rebuild: make engine BACKEND=torch)"
    return None


def package_paths(record, buckets, version_dir):
    """Batch size -> path of its package, for a record :func:`refusal` accepted."""
    return {batch: os.path.join(version_dir, record["files"][str(batch)]["file"]) for batch in buckets}


def load_packages(paths, device_index):
    """Batch size -> the AOTInductor package at ``paths[batch]`` (compiled by ``make engine``)
    loaded on GPU ``device_index``, callable like the module it was exported from, and without
    the runner's locking, so CUDA graphs can be captured around it.

    Each is loaded by the package loader that ``torch._inductor.aoti_load_package`` wraps, without that
    wrapper's first step: comparing the package's CPU vector extensions with this machine's,
    which compiles a test program per extension with the C++ compiler and runs each in a new
    ``sys.executable`` (in Triton's stub, the stub itself, so every test fails anyway). That step
    only warns, and it made loading take several times longer (docs/benchmarks.md, History:
    "Cold start"). What a CUDA package depends on (torch, CUDA, GPU) is checked against ``build.json``
    before this is called (:func:`refusal`)."""
    import torch
    from torch._inductor.package import AOTICompiledModel

    return {batch: AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, device_index))
            for batch, path in paths.items()}
