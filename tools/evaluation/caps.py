"""``make caps``: TOPK and MAX_DET settings side by side — selfie AP against throughput.

For each setting an onnxruntime engine is built into ``build/eval/`` (as ``make engine TOPK=..
MAX_DET=..`` would build it), served on free ports, and measured in one run:

- the selfie benchmark (:func:`tools.evaluation.selfie.evaluate_run`): served AP, all faces and
  clear faces, at score 0.02, with the faces returned and whether a cap bound;
- the postprocess alone under perf_analyzer at batch 16 over system shared memory with the real
  candidates of the astronaut, the selfie and two canvases (four crowd frames in every batch),
  concurrency 1 and 2: images/s and server compute per batch;
- the ensemble at concurrency 1: p50 latency of one frame (the four frames in turn).

``CAPS`` (``TOPK/MAX_DET`` pairs, comma separated) picks the settings; the uncapped in-process
reference is the last row. Writes ``results/eval/caps.md`` and ``caps.json``.
"""

from __future__ import annotations

import json
import sys

from tools.bench import perf_inputs
from tools.bench.perf import find_perf_analyzer, run_perf_analyzer
from tools.engine import repository
from tools.engine.reference import ReferencePipeline
from tools.engine.source import load_source_model
from tools.evaluation.report import markdown_table
from tools.evaluation.selfie import SETTINGS, evaluate_run, evaluate_uncapped, load_labels
from tools.evaluation.served import EVAL_DIR, engine_info, scratch_engine, serving
from tools.sample_images import selfie
from tools.server_info import max_detections, model_config
from tools.settings import BuildSettings, SettingsError, env_text

__all__ = ["DEFAULT_CAPS", "parse_caps", "measure_setting", "main"]

DEFAULT_CAPS = "1000/750,3840/3000,8190/1000,8190/3000,16380/3000"


def parse_caps(text: str) -> list[tuple[int, int]]:
    """``TOPK/MAX_DET`` pairs, e.g. ``1000/750,8190/3000``."""
    try:
        pairs = [tuple(int(v) for v in part.split("/")) for part in text.split(",")]
    except ValueError:
        raise SettingsError(f"CAPS={text!r}: write TOPK/MAX_DET pairs, e.g. 1000/750,8190/3000") from None
    if any(len(p) != 2 or min(p) < 1 or p[1] > p[0] for p in pairs):
        raise SettingsError(f"CAPS={text!r}: each pair is TOPK/MAX_DET with 1 <= MAX_DET <= TOPK")
    return pairs


def _perf_row(url: str, model: str, batch: int, concurrency: str, out_name: str) -> list[dict]:
    input_json = perf_inputs.write_input_data(model, url, EVAL_DIR / "caps" / f"{out_name}-{model}.json")
    run = run_perf_analyzer(find_perf_analyzer(), url, model, input_json, EVAL_DIR / "caps" / out_name,
                            transport="system", batch=batch, concurrency=concurrency, window_requests=40,
                            max_trials=10, stability=50,
                            output_shm_bytes=perf_inputs.output_bytes(model_config(url, model), max_detections(url)))
    return run.rows


def measure_setting(topk: int, max_det: int, pipeline: ReferencePipeline) -> dict:
    """One setting: build (or reuse) its engine, serve it, and measure AP and speed."""
    settings = scratch_engine(f"caps-topk{topk}-maxdet{max_det}", backend="onnxruntime",
                              topk=topk, max_detections=max_det)
    with serving(None, settings.repository) as url:
        engine = engine_info(url)
        report = evaluate_run(url, engine, pipeline, load_labels(), selfie())
        post = _perf_row(url, repository.POSTPROCESS, 16, "1:2:1", settings.repository.parent.name)
        ensemble = _perf_row(url, repository.ENSEMBLE, 1, "1", settings.repository.parent.name)
    return {"topk": engine.topk, "max_detections": engine.max_detections,
            "served": report["served"], "saturation": report["saturation"],
            "postprocess_b16_images_per_s": [round(r["Inferences/Second"], 1) for r in post],
            "postprocess_b16_compute_ms": [round((r["Server Compute Input"] + r["Server Compute Infer"]
                                                  + r["Server Compute Output"]) / 1000, 2) for r in post],
            "ensemble_c1_p50_ms": round(ensemble[0]["p50 latency"] / 1000, 1)}


def main() -> int:
    """Entry point for ``python -m tools.evaluation.caps``."""
    try:
        caps = parse_caps(env_text("CAPS", DEFAULT_CAPS))
    except SettingsError as exc:
        print(f"make caps: {exc}", file=sys.stderr)
        return 1
    defaults = BuildSettings()
    pipeline = ReferencePipeline(load_source_model(), defaults.input_width, defaults.input_height)
    rows, results = [], []
    for topk, max_det in caps:
        result = measure_setting(topk, max_det, pipeline)
        results.append(result)
        sat = result["saturation"]
        bound = ", ".join(name for name, hit in (("TOPK", sat["topk_saturated"]),
                                                  ("MAX_DET", sat["max_detections_reached"])) if hit) or "none"
        rows.append([f"{result['topk']} / {result['max_detections']}"
                     + (" (default)" if (result["topk"], result["max_detections"])
                        == (defaults.topk, defaults.max_detections) else "")]
                    + [f"{result['served'][s]:.2f}" for s in SETTINGS]
                    + [result["served"]["detections"], bound,
                       " / ".join(f"{v:,.0f}" for v in result["postprocess_b16_images_per_s"]),
                       " / ".join(str(v) for v in result["postprocess_b16_compute_ms"]),
                       result["ensemble_c1_p50_ms"]])
        print(rows[-1], flush=True)
    uncapped = evaluate_uncapped(pipeline, load_labels(), selfie())
    rows.append(["no cap (in-process reference)"] + [f"{uncapped[s]:.2f}" for s in SETTINGS]
                + [uncapped["detections"], "", "", "", ""])
    table = markdown_table(["TOPK / MAX_DET", "selfie AP all", "selfie AP clear", "faces at 0.02",
                            "cap bound", "postprocess b16 images/s (c=1 / 2)",
                            "postprocess compute ms per batch (c=1 / 2)", "ensemble c=1 p50 ms"], rows)
    (EVAL_DIR / "caps.md").write_text(table + "\n")
    (EVAL_DIR / "caps.json").write_text(json.dumps({"settings": results, "uncapped": {
        k: v for k, v in uncapped.items() if k != "curves"}}, indent=2))
    print(f"{table}\nwritten: {EVAL_DIR / 'caps.md'}, caps.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
