"""rtface's build, benchmark, evaluation and operations tools, one subpackage per stage.

- ``tools.engine``: RetinaFace ONNX -> graph surgery -> validation -> detector artifact and the
  Triton model repository (``make engine``);
- ``tools.bench``: throughput and latency, in-process and served (``make bench``, ``make perf``);
- ``tools.evaluation``: accuracy: WIDER FACE protocol, the labelled selfie, backend parity
  (``make eval``, ``make eval-selfie``, ``make parity``);
- ``tools.operations``: checks against a running server: soak and overload (``make soak``,
  ``make overload``).

Shared by every stage, at this level: ``settings`` (every build and serve setting, read once from
the environment), ``serve`` (starting Triton: ``make serve``), ``server_info`` (what a running server
reports about its models), ``sample_images`` (the real face
images the stages measure with) and ``matching`` (box IoU and matching).
"""
