"""Accuracy of the served pipeline: ``python -m tools.evaluation.cli {wider,selfie,parity}``.

- ``wider --data DIR [--gt DIR]``: WIDER FACE val easy / medium / hard AP (``make eval DATA=``).
- ``selfie``: AP on the labelled selfie, all faces and clear faces, served vs in-process
  reference at the same engine size, and the in-process reference with no cap; the same photo
  sent as the SDK's JPEG to the encoded ensemble (what that encoding costs); also with an
  engine of another TOPK (and MAX_DET) given by ``--wide-topk`` (``make eval-selfie``).
- ``parity``: the in-process rewritten graph vs each served backend, face by face.

Without ``--url`` a ``tritonserver`` is started on free ports over ``model_repository/``
(``make engine`` runs first when it holds no build) and stopped at the end. Results (JSON,
markdown, PR plots) go to ``results/eval/`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.evaluation.report import markdown_table, plot_pr, write_json
from tools.evaluation.served import (EVAL_DIR, EVAL_SCORE_THRESHOLD, engine_info, scratch_engine,
                                serving)
from tools.settings import TOPK_LIMIT, BuildSettings

__all__ = ["main", "SELFIE_AP_TOLERANCE", "PARITY_MATCHED", "PARITY_SCORE"]

SELFIE_AP_TOLERANCE = 0.5      # AP points between served and in-process reference
PARITY_MATCHED = 0.995         # onnxruntime paths: share of faces matched at IoU >= 0.9
PARITY_SCORE = 1e-3            # onnxruntime paths: mean |score difference|
# the torch detector (float16 network): 99.5 % of faces matched at IoU >= 0.95, every |score
# difference| <= 0.01, every matched face's landmarks within 0.5 px
GPU_PARITY = {"iou": 0.95, "agreeing_rate": 0.995}  # faces matched at IoU 0.95 and within AGREE_* (parity.py)
LABELS = {"onnxruntime": "served onnxruntime", "torch": "served torch FP16", "tensorrt": "served TensorRT FP16"}
PARITY_THRESHOLDS = (0.5, EVAL_SCORE_THRESHOLD)


def _source(engine):
    """The source model the served ``engine`` was built from: its network's, or ``ONNX=``'s."""
    from tools.engine.source import load_source_model, settings_source

    return settings_source(BuildSettings.from_env()) if engine.network == "onnx" else load_source_model(engine.network)


def run_wider(args) -> int:
    from tools.evaluation.wider import PUBLISHED, evaluate_served, load_set

    wider = load_set(args.data, args.gt)  # fails before a server starts when data are missing
    with serving(args.url, log_dir=args.out) as url:
        engine = engine_info(url)
        report = evaluate_served(url, wider, args.out / "wider", args.concurrency)
    report["engine"] = engine.as_dict()
    plot_pr({"served": report["curves"]}, args.out / "wider_pr.png",
            f"WIDER FACE val, served at {engine.width}x{engine.height} (AP %)")
    rows = [[f"served {engine.width}x{engine.height}, measured"]
            + [f"{v:.2f}" for v in report["ap"].values()]]
    rows += [[f"{k}, published"] + [f"{v:.2f}" for v in ap.values()]
             for k, ap in PUBLISHED.get(engine.network, {}).items()]
    table = markdown_table(["", "easy", "medium", "hard"], rows)
    (args.out / "wider.md").write_text(table + "\n")
    print(f"{table}\nwritten: {write_json(report, args.out / 'wider.json')}, wider_pr.png, "
          f"predictions in {report['predictions']}")
    return 0


def run_selfie(args) -> int:
    import tritonclient.grpc as grpcclient
    from rtface_client.client import ENCODED_MODEL_NAME
    from rtface_client.images import JPEG_QUALITY

    from tools.evaluation.selfie import SETTINGS, evaluate_run, evaluate_uncapped, load_labels
    from tools.engine.reference import ReferencePipeline
    from tools.sample_images import selfie, selfie_dir

    truth, image = load_labels(), selfie()
    if image is None:
        raise FileNotFoundError("no selfie: shared/data/selfie/selfie.jpg (or $RTFACE_SELFIE_DIR)")
    with serving(args.url, log_dir=args.out) as url:
        engine = engine_info(url)
        pipeline = ReferencePipeline(_source(engine), engine.width, engine.height)
        runs = {f"TOPK={engine.topk}": evaluate_run(url, engine, pipeline, truth, image)}
        if grpcclient.InferenceServerClient(url).is_model_ready(ENCODED_MODEL_NAME):  # what the SDK's JPEG costs
            runs[f"TOPK={engine.topk}, encoded (JPEG quality {JPEG_QUALITY})"] = evaluate_run(
                url, engine, pipeline, truth, image, transport="encoded")
    if args.wide_topk and not args.url and args.wide_topk != engine.topk:
        settings = scratch_engine(f"topk{args.wide_topk}", input_width=engine.width,
                                  input_height=engine.height, topk=args.wide_topk,
                                  max_detections=args.wide_topk)
        with serving(None, settings.repository, log_dir=args.out) as url:
            wide = engine_info(url)
            runs[f"TOPK={wide.topk}"] = evaluate_run(url, wide, pipeline, truth, image)
    uncapped = evaluate_uncapped(pipeline, truth, image)
    first = next(iter(runs.values()))
    ok = all(abs(d) <= SELFIE_AP_TOLERANCE for d in first["ap_difference"].values())
    report = {"image": f"{selfie_dir() / 'selfie.jpg'} ({image.shape[1]}x{image.shape[0]})",
              "protocol": "WIDER FACE (IoU 0.5, +1 px, min-max scores, 1000 thresholds); boxes "
                          "compared in a 2048x1152 frame (labels x 2048/1152, predictions scaled "
                          "from 2048x1150); score threshold 0.02",
              "runs": runs, "reference_uncapped": uncapped,
              "goal": {"max_ap_difference": SELFIE_AP_TOLERANCE, "met": ok}}
    plot_pr({f"{path} {label}": run["curves"][path] for label, run in runs.items()
             for path in ("served", "reference")} | {"reference, no cap": uncapped["curves"]},
            args.out / "selfie_pr.png",
            f"World's Largest Selfie at {engine.width}x{engine.height}, WIDER protocol (AP %)")
    rows = [[label, path] + [f"{run[path][s]:.2f}" for s in SETTINGS] + [run[path]["detections"]]
            for label, run in runs.items() for path in ("served", "reference")]
    rows.append(["no top-K / MAX_DET cap", "reference"] + [f"{uncapped[s]:.2f}" for s in SETTINGS]
                + [uncapped["detections"]])
    table = markdown_table(["engine", "path", "AP all (856)", "AP clear (336)", "detections"], rows)
    (args.out / "selfie.md").write_text(table + "\n")
    for label, run in runs.items():
        print(f"{label}: {run['saturation']}")
    print(f"{table}\nserved vs reference at TOPK={engine.topk}: {first['ap_difference']} AP "
          f"({'within' if ok else 'NOT within'} {SELFIE_AP_TOLERANCE})")
    print(f"written: {write_json(report, args.out / 'selfie.json')}, selfie_pr.png, selfie.md")
    return 0 if ok else 1


def _parity_of(url: str, engine, images) -> dict:
    from tools.evaluation.parity import MATCH_IOU, RewrittenGraph, compare_served

    graph = RewrittenGraph.from_source(_source(engine), engine.width, engine.height, engine.topk)
    iou = GPU_PARITY["iou"] if engine.backend == "torch" else MATCH_IOU
    return {"engine": engine.as_dict(), "match_iou": iou,
            **{f"score>{t:g}": compare_served(url, engine, graph, images, t, iou)
               for t in PARITY_THRESHOLDS}}


def _parity_met(backend: str, s: dict) -> bool:
    """Whether one served path meets its parity goal (TensorRT's is checked at build time)."""
    if backend == "onnxruntime":
        return s["matched_rate"] >= PARITY_MATCHED and s["mean_abs_score_delta"] < PARITY_SCORE
    if backend == "torch":
        return s["agreeing_rate"] >= GPU_PARITY["agreeing_rate"]
    return True


def run_parity(args) -> int:
    from tools.evaluation.parity import parity_images
    from tools.engine.backends import BACKENDS

    images = parity_images(args.canvases)
    paths: dict[str, dict] = {}
    with serving(args.url, log_dir=args.out) as url:
        engine = engine_info(url)
        paths[engine.backend] = _parity_of(url, engine, images)
    status = {name: backend.status() for name, backend in BACKENDS.items()}
    for backend in ("onnxruntime", "torch", "tensorrt"):
        if backend in paths:
            continue
        available, why = status[backend]
        if not available:
            paths[backend] = {"skipped": f"not available: {why}"}
        elif args.url:
            paths[backend] = {"skipped": f"not available: the server at {args.url} runs "
                                         f"{engine.backend}"}
        else:
            settings = scratch_engine(f"parity-{backend}", backend=backend, input_width=engine.width,
                                      input_height=engine.height, topk=engine.topk,
                                      max_detections=engine.max_detections)
            with serving(None, settings.repository, log_dir=args.out) as url:
                paths[backend] = _parity_of(url, engine_info(url), images)
    rows, ok = [], True
    for backend, result in paths.items():
        label = LABELS[backend]
        if "skipped" in result:
            rows.append([label, "-", result["skipped"], "", "", ""])
            continue
        for key, s in ((k, v) for k, v in result.items() if k.startswith("score>")):
            faces = max(s["reference_faces"], s["faces"])
            rows.append([label, key.removeprefix("score>"),
                         f"{s['matched']}/{faces} = {100 * s['matched_rate']:.2f} % (IoU >= {result['match_iou']})",
                         f"{s['mean_abs_score_delta']:.2e}", f"{s['max_abs_score_delta']:.2e}",
                         f"{s['mean_landmark_error_px']:.4f} / {s['max_landmark_error_px']:.4f}"])
            ok &= _parity_met(backend, s)
    table = markdown_table(["served path vs in-process rewritten graph", "score >", "matched",
                            "mean abs Δscore", "max abs Δscore", "landmark error px (mean / max)"], rows)
    report = {"images": {name: list(image.shape[1::-1]) for name, image in images.items()},
              "paths": paths, "goal": {"matched_rate": PARITY_MATCHED, "mean_abs_score_delta":
                                       PARITY_SCORE, "torch": GPU_PARITY, "met": ok}}
    (args.out / "parity.md").write_text(table + "\n")
    print(f"{table}\nparity: {'goal met' if ok else 'goal NOT met'} (onnxruntime: >= {100 * PARITY_MATCHED:g} % "
          f"matched, mean |Δscore| < {PARITY_SCORE:g}; torch: {GPU_PARITY})")
    print(f"written: {write_json(report, args.out / 'parity.json')}, parity.md")
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluation.cli",
                                     description="Accuracy of the served pipeline (results/eval/).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="gRPC host:port of a running server (default: start one)")
    common.add_argument("--out", type=Path, default=EVAL_DIR, help="results folder (results/eval)")
    sub = parser.add_subparsers(dest="command", required=True)
    wider = sub.add_parser("wider", parents=[common], help="WIDER FACE val AP")
    wider.add_argument("--data", type=Path, required=True, help="WIDER-format folder")
    wider.add_argument("--gt", type=Path,
                       help="folder of the official .mat files (default: found under --data)")
    wider.add_argument("--concurrency", type=int, default=2, help="requests in flight (2)")
    selfie = sub.add_parser("selfie", parents=[common], help="AP on the labelled selfie")
    selfie.add_argument("--wide-topk", type=int, default=0,
                        help=f"also evaluate an engine built with this TOPK (up to {TOPK_LIMIT}; 0: no)")
    parity = sub.add_parser("parity", parents=[common], help="backend parity report")
    parity.add_argument("--canvases", type=int, default=6, help="face_canvas seeds (6)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m tools.evaluation.cli``; exit 1 when a goal is not met or on errors."""
    from tools.engine.build import BuildError, ModelSourceError, SurgeryError
    from tools.serve import ServeError
    from tools.settings import SettingsError

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        return {"wider": run_wider, "selfie": run_selfie, "parity": run_parity}[args.command](args)
    except (ServeError, SettingsError, BuildError, ModelSourceError, SurgeryError,
            FileNotFoundError) as exc:  # FileNotFoundError includes the WIDER reader's DataError
        print(f"evaluate {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
