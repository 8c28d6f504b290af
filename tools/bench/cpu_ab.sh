#!/usr/bin/env bash
# The CPU build before and after, side by side on this host: BASE's model code (default build/base, a
# checkout of an earlier commit) built by its own tools with BACKEND=onnxruntime into build/ab-before, and
# this tree's into build/ab-after; served in turn for AB_ROUNDS (4) rounds, before then after in odd rounds, after then before in even, with
# the same perf_analyzer rows against each: pixels over system shared memory and JPEG over gRPC, one-image
# requests at concurrency 1 and 2 (the CPU detector sheds past OVERLOAD_KEEP, 2). Each row's lines
# land in $AB_OUT (results/cpu-ab)/rows.md, one per round, in the order served.
#
# Usage: git archive <commit> model_repository tools client | (mkdir -p build/base && tar -x -C build/base)
#        bash tools/bench/cpu_ab.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${AB_OUT:-results/cpu-ab}
PY=$("${PY:-.venv/bin/python}" -c 'import sys; print(sys.executable)') || exit 1
BASE=${BASE:-build/base}
mkdir -p "$OUT_DIR" build
source tools/bench/serving.sh

rm -rf build/ab-before
build_checkout "$BASE" build/ab-before onnxruntime "$OUT_DIR/build-before.log" || exit 1
"$PY" -c "from pathlib import Path; from tools.engine.build import build_scratch; build_scratch(Path('build/ab-after'), backend='onnxruntime')" \
  > "$OUT_DIR/build-after.log" 2>&1 || { tail -5 "$OUT_DIR/build-after.log"; exit 1; }

rows="$OUT_DIR/rows.md"
echo "| round | build | model | transport | concurrency | infer/s | p50 ms | p90 ms | p99 ms |" > "$rows"
echo "|---:|---|---|---|---:|---:|---:|---:|---:|" >> "$rows"
port=9800
for round in $(seq "${AB_ROUNDS:-4}"); do
  order="before after"; [ $((round % 2)) = 0 ] && order="after before"  # ABBA: drift of the host cancels
  for build in $order; do
    port=$((port + 10))
    serve "build/ab-$build" "$port" || exit 1
    for row in retinaface:system retinaface_encoded:none; do
      IFS=: read -r model shm <<< "$row"
      MODEL=$model SHM=$shm STABILITY=50 perf "$port" "$build-$round-$model" 1 1:2:1 "${AB_REQUESTS:-40}" \
        | awk -v r="$round" -v b="$build" -v m="$model" -F'|' '$2 ~ /^ (none|system) $/ && $5 ~ /^ *[0-9.]+ *$/ {
            printf "| %s | %s | %s |%s|%s|%s|%s|%s|%s|\n", r, b, m, $2, $4, $5, $6, $7, $8 }' | tee -a "$rows"
    done
    stop "$port"
  done
done
