"""How the torch detector's process uses the GPU: cuDNN's choice of algorithms and how its
threads wait. Each setting is validated here once (the build's settings use these checks too)
and applied when an instance loads.

Standard library only at import: ``make engine`` validates the settings without PyTorch.
"""

import ctypes
import os

CUDNN_ALGORITHMS = ("benchmark", "heuristics", "heuristics_b")
CUDA_WAITS = {"block": 0x04, "spin": 0x01}  # CU_CTX_SCHED_BLOCKING_SYNC, CU_CTX_SCHED_SPIN


def cudnn_algorithms_problem(how):
    """Why ``how`` is no cuDNN choice (``benchmark``, ``benchmark:N`` with N >= 1, ``heuristics``,
    ``heuristics_b``), in one line, or None when it is one."""
    name, _, limit = how.partition(":")
    if name not in CUDNN_ALGORITHMS or (limit and (name != "benchmark" or not limit.isdigit() or int(limit) < 1)):
        return (f"{how!r}: use benchmark (time every candidate at load), benchmark:N (time at most N), "
                "heuristics or heuristics_b (no timing)")
    return None


def cuda_waits_problem(how):
    """Why ``how`` is no way to wait for the GPU (``block``, ``spin``), in one line, or None."""
    if how not in CUDA_WAITS:
        return (f"{how!r}: use block (the detector's threads sleep while they wait for the GPU) or spin "
                "(each waits on a busy core)")
    return None


def choose_cudnn_algorithms(how):
    """How cuDNN picks each convolution's algorithm in this process, before its first convolution:
    ``benchmark`` (it times the candidates of every new shape; ``benchmark:N`` times at most N,
    PyTorch's default 10), ``heuristics`` (its instant heuristics' first choice, no timing) or
    ``heuristics_b`` (its slower, more accurate heuristics mode B, no timing)."""
    problem = cudnn_algorithms_problem(how)
    if problem:
        raise ValueError(f"config parameter cudnn_algorithms is {problem}")
    import torch

    name, _, limit = how.partition(":")
    torch.backends.cudnn.benchmark = name == "benchmark"
    if name == "benchmark":
        torch.backends.cudnn.benchmark_limit = int(limit or 10)
    if name == "heuristics_b":  # read once, at this process's first cuDNN convolution
        os.environ["TORCH_CUDNN_USE_HEURISTIC_MODE_B"] = "1"


def wait_for_gpu(how):
    """How this process's threads wait for the GPU from now on: ``block`` (the thread sleeps until
    the GPU is done, its core free for the server's other work) or ``spin`` (a core busy while it
    waits: CUDA's own choice on a host with more cores than contexts). Sets the current CUDA
    context's scheduling flag through the driver API; returns None, or why it could not be set."""
    problem = cuda_waits_problem(how)
    if problem:
        raise ValueError(f"config parameter cuda_waits is {problem}")
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no CUDA driver library ({exc})"
    set_flags, get_flags = getattr(driver, "cuCtxSetFlags", None), getattr(driver, "cuCtxGetFlags", None)
    if set_flags is None or get_flags is None:
        return "this CUDA driver has no cuCtxSetFlags (CUDA 12.1 or later has)"
    flags = ctypes.c_uint()
    if get_flags(ctypes.byref(flags)) != 0:
        return "cuCtxGetFlags failed: no current CUDA context"
    status = set_flags(ctypes.c_uint((flags.value & ~0x07) | CUDA_WAITS[how]))
    return None if status == 0 else f"cuCtxSetFlags returned CUresult {status}"
