"""The benchmark stage: ``make bench`` (in-process reference, rewritten graph and served
pipeline side by side, then each transport alone against a frame sink) and ``make perf``
(perf_analyzer sweeps with real images)."""
